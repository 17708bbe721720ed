"""`ffdist bench` on a recipe with model.freeze: it reports the frozen trainable count and
times the frozen model (bench and train share ffdist.assemble.build_trainer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, RECIPES, run

FROZEN = ("model.freeze=[backbone]", "data.batch_size=32")


def _counts() -> tuple[int, int]:
    from ffdist import models, recipe_load

    model = models.build(recipe_load.load(RECIPES / "digits.yaml").model)
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.head.parameters()))


# make test-all only: bench.json's frozen counts are in the fast tier through tests/workflow/
# test_agreement.py (resnet50.yaml freezes its backbone), the frozen step through the test below
@pytest.mark.extended
def test_bench_reports_the_frozen_trainable_count(tmp_path: Path) -> None:
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"),
                *FROZEN, f"output_dir={tmp_path}", "--steps", "3", "--warmup", "1",
                "--eval-steps", "1"])
    r = json.loads((tmp_path / "bench.json").read_text())
    total, head = _counts()
    assert head < total
    assert (r["params"], r["trainable_params"], r["freeze"]) == (total, head, ["backbone"])
    assert f"{total:,} ({head:,} trainable, freeze ['backbone'])" in proc.stdout


def test_bench_times_the_frozen_model(tmp_path: Path) -> None:
    """The steps bench times update the head only: the backbone is frozen in what it runs."""
    from ffdist import bench, bench_timing, dist, recipe_load

    rcp = recipe_load.load(RECIPES / "digits.yaml", [*FAST, *FROZEN, f"output_dir={tmp_path}",
                                                "precision=fp32"])
    info = dist.init()
    trainer = bench.setup(rcp, info)
    model = trainer.strategy.unwrap()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    timed = bench_timing.time_train(trainer, steps=2, warmup=1)
    assert len(timed["step_s"]) == 2
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed
    assert {k for k, v in model.named_parameters() if v.requires_grad} == changed
    assert not (tmp_path / "checkpoints").exists()  # bench writes nothing but bench.json
