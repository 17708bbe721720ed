"""ffdist.signals with real signals, in a forked copy of this process (an abort ends the
process that gets it): what a press of Ctrl-C, a press delivered twice, a second press and a
scheduler's repeated SIGTERM each do, and that forked workers leave SIGINT to the training
process. (The checkpoint and the resume are tested with real training processes in
tests/fault/.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import SimpleNamespace

from ffdist import signals


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs between bytecodes of the main thread


def forked(body: Callable[[], bool]) -> int:
    """Exit code of a fork that runs `body`: 0 where it returned True, 1 where it returned
    False or raised, a signal handler's own code where one ended the process."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def in_child(body: Callable[[SimpleNamespace], bool]) -> int:
    """`forked`, with ffdist's handlers installed for a trainer that `body` is given."""
    def run() -> bool:
        trainer = SimpleNamespace(stop_requested=False)
        signals.install(trainer)
        return body(trainer)
    return forked(run)


def test_one_press_delivered_twice_is_one_stop_request_not_an_abort() -> None:
    def body(trainer: SimpleNamespace) -> bool:
        _send(signal.SIGINT)
        _send(signal.SIGINT)  # within DUPLICATE_S: what a launcher forwarding it looks like
        return trainer.stop_requested
    assert in_child(body) == 0


def test_a_second_press_aborts_with_130_and_one_line(tmp_path) -> None:
    def body(trainer: SimpleNamespace) -> bool:
        fd = os.open(tmp_path / "stderr", os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 2)
        _send(signal.SIGINT)
        time.sleep(signals.DUPLICATE_S + 0.1)
        _send(signal.SIGINT)
        return False  # not reached: the handler exits
    assert in_child(body) == signals.EXIT_ABORTED == 130
    # (the first press's warning goes wherever this process's logging sends it)
    lines = [ln for ln in (tmp_path / "stderr").read_text().splitlines()
             if ln.startswith("ffdist: ")]
    assert lines == ["ffdist: aborted by a second Ctrl-C, without a checkpoint of the current "
                     "step; the newest complete one is kept: start the same command again to "
                     "resume."], lines


def test_sigterm_twice_from_a_scheduler_is_one_stop_request() -> None:
    def body(trainer: SimpleNamespace) -> bool:
        _send(signal.SIGTERM)
        _send(signal.SIGTERM)  # within REPEAT_GRACE_S: the same request
        return trainer.stop_requested
    assert in_child(body) == 0


def test_a_forked_worker_ignores_ctrl_c() -> None:
    def body(trainer: SimpleNamespace) -> bool:
        def worker() -> bool:  # forked after install: the terminal's two presses reach it too
            _send(signal.SIGINT)
            time.sleep(signals.DUPLICATE_S + 0.1)
            _send(signal.SIGINT)  # a handler inherited from the trainer would abort here
            return True
        return forked(worker) == 0 and not trainer.stop_requested
    assert in_child(body) == 0


def test_after_the_run_finished_a_press_changes_nothing() -> None:
    def body(trainer: SimpleNamespace) -> bool:
        signals.run_finished()
        _send(signal.SIGINT)
        _send(signal.SIGTERM)
        return not trainer.stop_requested
    assert in_child(body) == 0
