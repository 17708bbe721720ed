"""The digits recipe end to end, as a user runs it."""

from pathlib import Path

import pytest
import torch

from ffdist import models, recipe_load
from tests.helpers import FAST, end_event, events, metrics, train


def test_default_recipe_reaches_98_percent_and_writes_the_run_dir(tmp_path: Path) -> None:
    train("digits.yaml", f"output_dir={tmp_path}", "log.progress=false")
    end = end_event(tmp_path)
    assert end["final_top1"] >= 0.98 and end["world_size"] == 1
    assert {"recipe.yaml", "metrics.jsonl", "tb", "checkpoints", "model.pt"} <= {
        p.name for p in tmp_path.iterdir()}
    assert any((tmp_path / "tb").iterdir())
    val = events(tmp_path, "val")
    assert len(val) == 20 and all(v["n"] == 360 for v in val)
    assert set(val[-1]) >= {"split", "epoch", "step", "loss", "top1", "top5", "n", "world_size"}
    # model.pt is a plain state dict that a fresh model loads as is
    r = recipe_load.load(tmp_path / "recipe.yaml")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    models.build(r.model).load_state_dict(state)
    ckpt = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# make test-all only; the fast tier covers its path: test_preemption's and test_resume_exact's
# bit-exact resumes
@pytest.mark.extended
def test_resume_continues_at_the_right_epoch_and_step(tmp_path: Path) -> None:
    common = (f"output_dir={tmp_path}", *FAST, "checkpoint.every_epochs=1", "log.every_steps=11")
    train("digits.yaml", "schedule.epochs=2", *common)
    assert end_event(tmp_path)["step"] == 44
    proc = train("digits.yaml", "schedule.epochs=4", "checkpoint.resume=extend", *common)
    assert "resumed from step 44 (epoch 2)" in proc.stdout
    steps = [e["step"] for e in metrics(tmp_path) if e.get("split") == "train"]
    assert steps == [11, 22, 33, 44, 55, 66, 77, 88]  # nothing repeated, nothing missing
    assert [e["epoch"] for e in events(tmp_path, "val")] == [0, 1, 2, 3]
    assert end_event(tmp_path)["step"] == 88


# make test-all only; the fast tier covers its path: tests/fault/test_run_dir.py's resume rules
@pytest.mark.extended
def test_resume_never_refuses_an_existing_run(tmp_path: Path) -> None:
    train("digits.yaml", f"output_dir={tmp_path}", *FAST, "schedule.max_steps=3")
    before = (tmp_path / "metrics.jsonl").read_bytes()
    proc = train("digits.yaml", f"output_dir={tmp_path}", *FAST, "checkpoint.resume=never",
                 check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
