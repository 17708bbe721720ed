"""The blocks of a model: the units FSDP shards one at a time (ffdist.strategies.fsdp) and
activation checkpointing recomputes (ffdist.models.checkpointing). One answer for both,
so that a checkpointed block is also what FSDP gathers around it.

`model.blocks` in a recipe names them (module names, as in `model.named_modules()`);
otherwise they are found by the model's family, first rule that matches:
    layer1, layer2, ...    ResNet / ResNeXt / Wide ResNet stages (torchvision and timm)
    encoder.layers.*       torchvision ViT's encoder blocks
    blocks.*               timm ViT/DeiT blocks, timm EfficientNet stages, MaxViT stages,
                           vit_tiny's blocks
    stages.*               timm ConvNeXt (and other timm stage models) stages
    features.*             torchvision ConvNeXt / EfficientNet / Swin / MobileNet / DenseNet:
                           the stem, the stages and the layers between them
Children without parameters (pools, activations) are no block (lenet's and small_cnn's
blocks are the convolutions of their `features`). A model none of these fits (googlenet,
inception_v3) has no blocks: FSDP shards it as one unit, and activation checkpointing is
refused with a sentence naming model.blocks.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from ffdist.errors import RecipeError

CONTAINERS = ("encoder.layers", "blocks", "stages", "features")
"""Modules whose children are the blocks, in the order they are tried (after layer1..)."""


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def found(model: nn.Module) -> list[str]:
    """The blocks of `model` by its family (the module docstring's rules), in forward order."""
    stages = sorted((n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)),
                    key=lambda n: int(n[5:]))
    if stages:
        return [n for n in stages if _has_params(getattr(model, n))]
    for container in CONTAINERS:
        parent = _submodule(model, container)
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            return [f"{container}.{n}" for n, child in parent.named_children()
                    if _has_params(child)]
    return []


def blocks(model: nn.Module, names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The module names of the blocks: `names` (model.blocks) checked against the model, or
    the ones its family has (`found`). RecipeError for a name that is not a submodule, or
    two names one inside the other."""
    if not names:
        return found(model)
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}?" if close else \
                f"its top-level modules are {', '.join(n for n, _ in model.named_children())}"
            raise RecipeError(f"model.blocks names {name!r}, which is not a module of this "
                              f"model; {hint} (`ffdist models --blocks <model.name>` lists "
                              "the blocks ffdist finds).")
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise RecipeError(f"model.blocks lists {a} and {b}, one inside the other; "
                                  "list blocks that do not overlap.")
    return list(names)


def modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    return [model.get_submodule(n) for n in names]
