"""Transfer learning: start from pretrained weights (`model.pretrained`) and freeze parts of
the model (`model.freeze`).

- pretrained 'true': torchvision's default weights for model.name, or timm's for a
  timm/<name> model (downloaded: needs a network); a path: an ffdist checkpoint, a run's
  model.pt or a plain state dict, read with weights_only=True. The classifier head
  (ffdist.models.head_name) keeps its fresh initialisation when its shape differs (another
  class count); any other mismatch is an error naming the key.
- freeze [backbone] = everything but the head; or name prefixes (`features`, `layer1`).
  Frozen parameters get requires_grad=False (ffdist.optim leaves them out of the
  optimizer) and frozen BatchNorm layers stay in eval mode: their running statistics are
  part of what was learned, and a small fine-tuning batch would overwrite them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ffdist.errors import CheckpointError, FfdistError, RecipeError
from ffdist.recipe import ModelConfig
from ffdist.weights import state_dict_from

log = logging.getLogger(__name__)


def prepare(model: nn.Module, cfg: ModelConfig, load_weights: bool = True) -> nn.Module:
    """Load `cfg.pretrained` (unless resuming: the checkpoint has the weights) and freeze."""
    if cfg.pretrained and load_weights:
        state = torchvision_weights(cfg) if cfg.pretrained.lower() == "true" else \
            local_weights(cfg.pretrained)
        load_pretrained(model, state, cfg.pretrained)
    if cfg.freeze and cfg.freeze != ["none"]:
        freeze(model, cfg.freeze)
    return model


def torchvision_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from ffdist.models import from_timm

    if from_timm.is_timm(cfg.name):  # timm/<name>: timm's weights from the Hugging Face Hub
        return from_timm.pretrained_state(cfg)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(cfg.name).DEFAULT
    except (ValueError, KeyError):
        raise RecipeError(f"model.pretrained=true: torchvision has no weights for "
                          f"model.name={cfg.name}; give a local .pt path instead.") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except OSError as e:  # URLError is an OSError: no network, proxy, DNS ...
        # the folder torch itself reads (torch.hub.get_dir honours TORCH_HOME and set_dir)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        name = weights.url.rsplit("/", 1)[-1]
        raise FfdistError(f"model.pretrained=true: downloading {weights} failed ({e}); this "
                          f"needs a network. Download {name} where there is one and put it "
                          f"into {cache}, or set model.pretrained to a local .pt/.pth "
                          "path.") from None


def local_weights(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise RecipeError(f"model.pretrained={path!r}: no such file; use 'true' (torchvision's "
                          "weights), null, or the path of a .pt/.pth file.")
    return state_dict_from(path, weights=None)  # a best.pt: the weights it was picked by


def _adapt_input_conv(key: str, weight: torch.Tensor, want: torch.Size) -> torch.Tensor | None:
    """RGB stem weights for a grey model: sum over the input channels (as timm does), so a
    grey image x gives the response the RGB model gives to (x, x, x)."""
    if weight.dim() == 4 and len(want) == 4 and want[1] == 1 and weight.shape[1] == 3 \
            and weight.shape[0] == want[0] and weight.shape[2:] == want[2:]:
        log.info("pretrained: %s summed over RGB for 1 input channel", key)
        return weight.sum(dim=1, keepdim=True)
    return None


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from ffdist.models import head_name

    own = model.state_dict()
    head = head_name(model) + "."
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"model.pretrained={source}: its keys do not match model.name "
                              f"({what}); use weights of the same architecture.")
    kept: dict[str, torch.Tensor] = {}
    reset: list[str] = []
    for key, value in state.items():
        want = own[key].shape
        if value.shape == want:
            kept[key] = value
        elif key.startswith(head):
            reset.append(key)  # another class count: keep the fresh head
        elif (adapted := _adapt_input_conv(key, value, want)) is not None:
            kept[key] = adapted
        else:
            raise CheckpointError(f"model.pretrained={source}: {key} has shape "
                                  f"{tuple(value.shape)} but the model wants {tuple(want)}; "
                                  "check model.name, model.in_channels and model.cifar_stem.")
    model.load_state_dict({**own, **kept})
    log.info("pretrained: %d of %d tensors loaded from %s", len(kept), len(own), source)
    if reset:
        log.info("pretrained: %s re-initialised (class count differs: %s)", head.rstrip("."),
                 ", ".join(reset))


def frozen_predicate(model: nn.Module, freeze: list[str]) -> Callable[[str], bool]:
    """name -> frozen?, for parameter and module names alike."""
    from ffdist.models import head_name

    if "backbone" in freeze:
        head = head_name(model)
        return lambda name: not (name == head or name.startswith(head + "."))
    names = [n for n, _ in model.named_parameters()]
    for prefix in freeze:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise RecipeError(f"model.freeze: {prefix!r} matches no parameter of "
                              f"{type(model).__name__}; use backbone or prefixes such as "
                              f"{', '.join(tops[:6])}.")
    return lambda name: any(name == p or name.startswith(p + ".") for p in freeze)


def freeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """requires_grad=False on the frozen parameters; frozen BatchNorm stays in eval mode."""
    is_frozen = frozen_predicate(model, prefixes)
    frozen = []
    for name, p in model.named_parameters():
        if is_frozen(name):
            p.requires_grad_(False)
            frozen.append(name)
    bns = [m for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and is_frozen(n)]
    for bn in bns:
        # A pre-forward hook rather than a train() override: Trainer, DDP and torch.compile
        # call model.train() wherever they like; the hook wins every time, right before the
        # layer runs, and it survives deepcopy and state_dict round trips untouched.
        bn.register_forward_pre_hook(_stay_in_eval)
    total = sum(1 for _ in model.parameters())
    log.info("freeze %s: %d of %d parameter tensors frozen, %d BatchNorm layers in eval mode",
             prefixes, len(frozen), total, len(bns))
    return frozen


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.training = False
