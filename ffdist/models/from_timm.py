"""`model.name: timm/<architecture>`: any timm model (timm is the optional extra
`pip install 'ffdist[timm]'`, imported only when a recipe names one)."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from ffdist.errors import FfdistError, RecipeError
from ffdist.recipe import ModelConfig

PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise RecipeError(f"model.name={name} needs timm, which is not installed: pip install "
                          "'ffdist[timm]' (or pip install timm).") from None
    return timm


def architecture(cfg: ModelConfig) -> str:
    """'timm/resnet50' -> 'resnet50', checked against timm's registry."""
    timm, arch = _timm(cfg.name), cfg.name[len(PREFIX):]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f"did you mean '{PREFIX}{close[0]}'?" if close else "see timm.list_models()."
        raise RecipeError(f"model.name={cfg.name!r}: timm has no architecture {arch!r}; {hint}")
    return arch


def build(cfg: ModelConfig, pretrained: bool = False) -> nn.Module:
    """timm.create_model with the recipe's classes, input channels, dropout before the
    classifier and stochastic depth (drop_path_rate; None: the architecture's default)."""
    timm, arch = _timm(cfg.name), architecture(cfg)
    if cfg.cifar_stem:
        raise RecipeError(f"model.cifar_stem=true applies to torchvision ResNets, not "
                          f"model.name={cfg.name}; remove it.")
    kwargs: dict[str, Any] = {"num_classes": cfg.num_classes, "in_chans": cfg.in_channels}
    if cfg.dropout:
        kwargs["drop_rate"] = cfg.dropout
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "drop_path_rate" in str(e) or "drop_rate" in str(e):
            raise RecipeError(f"model.name={cfg.name}: {e}; remove model.drop_path_rate / "
                              "model.dropout for this architecture.") from None
        raise


def pretrained_state(cfg: ModelConfig) -> dict:
    """timm's pretrained weights for the architecture (its own head: ffdist.finetune keeps
    the fresh one when the class count differs). Needs a network (Hugging Face Hub)."""
    timm, arch = _timm(cfg.name), architecture(cfg)
    try:
        model = timm.create_model(arch, pretrained=True)
    except (OSError, RuntimeError, ValueError) as e:  # offline, no such weights, hub errors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why if len(why) <= 160 else why[:160].rsplit(" ", 1)[0] + " ..."
        raise FfdistError(f"model.pretrained=true: timm could not get weights for {arch} "
                          f"({why}); this needs a network (Hugging Face Hub). Download them where "
                          "there is one (HF_HOME cache) or set model.pretrained to a local "
                          ".pt/.pth path.") from None
    return model.state_dict()


def head_name(model: nn.Module) -> str | None:
    """timm's own name for the classifier (pretrained_cfg['classifier'], e.g. 'head.fc')."""
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            return None
    return None
