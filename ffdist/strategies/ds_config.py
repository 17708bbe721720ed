"""The DeepSpeed config, DERIVED from the recipe so that the two can never disagree.

What the recipe owns (batch arithmetic, precision, clipping, ZeRO stage and offload) is
written here from the recipe; an optional JSON file (`strategy.deepspeed_config`, examples
in launch/deepspeed/) is merged on top and may ADD settings (bucket sizes, overlap_comm,
prefetch, ...). A JSON value for an owned key must equal the derived one (or be "auto", as
in Hugging Face's DeepSpeed configs); anything else is a RecipeError naming both values.
The optimizer and the learning-rate schedule are ours too: the optimizer is built by
ffdist.optim and handed to DeepSpeed as a client optimizer, and the lr is set before every
step from ffdist.optim.lr_at, so an "optimizer" or "scheduler" section is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ffdist.errors import RecipeError
from ffdist.recipe import Recipe, flatten
from ffdist.resolved import BatchPlan

# DeepSpeed key (dotted) -> the recipe key that decides it (for error messages).
OWNED = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size (per rank)",
    "gradient_accumulation_steps": "data.batch_size / world size / data.micro_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_params",
}
# Whole sections a JSON file may not bring in, and the recipe keys that replace them.
REFUSED = {
    "optimizer": "optim.name/lr/momentum/betas/weight_decay",
    "scheduler": "optim.lr and schedule.*",
    "amp": "precision",
    "torch_autocast": "precision",
}


def derive(recipe: Recipe, plan: BatchPlan, precision: str) -> dict[str, Any]:
    """The recipe-owned part of the config."""
    s = recipe.strategy
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu" if s.offload_optimizer else "none"}
        zero["offload_param"] = {"device": "cpu" if s.offload_params else "none"}
    return {
        # DeepSpeed checks train_batch_size == micro * accumulation * world size.
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": float(recipe.optim.grad_clip or 0.0),  # 0: DeepSpeed's "off"
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
    }


def defaults(device: torch.device) -> dict[str, Any]:
    """Settings the JSON file may change."""
    return {
        # torch.optim.SGD (our client optimizer) is not on ZeRO's list of tested optimizers.
        "zero_allow_untested_optimizer": True,
        # With offload, keep our torch optimizer instead of DeepSpeedCPUAdam, whose C++
        # JIT build takes ~95 s and which would ignore optim.name=sgd.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,  # ffdist's monitor logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "_pin_memory": device.type == "cuda",  # applied to offload sections below
    }


def build(recipe: Recipe, plan: BatchPlan, precision: str, device: torch.device) -> dict:
    """derived + defaults + the JSON file, checked."""
    owned = derive(recipe, plan, precision)
    extra = load_json(recipe.strategy.deepspeed_config)
    source = recipe.strategy.deepspeed_config or ""
    for key, why in REFUSED.items():
        if key in extra:
            raise RecipeError(f"{source}: '{key}' is decided by the recipe ({why}); remove "
                              f"the '{key}' section from the JSON and set {why} instead.")
    flat = flatten(extra)
    owned_flat = flatten(owned)
    for key, value in flat.items():
        if key in owned_flat and value != "auto" and not _same(value, owned_flat[key]):
            raise RecipeError(
                f"{source}: '{key}'={value!r} contradicts the recipe, which derives "
                f"{owned_flat[key]!r} from {OWNED.get(key, 'the recipe')}; remove the key from "
                f"the JSON (or use \"auto\") or change the recipe.")
    cfg = _merge(_merge(defaults(device), extra), owned)  # owned values win ("auto" too)
    pin = cfg.pop("_pin_memory")
    for section in ("offload_optimizer", "offload_param"):
        off = cfg.get("zero_optimization", {}).get(section)
        if isinstance(off, dict) and off.get("device") not in (None, "none"):
            off.setdefault("pin_memory", pin)  # page-locked host memory: a CUDA-only gain
    return cfg


def load_json(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"strategy.deepspeed_config={path}: no such file; give the path of "
                          "a JSON file (examples in launch/deepspeed/) or null.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} "
                          f"({e.msg}); fix the syntax there.") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a DeepSpeed config is a JSON object, not a "
                          f"{type(data).__name__}.")
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b



def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v != "auto" or k not in out:
            out[k] = v
    return out
