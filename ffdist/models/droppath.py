"""Stochastic depth (Huang et al. 2016; timm's drop_path, torchvision's StochasticDepth).

torchvision's convnext / efficientnet / swin / maxvit have it built in: `model.drop_path_rate`
sets their `stochastic_depth_prob`, the rate of the last block, rising linearly over depth
by each family's own rule. torchvision's ResNets have none; here each residual block's
branch gets one, rate * i / (blocks - 1) for block i, as timm's ResNet does, through a
forward hook on the branch's last BatchNorm: the state-dict keys stay torchvision's, so
pretrained weights, checkpoints, eval and export are unchanged.

The drop masks come from torch's RNG on each rank inside the forward pass, like dropout:
exact through resume (the RNG is checkpointed), not the same across world sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from ffdist.errors import RecipeError

BUILT_IN = ("convnext", "efficientnet", "swin", "maxvit")
RESNETS = ("resnet", "resnext", "wide_resnet")


class _BranchDrop:
    """Forward hook: drop the residual branch (the hooked BatchNorm's output) per sample
    while its block trains. Reads the BLOCK's mode: a frozen BatchNorm is forced to eval
    mode (ffdist.finetune) but its block may still train."""

    def __init__(self, block: nn.Module, p: float):
        self.block, self.p = block, p

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import stochastic_depth

        return stochastic_depth(output, self.p, "row", self.block.training)


def resnet_drop_path(model: nn.Module, rate: float) -> int:
    """Hook a drop-path into every torchvision BasicBlock/Bottleneck; returns the count."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for i, block in enumerate(blocks):
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        p = rate * i / max(1, len(blocks) - 1)
        block.drop_path_rate = p  # for reading it back (tests, the run log)
        last_bn.register_forward_hook(_BranchDrop(block, p))
    return len(blocks)


def torchvision_model(name: str, num_classes: int, rate: float | None) -> nn.Module:
    """torchvision's model `name` with stochastic depth `rate` (None: its default)."""
    import torchvision
    from torchvision.ops import StochasticDepth

    build = torchvision.models.get_model
    if rate is None:
        return build(name, weights=None, num_classes=num_classes)
    if name.startswith(RESNETS):
        model = build(name, weights=None, num_classes=num_classes)
        resnet_drop_path(model, rate)
        return model
    try:
        model = build(name, weights=None, num_classes=num_classes, stochastic_depth_prob=rate)
    except TypeError:  # swin/maxvit builders fix it: rescale their linear schedule instead
        model = build(name, weights=None, num_classes=num_classes)
        layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
        top = max((m.p for m in layers), default=0.0)
        for m in layers:
            m.p = m.p * rate / top if top > 0 else 0.0
    if not any(isinstance(m, StochasticDepth) for m in model.modules()):
        raise RecipeError(f"model.drop_path_rate={rate}: torchvision's {name} has no stochastic "
                          f"depth; it exists for {', '.join(BUILT_IN + RESNETS)} models and "
                          "timm/<name> ones. Remove the key.")
    return model
