"""The model seam as docs/extending.md describes it: a model class registered with one line
in ffdist.models.OWN (tests/models_probe.py holds the doc's worked example) trains, is
evaluated from its run, and its blocks (found by the `blocks` container rule) are what
activation checkpointing and FSDP use; no other file of ffdist knows the model."""

from __future__ import annotations

import sys

from tests.helpers import CPU, RECIPES, metrics, run

PROBE = [sys.executable, "-m", "tests.models_probe"]


def test_a_registered_model_trains_with_its_blocks_checkpointed_and_evaluates(tmp_path):
    out = tmp_path / "run"
    proc = run([*PROBE, "ffdist.train", str(RECIPES / "digits.yaml"), "model.name=tiny_mlp",
                "model.in_channels=1", "schedule.epochs=2", "precision=fp32", CPU,
                "model.activation_checkpointing=blocks", f"output_dir={out}"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metrics(out) if r.get("split") == "val"]
    assert len(evals) == 2 and evals[-1]["top1"] > 0.5  # it learns digits, well above 1/10
    proc = run([*PROBE, "ffdist.evaluate", str(out)], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top1" in proc.stdout


def test_a_registered_model_lists_its_blocks(tmp_path):
    proc = run([*PROBE, "ffdist.model_names", "--blocks", "tiny_mlp"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blocks.0" in proc.stdout and "blocks.1" in proc.stdout
