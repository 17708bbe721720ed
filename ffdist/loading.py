"""Load what a finished run left behind: its recipe, its weights, its data description.

Shared by `ffdist eval`, `ffdist predict` and `ffdist export`, so that all three see the
model exactly as training built it (same registry, same input size, same normalization).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ffdist.checkpoint import load_torch
from ffdist.errors import CheckpointError, RecipeError
from ffdist.recipe import Recipe
from ffdist.state_dicts import clean_state_dict


def split_checkpoint_arg(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`checkpoint=PATH` (no dot) names weights; `checkpoint.keep_last=...` stays a recipe key."""
    path, rest = None, []
    for item in overrides:
        if item.startswith("checkpoint="):
            path = item.split("=", 1)[1]
        else:
            rest.append(item)
    return path, rest


def split_weights_arg(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`weights=raw|ema` (no dot): which weights of a checkpoint to use (see run_weights)."""
    kind, rest = None, []
    for item in overrides:
        if item.startswith("weights="):
            kind = check_weights_kind(item.split("=", 1)[1], "weights")
        else:
            rest.append(item)
    return kind, rest


def check_weights_kind(kind: str | None, flag: str) -> str | None:
    if kind not in (None, "raw", "ema"):
        raise RecipeError(f"{flag}={kind}: use raw (the trained weights) or ema (their "
                          "moving average, in checkpoints of runs with optim.ema_decay > 0).")
    return kind


def load_recipe(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    from ffdist import recipe

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no recipe.yaml there; give the directory of a "
                              "training run (runs/<name>).")
    # output_dir is the run's own folder, wherever it was moved to.
    return recipe.load(path, [*overrides, f"output_dir={Path(run_dir)}"])


def state_dict_from(path: str | Path, weights: str = "raw",
                    plain_holds: str | None = None) -> dict[str, torch.Tensor]:
    """Model weights from an ffdist checkpoint ({"model": ...}), a run's model.pt or a plain
    (torchvision) state dict; read with weights_only=True. Any checkpoint format version
    will do: only its "model" (weights=raw) or its EMA section (weights=ema) is read
    (ffdist.ckpt_format). A plain state dict is what it is: `plain_holds` names which
    weights it holds (a run's model.pt: its checkpoint.final_weights), checked against
    `weights`."""
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a checkpoint folder of shards (e.g. DeepSpeed "
                              "ZeRO's), whose weights are split over the ranks' files; give the "
                              "run's model.pt or checkpoints/best.pt (consolidated weights) "
                              "instead.")
    obj = load_torch(path)
    if isinstance(obj, dict) and ("format" in obj or isinstance(obj.get("model"), dict)):
        obj = _checkpoint_weights(obj, weights, path)
    elif plain_holds is not None and weights != plain_holds:
        raise CheckpointError(
            f"{path} holds the {plain_holds} weights only (checkpoint.final_weights="
            f"{plain_holds}); the {weights} ones are in the run's checkpoints: pass "
            "checkpoint=<run>/checkpoints/best.pt (or a step_*.pt) with it.")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no model state dict; give an ffdist checkpoint, "
                              "a run's model.pt or a plain state dict of tensors.")
    return clean_state_dict(obj)


def _checkpoint_weights(obj: dict, weights: str, path: str | Path) -> object:
    if weights == "raw":
        return obj.get("model")
    ema = obj.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow"), dict):
        raise CheckpointError(f"{path} holds no EMA of the weights (its run trained with "
                              "optim.ema_decay=0); use weights=raw.")
    return ema["shadow"]


def run_weights(rcp: Recipe, path: str | Path, weights: str | None = None
                ) -> tuple[dict[str, torch.Tensor], str]:
    """The weights eval, predict and export use from a run's file, and which they are:
    `weights` (raw | ema) or, unset, the run's checkpoint.final_weights (what model.pt
    holds), so that a checkpoint and model.pt give the same model by default."""
    final = rcp.checkpoint.final_weights
    kind = weights or final
    return state_dict_from(path, kind, plain_holds=final), kind


def weights_path(run_dir: Path, checkpoint: str | None) -> Path:
    """checkpoint=PATH if given, else the run's model.pt, else its newest checkpoint."""
    if checkpoint:
        return Path(checkpoint)
    if (run_dir / "model.pt").is_file():
        return run_dir / "model.pt"
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        return run_dir / "checkpoints" / latest.read_text().strip()
    raise CheckpointError(f"{run_dir}: no model.pt and no checkpoint; finish the training run, "
                          "or name the weights (ffdist eval: checkpoint=PATH; ffdist predict "
                          "and export: --checkpoint PATH).")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{source} does not fit the recipe's model ({first[:200]}); "
                              "evaluate it with the recipe it was trained with.") from None


@dataclass
class RunModel:
    recipe: Recipe
    model: nn.Module
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]   # 0..255 scale, as the uint8 pipeline uses
    std: tuple[float, ...]
    weights: Path
    folder_data: bool         # the source is folder-like: resize + center crop like eval
    eval_resize: int | None = None  # folders: short side before the crop (None: size/0.875)
    interpolation: str = "bilinear"


def load_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
             checkpoint: str | None = None, weights: str | None = None) -> RunModel:
    """The run's model (eval mode, CPU) with its weights (`run_weights`: raw | ema | None,
    the run's checkpoint.final_weights), and its data description: what the run's data
    source declares (ffdist.data.sources), without building the data (an ImageNet-size
    folder is not scanned for a class list)."""
    from ffdist.assemble import build_model, eval_image_size
    from ffdist.data import sources

    run_dir = Path(run_dir)
    rcp = load_recipe(run_dir, overrides)
    source = sources.get(rcp.data.name)
    size = eval_image_size(rcp.data)  # served at the EVAL size, as ffdist.assemble resolves it
    classes = source.classes(rcp.data, rcp.model.num_classes)
    channels = rcp.model.in_channels  # training checked that the data has as many
    mean, std = source.normalization(channels)
    model = build_model(rcp, load_weights=False)  # as training built it; weights below
    path = weights_path(run_dir, checkpoint)
    load_into(model, run_weights(rcp, path, check_weights_kind(weights, "--weights"))[0], path)
    model.eval()
    return RunModel(rcp, model, classes, channels, size, tuple(mean), tuple(std), path,
                    source.folder_like, rcp.data.eval_resize_size, rcp.data.interpolation)
