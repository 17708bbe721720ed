"""The run directory: decide fresh / resume, refuse to clobber, write the resolved recipe."""

from __future__ import annotations

import os
from pathlib import Path

from ffdist.checkpoint import CheckpointManager, read_checkpoint, save_text
from ffdist.ckpt_format import Checkpoint
from ffdist.errors import CheckpointError
from ffdist.recipe import Recipe


def holds_run(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"  # step_*.pt files, or step_*/ folders of ZeRO shards
    return ((run_dir / "metrics.jsonl").exists() or any(ckpts.glob("step_*"))
            or (ckpts / "best.pt").exists())


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output_dir={run_dir} is not writable ({e.strerror}); choose "
                              "another output_dir or fix its permissions.") from None


def resume_from(recipe: Recipe, manager: CheckpointManager) -> tuple[str, Checkpoint] | None:
    """(path, state) of the checkpoint to resume from, or None for a fresh start."""
    run_dir = recipe.run_dir
    mode = recipe.checkpoint.resume
    if mode == "never":
        if holds_run(run_dir):
            raise CheckpointError(
                f"output_dir={run_dir} already holds a run and checkpoint.resume=never; "
                "choose a new output_dir (or name), or use checkpoint.resume=auto to continue it.")
        return None
    if mode == "auto":
        found = manager.load_latest()
        if found is None:
            return None
        return str(found[0]), found[1]
    return mode, read_checkpoint(Path(mode))


def is_finished(recipe: Recipe, state: Checkpoint | None, total_steps: int) -> bool:
    """A run whose final weights exist and whose checkpoint reached this recipe's last step.
    resume=auto then does nothing (exit 0): a requeued job that had finished, or a second
    `train` of the same recipe, never retrains or rewrites it. Raising schedule.epochs (or
    max_steps) makes it unfinished again, and it continues from its last checkpoint."""
    if state is None or not (recipe.run_dir / "model.pt").is_file():
        return False
    return state.step >= total_steps or state.epoch >= recipe.schedule.epochs


def write_recipe(recipe: Recipe) -> None:
    save_text(recipe.run_dir / "recipe.yaml", recipe.to_yaml())
