"""Ctrl-C: the first press is a stop request like SIGTERM (finish the step,
checkpoint, exit 75, no traceback); a second one aborts (exit 130, one line).

Real processes, with SIGINT sent to the whole process group, as a terminal does: the
training process and its DataLoader workers (`data.num_workers=2`) all receive it, and
the workers must not die of it. Under torchrun the agent receives it and forwards it once
to each worker (they run in their own sessions).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ffdist import signals, train
from ffdist.errors import EXIT_PREEMPTED
from tests.fault import kit
from tests.helpers import RECIPES


def start_in_own_group(cmd: list[str], **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=kit.REPO, env=kit.env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's foreground process group


# make test-all only: the fast tier covers its path through test_preemption.py's SIGTERM
# (the same stop, exit 75 and bit-exact resume), test_ctrl_c_to_torchrun's SIGINT, and
# tests/unit/test_signals.py (a press delivered twice, workers that ignore it)
@pytest.mark.extended
def test_first_ctrl_c_checkpoints_exits_75_and_resumes_bit_exact(ref1: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = start_in_own_group(kit.python_cmd(out, "data.num_workers=2"),
                              FFDIST_FAULT="slow:step=8-30:ms=150")
    kit.wait_for_step(out, 12, proc)
    ctrl_c(proc)
    time.sleep(0.05)
    ctrl_c(proc)  # the same press delivered twice (a launcher forwarding it): not an abort
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert stdout.count("received SIGINT (Ctrl-C): stopping after this step") == 1, stdout
    step = int(kit.latest(out)[5:13])
    assert 12 <= step < kit.STEPS and step % 5, f"stopped at {step}: not a fresh checkpoint"
    assert max(kit.train_losses(out)) == step

    resumed = kit.run(kit.python_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert f"resumed from step {step}" in resumed.stdout
    assert kit.train_losses(out) == kit.train_losses(ref1)
    kit.same_weights(out / "model.pt", ref1 / "model.pt")


# make test-all only: the fast tier covers its path through tests/unit/test_signals.py (the
# second press's line and exit 130, from the handler) and test_killed_rank.py (what a process
# ended without a checkpoint leaves, and its resume)
@pytest.mark.extended
def test_second_ctrl_c_aborts_with_one_line_and_exit_130(tmp_path: Path):
    out = tmp_path / "run"
    # steps 6.. sleep 3 s after they end: the stop request waits for the next step
    # boundary, and the second press comes before it
    proc = start_in_own_group(kit.python_cmd(out, "data.num_workers=2"),
                              FFDIST_FAULT="slow:step=6-30:ms=3000")
    kit.wait_for_step(out, 6, proc)
    ctrl_c(proc)
    time.sleep(signals.DUPLICATE_S + 0.4)
    ctrl_c(proc)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == signals.EXIT_ABORTED == 130, f"{stdout[-2000:]}\n{stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == ["ffdist: aborted by a second Ctrl-C, without a checkpoint of the current "
                     "step; the newest complete one is kept: start the same command again to "
                     "resume."], stderr
    assert kit.latest(out) == "step_00000005.pt"  # the stop's own checkpoint never came
    resumed = kit.run(kit.python_cmd(out))
    assert resumed.returncode == 0 and "resumed from step 5" in resumed.stdout, kit.explain(resumed)


def test_ctrl_c_to_torchrun_stops_both_ranks_at_the_same_step(ref2: Path, tmp_path: Path):
    out = tmp_path / "run"
    agent = start_in_own_group(kit.torchrun_cmd(out), FFDIST_FAULT="slow:step=8-30:ms=150")
    kit.wait_for_step(out, 12, agent)
    ctrl_c(agent)  # reaches torchrun only; it forwards SIGINT once to each worker
    stdout, stderr = agent.communicate(timeout=120)
    step = int(kit.latest(out)[5:13])
    assert 12 <= step < kit.STEPS, stdout + stderr
    assert stdout.count(f"stopped at step {step} on request") == 1, stdout
    # torchrun itself reports the signal with its own traceback (SignalException) and exit 1
    assert agent.returncode != 0
    resumed = kit.run(kit.torchrun_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert kit.train_losses(out) == kit.train_losses(ref2)


def test_ctrl_c_before_training_started_is_one_line(capfd, monkeypatch, tmp_path: Path):
    """Before ffdist.signals takes SIGINT over (imports, data, model), Python raises
    KeyboardInterrupt: main turns it into one line and 130 (in-process: where exactly a
    real Ctrl-C lands during start-up cannot be chosen from outside)."""
    from ffdist import data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "build", interrupted)
    code = train.main([str(RECIPES / "digits.yaml"), *kit.ARGS, f"output_dir={tmp_path / 'r'}"])
    err = capfd.readouterr().err
    assert code == 130
    assert err.strip() == ("ffdist: interrupted (Ctrl-C) before training started; start the "
                           "same command again.")
