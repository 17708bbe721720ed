"""Strategies wrap model + optimizer: single device, DDP, DeepSpeed ZeRO.

Every strategy is built from the same arguments, (model, recipe, resolved, info): the
recipe says what, `resolved` (ffdist.assemble.resolve) holds the batch plan and precision
derived once for the run, `info` (ffdist.dist.DistInfo) says where."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ffdist.dist import DistInfo
from ffdist.errors import RecipeError
from ffdist.recipe import Recipe
from ffdist.strategies.base import Strategy

if TYPE_CHECKING:
    from ffdist.resolved import Resolved


def resolve_name(recipe: Recipe, world_size: int, check: bool = True) -> str:
    """strategy.name with `auto` decided for the world size (called by ffdist.assemble
    only). `check`: refuse a single-device strategy with several processes."""
    name = recipe.strategy.name
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    if check and name == "single" and world_size > 1:
        raise RecipeError(f"strategy.name=single but {world_size} processes were started; "
                          "use strategy.name=ddp (or auto), or start one process.")
    return name


def build(model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo) -> Strategy:
    if resolved.strategy == "deepspeed":
        from ffdist.strategies.deepspeed import DeepSpeed  # lazy: imports deepspeed

        return DeepSpeed(model, recipe, resolved, info)
    if resolved.strategy == "ddp" and info.world_size > 1:
        from ffdist.strategies.ddp import DDP

        return DDP(model, recipe, resolved, info)
    from ffdist.strategies.single import SingleDevice

    return SingleDevice(model, recipe, resolved, info)


__all__ = ["Strategy", "build", "resolve_name"]
