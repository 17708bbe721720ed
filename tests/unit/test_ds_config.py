"""The DeepSpeed config derived from the recipe, and the JSON merge on top (no processes)."""

from __future__ import annotations

import json

import pytest
import torch

from ffdist import recipe_load
from ffdist.errors import RecipeError
from ffdist.resolved import plan_batches
from ffdist.strategies import ds_config
from tests.helpers import RECIPES, REPO

CPU = torch.device("cpu")


def _build(*overrides: str, precision: str = "bf16", world: int = 2) -> dict:
    rcp = recipe_load.load(RECIPES / "digits_zero2.yaml", list(overrides))
    plan = plan_batches(rcp.data.batch_size, rcp.data.micro_batch_size, world)
    return ds_config.build(rcp, plan, precision, CPU)


def test_config_is_derived_from_the_recipe():
    cfg = _build("optim.grad_clip=1.5", "strategy.zero_stage=3",
                 "strategy.offload_optimizer=true")
    # 64 global = 16 per micro-step x 2 micro-steps x 2 ranks
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (64, 16, 2)
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}  # no CUDA
    assert zero["offload_param"] == {"device": "none"}
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours: client optim + lr_at
    assert cfg["zero_allow_untested_optimizer"] is True  # torch SGD as client optimizer


def test_world_size_changes_accumulation_not_the_global_batch():
    cfg = _build(world=4, precision="fp32")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (64, 16, 1)
    assert cfg["bf16"]["enabled"] is False and cfg["gradient_clipping"] == 5.0


def _with_json(tmp_path, content: dict, *overrides: str) -> dict:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return _build(f"strategy.deepspeed_config={path}", *overrides)


def test_json_adds_settings_and_may_repeat_owned_ones(tmp_path):
    cfg = _with_json(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "train_batch_size": "auto", "gradient_clipping": 5,
                                "steps_per_print": 10})
    assert cfg["zero_optimization"]["overlap_comm"] is True
    assert cfg["train_batch_size"] == 64 and cfg["steps_per_print"] == 10


@pytest.mark.parametrize("content, key, ours, theirs", [
    ({"train_batch_size": 128}, "train_batch_size", "64", "128"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "2", "3"),
    ({"bf16": {"enabled": False}}, "bf16.enabled", "True", "False"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer.device", "'none'", "'cpu'"),
])
def test_json_contradicting_the_recipe_names_file_key_and_both_values(tmp_path, content, key,
                                                                      ours, theirs):
    with pytest.raises(RecipeError) as e:
        _with_json(tmp_path, content)
    msg = str(e.value)
    assert str(tmp_path / "ds.json") in msg and f"'{key}'" in msg
    assert ours in msg and theirs in msg and "\n" not in msg


def test_json_may_not_bring_its_own_optimizer_or_scheduler(tmp_path):
    with pytest.raises(RecipeError, match="'optimizer' is decided by the recipe"):
        _with_json(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}})
    with pytest.raises(RecipeError, match="'scheduler'"):
        _with_json(tmp_path, {"scheduler": {"type": "WarmupLR"}})


def test_missing_or_broken_json_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        _build(f"strategy.deepspeed_config={tmp_path / 'nope.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": ')
    with pytest.raises(RecipeError, match="not valid JSON at line 1"):
        _build(f"strategy.deepspeed_config={bad}")


@pytest.mark.parametrize("name, overrides", [
    ("zero2.json", ()),
    ("zero3_offload.json", ("strategy.zero_stage=3", "strategy.offload_optimizer=true",
                            "strategy.offload_params=true")),
])
def test_example_json_files_fit_their_recipes_and_deepspeed_accepts_them(name, overrides):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _build(f"strategy.deepspeed_config={REPO / 'launch/deepspeed' / name}", *overrides,
                 world=1)
    parsed = DeepSpeedConfig(cfg)  # DeepSpeed's own validation (pydantic, extra keys refused)
    assert parsed.zero_optimization_stage == cfg["zero_optimization"]["stage"]
    assert parsed.train_batch_size == 64
