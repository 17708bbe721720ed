"""Deterministic fault injection for tests/fault/; inert unless FFDIST_FAULT is set.

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

import os
import signal
import time
from functools import cache
from typing import Any


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


def poison_loss(loss: Any, step: int, rank: int) -> Any:
    return loss * float("nan") if armed("nan_loss", step, rank) else loss


def after_step(step: int, rank: int) -> None:
    if armed("slow", step, rank):
        time.sleep(_spec()[4] / 1000)  # type: ignore[index]
    if armed("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if armed("data_error", step, rank):
        from ffdist.errors import DataError

        raise DataError(f"injected by FFDIST_FAULT at step {step} on rank {rank}; unset "
                        "FFDIST_FAULT.")


def torn_write(f: Any, data: bytes) -> None:
    """Write half of `data`, make it reach the disk, then die by SIGKILL."""
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
