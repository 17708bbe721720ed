"""Deterministic fault injection for tests/fault/: installed on a run's Trainer and its
checkpoint manager by ffdist.train only when FFDIST_FAULT is set (`install`); otherwise
nothing of this module is imported and the training step calls no hook at all.

    FFDIST_FAULT="nan_loss:step=5:rank=1"     that rank's loss becomes NaN at step 5
    FFDIST_FAULT="nan_loss:step=5-9"          ... at steps 5..9, on every rank
    FFDIST_FAULT="kill_in_save:step=20"       SIGKILL itself halfway through writing the
                                              checkpoint file of step 20, or the marker
                                              (ffdist_state.pt) of its folder of shards
                                              (a torn save)
    FFDIST_FAULT="kill_in_save:step=20:at=shards:rank=1"
                                              a sharded save: that rank SIGKILLs itself
                                              right after writing its shards (the others
                                              wait to mark the folder complete)
    FFDIST_FAULT="kill_in_save:step=20:at=start:rank=1"
                                              ... as the save begins (the others are inside
                                              the strategy's collective save)
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
def _spec() -> tuple[str, int, int, int | None, int, str] | None:
    raw = os.environ.get("FFDIST_FAULT", "")
    if not raw:
        return None
    kind, *parts = raw.split(":")
    fields = dict(p.split("=", 1) for p in parts)
    lo, _, hi = fields.get("step", "0").partition("-")
    rank = int(fields["rank"]) if "rank" in fields else None
    at = fields.get("at", "marker")
    if at not in ("marker", "shards", "start"):
        raise ValueError(f"FFDIST_FAULT: at={at}; use marker, shards or start")
    return kind, int(lo), int(hi or lo), rank, int(fields.get("ms", "0")), at


def armed(kind: str, step: int, rank: int = 0) -> bool:
    spec = _spec()
    if spec is None or spec[0] != kind:
        return False
    _, lo, hi, want_rank, _, _ = spec
    return lo <= step <= hi and want_rank in (None, rank)


def _at() -> str:
    spec = _spec()
    return spec[5] if spec else "marker"


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
    """The checkpoint manager's hook: at the armed step, write half of the file (the
    checkpoint file, or a folder's marker) through the same atomic write as a real save,
    make it reach the disk, then die by SIGKILL."""
    if _at() != "marker" or not armed("kill_in_save", step):
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


def _killing_save_shards(strategy: Any, rank: int) -> None:
    """Wrap the strategy's save_shards: SIGKILL this rank as it starts (`at=start`) or once
    its shards are written (`at=shards`), at the armed step (from the folder's name)."""
    inner = strategy.save_shards

    def save_shards(path: Path) -> None:
        step = int(Path(path).name.removeprefix("step_"))
        if _at() == "start" and armed("kill_in_save", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        inner(path)
        if _at() == "shards" and armed("kill_in_save", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    strategy.save_shards = save_shards


def install(trainer: Trainer) -> None:
    """Arm FFDIST_FAULT on `trainer` (its step) and on its checkpoint manager (its saves)."""
    if _spec() is None:
        return
    trainer.hooks = Faults()
    trainer.manager.before_write = kill_in_save
    if _at() != "marker":
        _killing_save_shards(trainer.strategy, trainer.info.rank)
