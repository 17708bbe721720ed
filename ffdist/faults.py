"""Deterministic fault injection for tests/fault/: installed on a run's Trainer and its
checkpoint manager by ffdist.train only when FFDIST_FAULT is set (`install`); otherwise
nothing of this module is imported and the training step calls no hook at all.

    FFDIST_FAULT="nan_loss:step=5:rank=1"     that rank's loss becomes NaN at step 5
    FFDIST_FAULT="nan_loss:step=5-9"          ... at steps 5..9, on every rank
    FFDIST_FAULT="kill_in_save:step=20"       SIGKILL itself halfway through writing the
                                              checkpoint of step 20 (a torn save)
    FFDIST_FAULT="kill:step=13:rank=1"        SIGKILL itself after step 13
    FFDIST_FAULT="data_error:step=3:rank=1"   raise a DataError (a user error) on one rank
    FFDIST_FAULT="slow:step=11-30:ms=100"     sleep after each of those steps, so that a
                                              test can send a signal from outside in time

Steps are 1-based optimizer steps (the step being computed). Real processes die from real
signals; only the moment is chosen, so that the tests are not races.
"""

from __future__ import annotations

import io
import os
import signal
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffdist.checkpoint import atomic_write
from ffdist.errors import DataError

if TYPE_CHECKING:
    from ffdist.engine import Trainer


@cache
def _spec() -> tuple[str, int, int, int | None, int] | None:
    raw = os.environ.get("FFDIST_FAULT", "")
    if not raw:
        return None
    kind, *parts = raw.split(":")
    fields = dict(p.split("=", 1) for p in parts)
    lo, _, hi = fields.get("step", "0").partition("-")
    rank = int(fields["rank"]) if "rank" in fields else None
    return kind, int(lo), int(hi or lo), rank, int(fields.get("ms", "0"))


def armed(kind: str, step: int, rank: int = 0) -> bool:
    spec = _spec()
    if spec is None or spec[0] != kind:
        return False
    _, lo, hi, want_rank, _ = spec
    return lo <= step <= hi and want_rank in (None, rank)


class Faults:
    """The Trainer's hooks (ffdist.engine.StepHooks) for the fault FFDIST_FAULT names."""

    @staticmethod
    def loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        return loss * float("nan") if armed("nan_loss", step, rank) else loss

    @staticmethod
    def after_step(step: int, rank: int) -> None:
        if armed("slow", step, rank):
            time.sleep(_spec()[4] / 1000)  # type: ignore[index]
        if armed("kill", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if armed("data_error", step, rank):
            raise DataError(f"injected by FFDIST_FAULT at step {step} on rank {rank}; unset "
                            "FFDIST_FAULT.")


def kill_in_save(path: Path, data: dict[str, Any], step: int) -> None:
    """The checkpoint manager's hook: at the armed step, write half of the file through
    the same atomic write as a real save, make it reach the disk, then die by SIGKILL."""
    if not armed("kill_in_save", step):
        return
    buf = io.BytesIO()
    torch.save(data, buf)
    raw = buf.getvalue()

    def torn(f: Any) -> None:
        f.write(raw[: len(raw) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(path, torn)


def install(trainer: Trainer) -> None:
    """Arm FFDIST_FAULT on `trainer` (its step) and on its checkpoint manager (its saves)."""
    if _spec() is None:
        return
    trainer.hooks = Faults()
    trainer.manager.before_write = kill_in_save
