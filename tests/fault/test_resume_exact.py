"""Exact resume, torn and corrupt checkpoints: real processes killed by real SIGKILLs.

One scenario, three guarantees:
1. a process SIGKILLed halfway through writing the checkpoint of step 15 leaves `latest`
   naming the complete step-10 checkpoint, which loads (torn save);
2. the newest checkpoint then truncated on disk is detected at resume, warned about, and
   the previous one (step 5) is used (corrupt checkpoint);
3. the resumed run logs the same per-step losses and writes the same final weights, bit
   for bit, as a run never stopped; metrics.jsonl and TensorBoard hold every step once.
A run killed between two log lines (a log window of 4 steps, checkpoints every 5) logs, after
its resume, the same lines as a run never stopped (the partial window travels in the
checkpoint), and counts its time and images over both segments.
And a run whose checkpoint was written by the previous format (2) resumes as exactly.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.fault import kit


def tb_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_killed_in_save_then_corrupt_newest_resumes_bit_exact(ref1: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = kit.python_cmd(out, "log.tensorboard=true")
    killed = kit.run(cmd, FFDIST_FAULT="kill_in_save:step=15")
    assert killed.returncode == -signal.SIGKILL, kit.explain(killed)

    ckpts = out / "checkpoints"
    assert kit.latest(out) == "step_00000010.pt"
    torn = list(ckpts.glob(".step_00000015.pt.tmp.*"))
    assert torn and torn[0].stat().st_size > 0, "the kill should leave a half-written temp file"
    assert not (ckpts / "step_00000015.pt").exists()
    assert torch.load(ckpts / "step_00000010.pt", weights_only=True)["step"] == 10

    # Now the newest complete checkpoint gets corrupted on disk (a bad sector, a full disk).
    newest = ckpts / "step_00000010.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])

    resumed = kit.run(cmd)
    assert resumed.returncode == 0, kit.explain(resumed)
    log = resumed.stdout + resumed.stderr
    assert "skipping unreadable checkpoint" in log and "step_00000010.pt" in log, log[-2000:]
    assert "resumed from step 5" in log, log[-2000:]
    assert not torn[0].exists(), "the stale temp file of the killed save is cleaned up"

    want, got = kit.train_losses(ref1), kit.train_losses(out)
    assert sorted(got) == list(range(1, kit.STEPS + 1)), "metrics.jsonl: a step missing"
    assert got == want, "per-step losses differ from the uninterrupted run"
    kit.same_weights(out / "model.pt", ref1 / "model.pt")
    assert tb_steps(out, "train/loss") == list(range(1, kit.STEPS + 1))
    assert len([e for e in kit.metrics(out) if e.get("event") == "end"]) == 1


def test_a_kill_between_log_lines_resumes_the_log_window_and_counts_both_segments(
        ref1_window4: Path, tmp_path: Path):
    ref, window = ref1_window4, kit.WINDOW4  # lines at 4, 8, 12, ...; checkpoints at 5, 10
    out = tmp_path / "run"
    killed = kit.run(kit.python_cmd(out, window), FFDIST_FAULT="kill:step=13")
    assert killed.returncode == -signal.SIGKILL, kit.explain(killed)
    resumed = kit.run(kit.python_cmd(out, window))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert "resumed from step 10" in resumed.stdout
    # the line at step 12 covers steps 9..12, two of them from before the kill
    want, got = kit.train_losses(ref), kit.train_losses(out)
    assert sorted(got) == [4, 8, 12, 16, 20, 22, 24, 28, 30]
    assert got == want, "the log lines differ from the uninterrupted run's"
    end, single = kit.metrics(out)[-1], kit.metrics(ref)[-1]
    assert end["event"] == "end" and end["segments"] == 2 and single["segments"] == 1
    assert end["images"] == single["images"] == kit.STEPS * 64
    # the first segment's time up to its step-10 checkpoint counts too
    assert end["seconds"] > end["segment_seconds"] > 0
    assert "finished in 2 segments, " in resumed.stdout and " in all, 30 steps" in resumed.stdout


# make test-all: test_ckpt_format.py's format-2 test covers the reading in the fast tier
@pytest.mark.extended
def test_a_format_2_checkpoint_resumes_bit_exact(ref1: Path, tmp_path: Path):
    """ffdist upgraded in the middle of a run: its newest checkpoint is a format-2 file."""
    from ffdist.checkpoint import read_checkpoint, save_torch
    from tests.unit.test_ckpt_format import encode_v2

    out = tmp_path / "run"
    shutil.copytree(ref1, out)
    (out / "model.pt").unlink()
    for ckpt in (out / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > 10:
            ckpt.unlink()
    step10 = out / "checkpoints" / "step_00000010.pt"
    save_torch(step10, encode_v2(read_checkpoint(step10), "single", None))
    (out / "checkpoints" / "latest").write_text("step_00000010.pt\n")
    assert torch.load(step10, weights_only=True)["format"] == 2

    resumed = kit.run(kit.python_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert "resumed from step 10" in resumed.stdout + resumed.stderr
    assert kit.train_losses(out) == kit.train_losses(ref1)
    kit.same_weights(out / "model.pt", ref1 / "model.pt")
