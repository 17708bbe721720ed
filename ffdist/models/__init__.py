"""Model registry: every torchvision classification model by name, our small ones (lenet,
small_cnn, vit_tiny), and any timm architecture as `timm/<name>` (with timm installed).
A model's blocks (FSDP's units, activation checkpointing's regions): `blocks(model, names)`
(ffdist.models.model_blocks); activation checkpointing itself: ffdist.models.checkpointing."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
from torch import nn

from ffdist.errors import RecipeError
from ffdist.models import droppath, from_timm
from ffdist.models.model_blocks import blocks
from ffdist.models.small import LeNet, SmallCNN
from ffdist.models.vit_tiny import VitTiny
from ffdist.recipe import ModelConfig

OWN: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet, "small_cnn": SmallCNN,
                                            "vit_tiny": VitTiny}
WITH_DROP_PATH = ("vit_tiny",)
"""Own models with residual blocks that take model.drop_path_rate."""
HEAD_NAMES = ("fc", "classifier", "heads", "head")


def available() -> list[str]:
    import torchvision

    return sorted(set(OWN) | set(torchvision.models.list_models(module=torchvision.models)))


class GeM(nn.Module):
    """Generalized-mean pooling (Radenović et al.): (mean x^p)^(1/p) with a learned p;
    p=1 is average pooling, p->inf max pooling. Used for retrieval-style CNN heads."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, output_size: int | tuple = 1):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps
        self.output_size = output_size  # the replaced pool's grid (SmallCNN keeps 2x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        pooled = nn.functional.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), self.output_size)
        return pooled.pow(1.0 / p)


def head_name(model: nn.Module) -> str:
    """Attribute holding the classifier ('fc' for ResNets, 'classifier', 'heads', 'head'),
    or timm's dotted name for it ('head.fc' for timm's ConvNeXt)."""
    named = from_timm.head_name(model)
    if named:
        return named
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise RecipeError(f"{type(model).__name__} has none of the classifier attributes "
                      f"{HEAD_NAMES}; model.freeze=[backbone] and pretrained heads need one.")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, child.bias is not None))
                return


def _cifar_stem(model: nn.Module, cfg: ModelConfig) -> None:
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise RecipeError(f"model.cifar_stem=true applies to ResNets only, not "
                          f"model.name={cfg.name}; remove it.")
    model.conv1 = nn.Conv2d(cfg.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def _set_pool(model: nn.Module, cfg: ModelConfig) -> None:
    for attr in ("avgpool", "pool"):
        pool = getattr(model, attr, None)
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            setattr(model, attr, GeM(output_size=pool.output_size))
            return
    raise RecipeError(f"model.pool=gem needs a CNN with an adaptive average pool; "
                      f"model.name={cfg.name} has none. Use model.pool=avg.")


def check_name(name: str) -> None:
    """RecipeError unless `name` is in the registry (without building anything)."""
    if name in OWN:
        return
    if from_timm.is_timm(name):
        from_timm.architecture(ModelConfig(name=name))  # the extra installed, the name known
        return
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `ffdist models`."
        raise RecipeError(f"model.name={name!r} is not a known model; {hint}")


def has_small_image_stem(name: str) -> bool:
    """Whether model.cifar_stem applies to `name`: a torchvision ResNet (conv1 + max-pool)."""
    if name in OWN or from_timm.is_timm(name):
        return False
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        return False
    return builder.__module__ == "torchvision.models.resnet"


def build(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for the recipe (pretrained weights: ffdist.finetune)."""
    for key in ("num_classes", "cifar_stem"):
        if getattr(cfg, key) == "auto":  # ffdist.assemble.settle decides it, from the data
            raise RecipeError(f"model.{key}=auto is decided from the data when a run starts "
                              "(ffdist train, bench, plan); give a value here, e.g. the one "
                              "in the run's recipe.yaml.")
    check_name(cfg.name)
    if cfg.name in OWN:
        extra = {"drop_path_rate": cfg.drop_path_rate or 0.0} if cfg.name in WITH_DROP_PATH else {}
        if cfg.drop_path_rate and not extra:
            raise RecipeError(f"model.drop_path_rate: {cfg.name} has no residual blocks to drop; "
                              "remove the key (model.dropout regularizes its head).")
        model = OWN[cfg.name](num_classes=cfg.num_classes, in_channels=cfg.in_channels,
                              dropout=cfg.dropout, **extra)
    elif from_timm.is_timm(cfg.name):
        model = from_timm.build(cfg)
    else:
        model = droppath.torchvision_model(cfg.name, cfg.num_classes, cfg.drop_path_rate)
        if cfg.cifar_stem:
            _cifar_stem(model, cfg)
        elif cfg.in_channels != 3:
            _replace_first_conv(model, cfg.in_channels)
    if cfg.pool == "gem":
        _set_pool(model, cfg)
    return model


__all__ = ["GeM", "OWN", "available", "blocks", "build", "check_name", "head_name"]
