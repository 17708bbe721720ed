"""Strategies wrap model + optimizer: single device, DDP, DeepSpeed ZeRO."""

from __future__ import annotations

from torch import nn

from ffdist.dist import DistInfo
from ffdist.errors import RecipeError
from ffdist.recipe import Recipe
from ffdist.strategies.base import Strategy


def resolve_name(recipe: Recipe, info: DistInfo) -> str:
    name = recipe.strategy.name
    if name == "auto":
        return "ddp" if info.world_size > 1 else "single"
    if name == "single" and info.world_size > 1:
        raise RecipeError(f"strategy.name=single but {info.world_size} processes were started; "
                          "use strategy.name=ddp (or auto), or start one process.")
    return name


def build(model: nn.Module, recipe: Recipe, info: DistInfo, precision: str) -> Strategy:
    name = resolve_name(recipe, info)
    if name == "deepspeed":
        from ffdist.strategies.deepspeed import DeepSpeed  # lazy: imports deepspeed

        return DeepSpeed(model, recipe, info, precision)
    if name == "ddp" and info.world_size > 1:
        from ffdist.strategies.ddp import DDP

        return DDP(model, recipe, info.device, precision)
    from ffdist.strategies.single import SingleDevice

    return SingleDevice(model, recipe, info.device, precision)


__all__ = ["Strategy", "build", "resolve_name"]
