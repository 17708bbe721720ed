"""Strategies wrap model + optimizer: single device, DDP, DeepSpeed ZeRO, FSDP; their registry.

The registry maps a name (recipe key strategy.name) to a class, imported when first asked
for: `"module:Class"` strings, so that importing ffdist imports no strategy's heavy library
(DeepSpeed's module imports `deepspeed` only when a DeepSpeed strategy is BUILT). A new
strategy is one file plus one line in REGISTRY, or `register(name, cls)` from outside
ffdist (docs/extending.md). What a strategy is (its checkpoint layout, memory rows,
refusals) is declared on its class (ffdist.strategies.base.Strategy); the functions here
answer questions about all of them, so that nothing outside this folder tests a name.

Every strategy is built from the same arguments, (model, recipe, resolved, info): the
recipe says what, `resolved` (ffdist.assemble.resolve) holds the batch plan and precision
derived once for the run, `info` (ffdist.dist.DistInfo) says where."""

from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ffdist.ckpt_format import Layout
from ffdist.dist import DistInfo
from ffdist.errors import CheckpointError, RecipeError
from ffdist.recipe import Recipe
from ffdist.strategies.base import Strategy

if TYPE_CHECKING:
    from ffdist.resolved import Resolved

REGISTRY: dict[str, str | type[Strategy]] = {
    "single": "ffdist.strategies.single:SingleDevice",
    "ddp": "ffdist.strategies.ddp:DDP",
    "deepspeed": "ffdist.strategies.deepspeed:DeepSpeed",
    "fsdp": "ffdist.strategies.fsdp:FSDP",
}
AUTO = ("single", "ddp")
"""strategy.name=auto: the first for one process, the second for several."""


def register(name: str, target: str | type[Strategy]) -> None:
    """Add (or replace) strategy `name`: a class, or "module:Class" to import when asked."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "auto":
        raise ValueError(f"strategy name {name!r}: lower-case letters, digits and _, not auto")
    REGISTRY[name] = target if isinstance(target, str) else _checked(target)


def names() -> list[str]:
    """The registered strategy names, in registration order (`auto` is not one)."""
    return list(REGISTRY)


def get(name: str) -> type[Strategy]:
    """The class registered as `name` (imported now if it was not); a RecipeError for a name
    that is not registered."""
    target = REGISTRY.get(name)
    if target is None:
        close = difflib.get_close_matches(name, ["auto", *REGISTRY], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RecipeError(f"strategy.name={name} is not a strategy{hint}; use auto, "
                          f"{', '.join(REGISTRY)}.")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = REGISTRY[name] = _checked(getattr(importlib.import_module(module), attr))
    return target


def _checked(cls: type[Strategy]) -> type[Strategy]:
    if cls.layout_format not in cls.reads:  # it could not resume its own checkpoints
        raise TypeError(f"{cls.__name__}.reads must include its layout_format "
                        f"{cls.layout_format!r}")
    return cls


def resolve_name(recipe: Recipe, world_size: int, check: bool = True) -> str:
    """strategy.name with `auto` decided for the world size (called by ffdist.assemble
    only). `check` (commands that train): refuse a name that is not registered, and a
    one-process strategy (single) when several processes were started; a strategy that
    trains as another one alone (DDP: single) is named so for one process. Without it (eval,
    predict: they run the plain model) the name is only carried along, so a run trained
    with a strategy registered elsewhere still evaluates here."""
    name = recipe.strategy.name
    if name == "auto":
        return AUTO[1] if world_size > 1 else AUTO[0]
    if not check:
        return name
    cls = get(name)
    if cls.one_process and world_size > 1:
        raise RecipeError(f"strategy.name={name} but {world_size} processes were started; "
                          "use strategy.name=ddp (or auto), or start one process.")
    return cls.alone if world_size == 1 and cls.alone else name


def build(model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo,
          blocks: list[str] | None = None) -> Strategy:
    """The run's strategy; `blocks` (the model's blocks, ffdist.models.blocks) goes to a
    strategy that declares `uses_blocks`."""
    cls = get(resolved.strategy)
    if cls.uses_blocks:
        return cls(model, recipe, resolved, info, blocks=list(blocks or []))  # type: ignore[call-arg]
    return cls(model, recipe, resolved, info)


def layout_format_of(name: str) -> str:
    """The checkpoint format strategy `name` writes (auto: what both of AUTO write); a name
    that is not registered here stands for itself."""
    if name == "auto":
        formats = {get(n).layout_format for n in AUTO}
        return formats.pop() if len(formats) == 1 else name
    return get(name).layout_format if name in REGISTRY else name


def check_resume(saved: Layout, step: int, source: str | Path, recipe: Recipe,
                 resolved: Resolved) -> None:
    """Refuse (CheckpointError, one sentence) a checkpoint of layout `saved` that this run's
    strategy cannot continue: a format it does not read (naming the strategies that do),
    or what its own check_resume refuses (another world size, other layout parameters)."""
    mine = get(resolved.strategy)
    if saved.format in mine.reads:
        mine.check_resume(saved, source, recipe, resolved)
        return
    readers = [n for n in names() if saved.format in get(n).reads]
    if readers:
        what = get(readers[0]).describe(saved)
        fix = f"resume it with strategy.name={' or '.join(readers)}"
    else:
        what = f"a checkpoint of format {saved.format!r} ({saved.world_size} ranks)"
        fix = "no strategy here reads it: resume it where that strategy is registered"
    raise CheckpointError(
        f"the checkpoint at step {step} holds {what}, which strategy.name={resolved.strategy} "
        f"cannot resume; {fix}, or start from its weights with "
        "model.pretrained=<run>/model.pt.")


def memory_rows() -> dict[str, type[Strategy]]:
    """Every row of `ffdist plan` -> the class that computes it, in registration order (a
    row two classes declare, DDP's, is computed by the first)."""
    rows: dict[str, type[Strategy]] = {}
    for name in names():
        cls = get(name)
        for row in cls.memory_rows:
            rows.setdefault(row, cls)
    return rows


def row_overrides() -> dict[str, str]:
    """Row of `ffdist plan` -> the overrides that train as it."""
    return {row: cls.memory_rows[row] for row, cls in memory_rows().items()}


__all__ = ["AUTO", "REGISTRY", "Strategy", "build", "check_resume", "get", "layout_format_of",
           "memory_rows", "names", "register", "resolve_name", "row_overrides"]
