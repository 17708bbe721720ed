"""Preemption: SIGUSR1 / SIGTERM ask the trainer to checkpoint and stop.

Slurm's `--signal=B:USR1@90` reaches slurm/train.sh, which relays USR1 to the training
processes (torchrun forwards it to its workers, `--signals_to_handle`); a scheduler's
SIGTERM arrives the same way. The handler only sets `Trainer.stop_requested`: engine.fit
checks it after each optimizer step, saves a checkpoint and returns, and the requeued
job resumes from that checkpoint (checkpoint.resume: auto).

Minimal hook for the Slurm requeue path: each rank reads its own flag, so two ranks can
stop one step apart when the signal lands between their checks; a fault-tolerance layer
should agree on the flag across ranks (an all-reduce) before acting on it.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger("ffdist")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def install_stop_handlers(trainer: Any) -> None:
    """Route STOP_SIGNALS to `trainer.stop_requested = True` (main thread only)."""

    def handler(signum: int, _frame: object) -> None:
        if not trainer.stop_requested:
            log.warning("%s: checkpointing and stopping", signal.Signals(signum).name)
        trainer.stop_requested = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
