"""Stop requests: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) -> finish the current step,
checkpoint, exit EXIT_PREEMPTED (75); a second Ctrl-C aborts at once (exit 130).

The handlers only set `trainer.stop_requested`; the Trainer all-reduces that flag at every
step boundary (in the same collective as the NaN check), so all ranks stop after the same
step even when the signal reached only some of them.

Repeats mean different things per signal, and both rules hold:
- SIGTERM / SIGUSR1 come from schedulers, often twice: Slurm's `scancel --signal` reaches
  every process of the step and torchrun forwards the one it got to its workers as well.
  A repeat within REPEAT_GRACE_S (10 s) is that same request, ignored; a later one means
  the sender insists: the default action (the process ends by that signal, no checkpoint).
- SIGINT comes from a person at a terminal. The first press is a stop request like
  SIGTERM. A repeat within DUPLICATE_S (0.5 s) is the same press delivered twice (a launcher
  forwarding what the terminal already sent to the whole process group); a later press
  aborts: one line on stderr and exit 130 (128 + SIGINT) at once, from the handler
  (os._exit: raising KeyboardInterrupt instead would surface in whatever runs then, e.g.
  DataLoader teardown, as "Exception ignored ..." tracebacks). What an abort leaves is what
  a kill leaves: the newest complete checkpoint, a temp file that the next start deletes,
  and the run-directory lock released by the kernel. torchrun starts its workers in their
  own sessions, so there Ctrl-C reaches torchrun, which forwards it once to every worker:
  a stop request.
Forked DataLoader workers ignore SIGINT (they are in the terminal's process group too):
the training process decides, and shuts them down itself.

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

__all__ = ["EXIT_ABORTED", "EXIT_PREEMPTED", "SIGNALS", "install", "owns_process",
           "run_finished", "uninstall"]
_previous: dict[int, Any] = {}
_state = {"owner": False, "finished": False}
REPEAT_GRACE_S = 10.0
DUPLICATE_S = 0.5
EXIT_ABORTED = 128 + signal.SIGINT  # 130, what a shell reports for a process ended by Ctrl-C


def _abort(trainer: Any) -> None:
    step = getattr(getattr(trainer, "progress", None), "step", None)
    if step is not None and getattr(trainer, "_saved_step", None) == step:
        done = f"after the checkpoint of step {step} was written"
    else:
        done = "without a checkpoint of the current step; the newest complete one is kept"
    line = (f"ffdist: aborted by a second Ctrl-C, {done}: start the same command again to "
            "resume.\n")
    os.write(2, line.encode())  # not print(): no buffer to flush, safe in a handler
    os._exit(EXIT_ABORTED)


def _ignore_sigint_in_child() -> None:
    if _previous:  # only while a training run has its handlers installed
        signal.signal(signal.SIGINT, signal.SIG_IGN)


os.register_at_fork(after_in_child=_ignore_sigint_in_child)


def install(trainer: Any) -> None:
    """Route SIGTERM, SIGUSR1 and SIGINT to `trainer.stop_requested = True` (main thread
    only)."""

    first: list[float] = []
    _state["finished"] = False

    def handler(signum: int, frame: object) -> None:
        if _state["finished"]:
            return  # nothing left to stop: the run ends as it would have
        if first:  # (a Ctrl-C before does not count: SIGTERM after it still checkpoints)
            if time.monotonic() - first[0] < REPEAT_GRACE_S:
                return  # the same request, delivered twice
            signal.signal(signum, signal.SIG_DFL)  # the sender insists: stop now, the default way
            os.kill(os.getpid(), signum)
            return
        first.append(time.monotonic())
        trainer.stop_requested = True
        # logging from a handler is not strictly reentrant-safe; one line is worth the risk
        log.warning("received %s: stopping after this step and writing a checkpoint",
                    signal.Signals(signum).name)

    pressed: list[float] = []

    def on_sigint(signum: int, frame: object) -> None:
        if _state["finished"]:
            return
        now = time.monotonic()
        if pressed and now - pressed[0] < DUPLICATE_S:
            return  # the same press, delivered twice
        if pressed:
            _abort(trainer)
        pressed.append(now)
        trainer.stop_requested = True
        log.warning("received SIGINT (Ctrl-C): stopping after this step and writing a "
                    "checkpoint; press Ctrl-C again to abort without one")

    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: SIGTERM/SIGUSR1/SIGINT will not checkpoint "
                    "before exit")
        return
    for sig in SIGNALS:
        _previous.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, handler)
    _previous.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
    signal.signal(signal.SIGINT, on_sigint)


def owns_process() -> None:
    """Called by the entry points whose process ends when the command does (`ffdist ...`,
    `python -m ffdist.train`): see `uninstall`."""
    _state["owner"] = True


def run_finished() -> None:
    """Training is over (model.pt and the logs are what remains to write, then teardown):
    a stop request or Ctrl-C has nothing left to stop, and is ignored without a word, so
    that a finished run exits 0 whatever a scheduler sends it while it tears down."""
    _state["finished"] = True


def uninstall() -> None:
    """Put back the handlers that were there before `install` (for in-process callers).
    A process that only exits after a finished run ignores these signals instead: the
    default action would end it by the signal (exit 143) with everything already written."""
    ignore = _state["finished"] and _state["owner"]
    while _previous:
        sig, old = _previous.popitem()
        signal.signal(sig, signal.SIG_IGN if ignore else old if old is not None else signal.SIG_DFL)
