"""Checks that refuse a run before it starts, for what would otherwise fail at step 1
with a traceback from inside the model."""

from __future__ import annotations

import torch
from torch import nn

from ffdist.errors import DataError, shorten

PROBE_BELOW = 64
"""Image sides below which a CNN's strided convolutions and pooling may shrink the feature
map to nothing: probed with one real forward pass (~0.1 s on a CPU). Larger ones are left
to adaptive pooling, which takes any size."""
SMALL = ("small_cnn", "lenet")


def check_input_size(model: nn.Module, name: str, channels: int, size: int) -> None:
    """Refuse an image size the model cannot take: a fixed-size model (torchvision's
    VisionTransformer) given another, or a tiny image that a CNN pools away."""
    fixed = getattr(model, "image_size", None)
    if isinstance(fixed, int) and fixed != size:
        raise DataError(f"model.name={name} takes {fixed}x{fixed} images, but the data gives "
                        f"{size}x{size}; set data.image_size={fixed}.")
    if size >= PROBE_BELOW:
        return
    was_training = model.training
    model.eval()  # BatchNorm statistics untouched; one image is enough
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError, AssertionError) as e:
        other = "" if name in SMALL else (", or a model made for small images (small_cnn, "
                                          "lenet; ResNets with model.cifar_stem=true)")
        raise DataError(f"model.name={name} cannot take {size}x{size} images "
                        f"({shorten(str(e) or type(e).__name__, 140)}); use a larger "
                        f"data.image_size{other}.") from None
    finally:
        model.train(was_training)
