"""Preemption: SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit 75, resume exactly;
and a signal after the run finished (while it tears down) changes nothing: exit 0.

Real signals sent from outside to real processes. The `slow` fault only makes steps after
step 10 take 0.1 s longer, so that the signal surely lands mid-training; it changes no
number. Under torchrun the signal goes to ONE rank: both must stop after the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ffdist.errors import EXIT_PREEMPTED
from tests.fault import kit

SLOW = "slow:step=8-30:ms=100"


def stopped_step(run_dir: Path) -> int:
    step = int(kit.latest(run_dir)[5:13])
    assert max(kit.train_losses(run_dir)) == step, "the last logged step is the checkpoint's"
    return step


def test_sigterm_checkpoints_exits_75_and_resumes_bit_exact(ref1: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = kit.start(kit.python_cmd(out), FFDIST_FAULT=SLOW)
    kit.wait_for_step(out, 12, proc)
    kit.send(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, kit.explain(proc, text)
    assert "received SIGTERM" in text
    step = stopped_step(out)
    assert 12 <= step < kit.STEPS and step % 5, f"stopped at {step}: not a fresh checkpoint"
    assert not (out / "model.pt").exists()

    resumed = kit.run(kit.python_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert f"resumed from step {step}" in resumed.stdout
    assert kit.train_losses(out) == kit.train_losses(ref1)
    kit.same_weights(out / "model.pt", ref1 / "model.pt")


# make test-all: the log window across a stop is in the fast tier through tests/fault/
# test_resume_exact.py::test_a_kill_between_log_lines_resumes_the_log_window_and_counts_both_
# segments, and the stop itself through test_sigterm_checkpoints_exits_75_and_resumes_bit_exact
@pytest.mark.extended
def test_a_stop_between_log_lines_saves_the_window_instead_of_logging_a_short_line(
        ref1_window4: Path, tmp_path: Path):
    """Log lines every 4 steps: the stop's checkpoint keeps the steps since the last line,
    and the resumed run logs the lines of a run never stopped, no extra one at the stop."""
    out = tmp_path / "run"
    # 0.3 s steps from step 8: the stop lands a step or two after the line at 12
    proc = kit.start(kit.python_cmd(out, kit.WINDOW4), FFDIST_FAULT="slow:step=8-30:ms=300")
    kit.wait_for_step(out, 12, proc)
    kit.send(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, kit.explain(proc, text)
    step = int(kit.latest(out)[5:13])
    assert max(kit.train_losses(out)) == 12 < step < 16, "a line logged at the stop"
    resumed = kit.run(kit.python_cmd(out, kit.WINDOW4))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert f"resumed from step {step}" in resumed.stdout
    assert kit.train_losses(out) == kit.train_losses(ref1_window4)


# make test-all only; the fast tier covers its path: test_sbatch's two-node preemption,
# test_ctrl_c's stop of both torchrun ranks at the same step
@pytest.mark.extended
def test_sigusr1_to_one_rank_stops_both_at_the_same_step(ref2: Path, tmp_path: Path):
    out = tmp_path / "run"
    agent = kit.start(kit.torchrun_cmd(out), FFDIST_FAULT=SLOW)
    kit.wait_for_step(out, 12, agent)
    ranks = kit.worker_pids(agent)
    assert sorted(ranks) == [0, 1], ranks
    kit.send(ranks[1], signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the all-reduce
    text = agent.communicate(timeout=90)[0]
    # torchrun does not pass worker exit codes through (it exits 1), but reports them.
    assert agent.returncode != 0
    assert text.count(f"exitcode  : {EXIT_PREEMPTED}") >= 1, kit.explain(agent, text)
    assert "received SIGUSR1" in text
    step = stopped_step(out)
    assert 12 <= step < kit.STEPS

    resumed = kit.run(kit.torchrun_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert kit.train_losses(out) == kit.train_losses(ref2)
    kit.same_weights(out / "model.pt", ref2 / "model.pt")


# make test-all: the ffdist CLI's entry; the fast tier keeps python -m ffdist.train (the same
# trainer and handlers behind both)
@pytest.mark.parametrize("entry", [["-m", "ffdist.train"],
                                   pytest.param(["-m", "ffdist.cli", "train"],
                                                marks=pytest.mark.extended)])
def test_signals_after_the_run_finished_change_nothing(tmp_path: Path, entry: list[str]):
    """The end-of-run summary is printed; SIGTERM and Ctrl-C then keep arriving every
    0.2 s while the process tears down (a scheduler at the time limit, an impatient
    person): the run finished, so it exits 0 and says nothing about stopping."""
    import sys
    import time

    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, *entry, str(kit.RECIPES / "digits.yaml"), *kit.ARGS[:2],
           "schedule.max_steps=2", "log.tensorboard=false", "log.progress=false",
           f"output_dir={out}"]
    proc = kit.start(cmd)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "finished in" in line:
            break
    sent = 0
    while proc.poll() is None:
        if psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            kit.send(proc.pid, (signal.SIGTERM, signal.SIGINT)[sent % 2])
            sent += 1
        time.sleep(0.2)
    text = "".join(lines) + proc.stdout.read()
    assert sent >= 2, "the process ended before the signals: nothing was tested"
    assert proc.returncode == 0, kit.explain(proc, text)
    assert "received SIG" not in text and "abort" not in text and "Traceback" not in text, text
    assert (out / "model.pt").is_file()
