"""ffdist.optim: the learning-rate schedules (warm-up then cosine, step, multistep) step by
step, and the parameter groups (no weight decay on biases and norms; frozen parameters
left out of the optimizer)."""

import math

import pytest
import torch

from ffdist import recipe_load
from ffdist.optim import build_optimizer, lr_at, param_groups


def _sched(*overrides: str):
    return recipe_load.load(None, list(overrides)).schedule


def test_warmup_then_cosine() -> None:
    s = _sched("schedule.epochs=10", "schedule.warmup_epochs=1", "schedule.scheduler=cosine")
    spe = 10
    assert lr_at(0, 1.0, s, spe) == pytest.approx(0.1)
    assert lr_at(5, 1.0, s, spe) == pytest.approx(0.55)
    assert lr_at(10, 1.0, s, spe) == pytest.approx(1.0)
    assert lr_at(55, 1.0, s, spe) == pytest.approx(0.5)
    assert lr_at(99, 1.0, s, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_step_and_multistep() -> None:
    s = _sched("schedule.scheduler=step", "schedule.step_size=7", "schedule.gamma=0.1")
    assert lr_at(6 * 5, 1.0, s, 5) == 1.0 and lr_at(7 * 5, 1.0, s, 5) == pytest.approx(0.1)
    m = _sched("schedule.scheduler=multistep", "schedule.milestones=[2,4]", "schedule.gamma=0.5")
    assert [lr_at(e * 3, 1.0, m, 3) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_no_decay_on_bias_and_frozen_params_left_out() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in groups) == 5  # 6 tensors, the frozen one excluded
    opt = build_optimizer(model, recipe_load.load(None, ["optim.name=adamw"]).optim, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
