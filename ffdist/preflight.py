"""Checks that refuse a run before it starts, for what would otherwise fail at step 1 (or at
the first eval, epochs later) with a traceback from inside the model.

`check_sizes` is what the commands call (train, eval, plan, bench): every size the command
feeds the model, each with the recipe key that sets it."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ffdist.errors import DataError, shorten

if TYPE_CHECKING:
    from ffdist.recipe import DataConfig, ModelConfig, Recipe
    from ffdist.resolved import Resolved

PROBE_BELOW = 64
"""Image sides below which a CNN's strided convolutions and pooling may shrink the feature
map to nothing: probed with one real forward pass (~0.1 s on a CPU). Larger ones are left
to adaptive pooling, which takes any size."""
SMALL = ("small_cnn", "lenet")


def check_sizes(model: nn.Module, rcp: Recipe, resolved: Resolved, *,
                training: bool = True) -> None:
    """Refuse the sizes `model` cannot take: the training size (when the command trains or
    times training) and the eval size, which data.eval_image_size may make different."""
    sizes = [("data.image_size", resolved.image_size)] if training else []
    eval_key = "data.eval_image_size" if rcp.data.eval_image_size else "data.image_size"
    if (eval_key, resolved.eval_image_size) not in sizes:
        sizes.append((eval_key, resolved.eval_image_size))
    resizable = _resizable(rcp.data)
    for key, size in sizes:
        check_input_size(model, rcp.model, size, key if resizable else None,
                         data_name=rcp.data.name)


def _resizable(data: DataConfig) -> bool:
    """Whether data.image_size sets the image size (folders, synthetic data) rather than the
    dataset having its own (digits, MNIST, CIFAR): asked of ffdist.assemble.image_size, the
    one place that decides it, so the advice names a key that works."""
    from ffdist.assemble import image_size

    other = 2 if image_size(data) == 1 else 1  # any other valid side
    return image_size(replace(data, image_size=other)) == other


def check_input_size(model: nn.Module, cfg: ModelConfig, size: int, key: str | None,
                     data_name: str = "") -> None:
    """Refuse an image size the model cannot take: a fixed-size model (torchvision's
    VisionTransformer) given another, or a tiny image that a CNN pools away. `key` is the
    recipe key that sets `size`; None when the dataset's own size (`data_name`) decides,
    and no key can change it (the advice is then another model)."""
    name = cfg.name
    given = f"{size}x{size} images ({key}={size})" if key else \
        f"the {size}x{size} images of data.name={data_name} (its own size)"
    fixed = getattr(model, "image_size", None)
    if isinstance(fixed, int) and fixed != size:
        fix = f"set {key}={fixed}" if key else "use a CNN, e.g. model.name=small_cnn"
        raise DataError(f"model.name={name} takes {fixed}x{fixed} images, not {given}; {fix}.")
    if size >= PROBE_BELOW:
        return
    was_training = model.training
    model.eval()  # BatchNorm statistics untouched; one image is enough
    try:
        why = _fails(model, cfg.in_channels, size)
        if why is None:
            return
        # the advice names a size that was tried: the smallest power of two that passes
        works = next((s for s in (2, 4, 8, 16, 32, PROBE_BELOW) if s > size
                      and _fails(model, cfg.in_channels, s) is None), None) if key else None
        raise DataError(f"model.name={name} cannot take {given} ({why}); "
                        f"{_small_fix(name, key, works)}.")
    finally:
        model.train(was_training)


def _fails(model: nn.Module, channels: int, size: int) -> str | None:
    """Why one zero image of `size` does not pass through `model`, or None when it does."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError, AssertionError) as e:
        return shorten(str(e) or type(e).__name__, 140)
    return None


def _small_fix(name: str, key: str | None, works: int | None = None) -> str:
    """The advice for images too small for the model: a size that was tried and works, where
    a key sets it, else (or also) a model made for small images other than this one."""
    others = [m for m in SMALL if m != name]
    models = f"a model made for small images ({', '.join(others)}; ResNets with " \
             "model.cifar_stem=true)"
    if key is None:
        return f"use {models}"
    larger = f"set {key}={works} or larger" if works else f"use a larger {key}"
    return larger + ("" if name in SMALL else f", or {models}")
