"""model.pool: gem trains, and its exponent p is learned (it moves from 3)."""

from __future__ import annotations

from pathlib import Path

import torch

from ffdist.train import run


def test_gem_pooling_trains_and_learns_p(tmp_path: Path):
    end = run("recipes/digits.yaml", ["model.pool=gem", "schedule.epochs=2", "precision=fp32",
                                      f"output_dir={tmp_path}", "log.tensorboard=false",
                                      "log.progress=false"])
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "pool.p" in state and abs(float(state["pool.p"]) - 3.0) > 1e-3
    assert end["final_top1"] > 0.5  # learning, not chance (0.1)
