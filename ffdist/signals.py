"""Preemption: SIGTERM / SIGUSR1 -> finish the current step, checkpoint, exit EXIT_PREEMPTED.

The handler only sets `trainer.stop_requested`; the Trainer all-reduces that flag at every
step boundary (in the same collective as the NaN check), so all ranks stop after the same
step even when the signal reached only some of them. A second signal, more than
REPEAT_GRACE_S after the first, restores the default action and re-sends itself: a user
who insists gets an immediate stop. Within the grace period a repeat is the same request
delivered twice (Slurm's `scancel --signal` reaches every process of the step, and
torchrun forwards the one it got to its workers as well), so it is ignored.

Contract with slurm/train.sh and other wrappers: exit code 75 (ffdist.errors.EXIT_PREEMPTED)
means "a checkpoint was written; start the same command again to resume".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ffdist.errors import EXIT_PREEMPTED

log = logging.getLogger("ffdist")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "install", "uninstall"]
_previous: dict[int, Any] = {}
REPEAT_GRACE_S = 10.0


def install(trainer: Any) -> None:
    """Route SIGTERM and SIGUSR1 to `trainer.stop_requested = True` (main thread only)."""

    first: list[float] = []

    def handler(signum: int, frame: object) -> None:
        if trainer.stop_requested:
            if first and time.monotonic() - first[0] < REPEAT_GRACE_S:
                return  # the same request, delivered twice
            signal.signal(signum, signal.SIG_DFL)  # the user insists: stop now, the default way
            os.kill(os.getpid(), signum)
            return
        first.append(time.monotonic())
        trainer.stop_requested = True
        # logging from a handler is not strictly reentrant-safe; one line is worth the risk
        log.warning("received %s: stopping after this step and writing a checkpoint",
                    signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: SIGTERM/SIGUSR1 will not checkpoint before exit")
        return
    for sig in SIGNALS:
        _previous.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, handler)


def uninstall() -> None:
    """Put back the handlers that were there before `install` (for in-process callers)."""
    while _previous:
        sig, old = _previous.popitem()
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
