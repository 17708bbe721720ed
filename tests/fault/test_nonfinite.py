"""NaN/Inf loss on ONE of two ranks is seen by both (one all-reduced flag per step).

The NaN is injected into rank 1's loss only (FFDIST_FAULT=nan_loss:...:rank=1), the case
where a per-rank check would let the ranks disagree and deadlock.
"""

from __future__ import annotations

import torch

from ffdist.errors import EXIT_DIVERGED
from tests.fault import kit


def test_stop_policy_exits_3_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, "schedule.nan_policy=stop"),
                   FFDIST_FAULT="nan_loss:step=12:rank=1")
    assert proc.stderr.count(f"exitcode  : {EXIT_DIVERGED}") >= 1, kit.explain(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: error")]
    assert len(errors) == 1, errors  # printed once (rank 0), not once per rank
    assert "NaN/Inf at step 12" in errors[0] and "on 1 of 2 ranks" in errors[0]
    assert "step 10, is kept" in errors[0]
    assert kit.latest(out) == "step_00000010.pt"
    assert not (out / "checkpoints" / "step_00000015.pt").exists()
    assert max(kit.train_losses(out)) == 11, "no step after the NaN was logged"


def test_skip_policy_skips_on_every_rank_and_finishes(tmp_path):
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, "schedule.nan_policy=skip", "schedule.max_bad_steps=3"),
                   FFDIST_FAULT="nan_loss:step=12-13:rank=1")
    assert proc.returncode == 0, kit.explain(proc)
    train = [e for e in kit.metrics(out) if e.get("split") == "train"]
    assert [e.get("skipped_steps", 0) for e in train if e["step"] in (11, 12, 13, 14)] == [0, 1, 2, 2]
    final = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values())
    state = torch.load(out / "checkpoints" / "step_00000030.pt", weights_only=True)
    assert state["skipped_steps"] == 2


def test_skip_policy_stops_after_max_bad_steps_in_a_row(tmp_path):
    out = tmp_path / "run"
    proc = kit.run(kit.python_cmd(out, "schedule.nan_policy=skip", "schedule.max_bad_steps=3"),
                   FFDIST_FAULT="nan_loss:step=12-20")
    assert proc.returncode == EXIT_DIVERGED, kit.explain(proc)
    assert "3 steps in a row up to step 14" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
