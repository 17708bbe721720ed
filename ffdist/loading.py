"""Load what a finished run left behind: its recipe, its weights, its data description.

Shared by `ffdist eval`, `ffdist predict` and `ffdist export`, so that all three see the
model exactly as training built it (same registry, same input size, same normalization).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ffdist import recipe_load
from ffdist.assemble import build_model, eval_image_size
from ffdist.errors import CheckpointError
from ffdist.recipe import Recipe
from ffdist.weights import read_weights


def load_recipe(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise CheckpointError(_not_a_run(Path(run_dir)))
    # output_dir is the run's own folder, wherever it was moved to.
    return recipe_load.load(path, [*overrides, f"output_dir={Path(run_dir)}"])


def _not_a_run(run_dir: Path) -> str:
    """Why `run_dir` is not a run folder, and where the runs are."""
    parent = run_dir.parent
    if not run_dir.exists():
        command = "ffdist runs" if parent == Path("runs") else f"ffdist runs {parent}"
        listing = (f"`{command}` lists the runs there" if parent.is_dir()
                   else f"{parent} does not exist either")
        return f"{run_dir} does not exist; give the folder of a training run ({listing})."
    if not run_dir.is_dir():
        return f"{run_dir} is a file; give the folder of a training run (runs/<name>)."
    return (f"{run_dir}: no recipe.yaml there; give the directory of a training run "
            "(runs/<name>).")


def run_weights(rcp: Recipe, path: str | Path, weights: str | None = None
                ) -> tuple[dict[str, torch.Tensor], str]:
    """The weights eval, predict and export use from a run's file, and which they are:
    `weights` (raw | ema) or, unset, those best.pt was picked by (checkpoint.best_weights:
    it then gives the run's best value) and for any other file the run's
    checkpoint.final_weights (what model.pt holds), so that a checkpoint and model.pt
    give the same model by default."""
    if weights == "ema" and rcp.optim.ema_decay == 0:  # no file of the run holds an EMA
        raise CheckpointError(f"--weights ema, but the run of {path} trained without an EMA "
                              "of its weights (optim.ema_decay=0); use --weights raw.")
    return read_weights(path, weights, plain_holds=rcp.checkpoint.final_weights)


def weights_path(run_dir: Path, checkpoint: str | None) -> Path:
    """--checkpoint PATH if given, else the run's model.pt, else its newest checkpoint."""
    if checkpoint:
        return Path(checkpoint)
    if (run_dir / "model.pt").is_file():
        return run_dir / "model.pt"
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        return run_dir / "checkpoints" / latest.read_text().strip()
    raise CheckpointError(f"{run_dir}: no model.pt and no checkpoint; finish the training run, "
                          "or name the weights with --checkpoint PATH.")


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
    load_into(model, run_weights(rcp, path, weights)[0], path)
    model.eval()
    return RunModel(rcp, model, classes, channels, size, tuple(mean), tuple(std), path,
                    source.folder_like, rcp.data.eval_resize_size, rcp.data.interpolation)
