"""What the end of `python -m ffdist.train` says (rank 0): the result, where it is, and the
commands to run next with the run's real path. Printed by ffdist.train after model.pt is
written; a run that had already finished gets the folder and the same commands in short.
And the one line that names a recipe's regularization (`ffdist plan`, `ffdist bench`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist.resume_rules import new_place
from ffdist.sinks import selected
from ffdist.sinks.tensorboard import command as tb_command

if TYPE_CHECKING:
    from ffdist.recipe import Recipe


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _result_line(rcp: Recipe, result: dict[str, Any], n: int | None) -> str:
    """best and final val top-1; with an EMA, the final top-1 of both kinds of weights."""
    cfg = rcp.checkpoint
    if "final_top1_ema" in result:  # an EMA: val is the raw weights, val_ema the EMA
        best = f"best {result['best_top1']:.4f} ({'val_ema' if cfg.best_weights == 'ema' else 'val'})"
        final = (f"final val {result['final_top1_raw']:.4f}, val_ema "
                 f"{result['final_top1_ema']:.4f} (model.pt: {cfg.final_weights})")
    else:
        best, final = f"best {result['best_top1']:.4f}", f"final {result['final_top1']:.4f}"
    of = f" of {n} images" if n else ""
    return f"val top-1{of}: {best}, {final}"


def _files(run: Path, result: dict[str, Any]) -> str:
    """The run's main files that exist, in the order people look for them; best.pt with
    the evaluation it holds."""
    best = "checkpoints/best.pt"
    if "best_step" in result:
        best += f" (step {result['best_step']}, top-1 {result['best_top1']:.4f})"
    names = [("model.pt", run / "model.pt"), (best, run / "checkpoints" / "best.pt"),
             ("metrics.jsonl", run / "metrics.jsonl"), ("tb/", run / "tb"),
             ("recipe.yaml", run / "recipe.yaml")]
    return ", ".join(name for name, path in names if path.exists())


def took(seconds: float, segments: int) -> str:
    """How long a run trained: "1 min 57 s", or "3 segments, 1 h 02 min in all" for a run
    that was resumed (ffdist.engine's totals over its segments)."""
    if segments > 1:
        return f"{segments} segments, {duration(seconds)} in all"
    return duration(seconds)


def _examples(rcp: Recipe) -> tuple[str, str, str] | None:
    """(folder, command that writes it, what it holds): images of the run's data source to
    try `ffdist predict` on, if the source has a command for them."""
    from ffdist.data import sources

    return sources.get(rcp.data.name).example_images


def next_commands(rcp: Recipe, recipe_path: str | None, world_size: int) -> list[str]:
    """(command, what it does) lines with the run's real path, aligned."""
    run = rcp.run_dir
    examples = _examples(rcp)
    images = examples[0] if examples else "IMAGES..."
    rows = [(f"ffdist eval {run}", "top-1/top-5, confusion matrix of model.pt")]
    if examples:
        rows.append(examples[1:])
    rows.append((f"ffdist predict {run} {images} --out preds.csv", "classify image files"))
    if "tensorboard" in selected(rcp.log):
        rows.append((tb_command(f"{run}/tb"), "curves, every evaluation's confusion matrix"))
    width = max(len(cmd) for cmd, _ in rows)
    lines = [f"  {cmd:<{width}}  # {what}" for cmd, what in rows]
    again = f"KEY=VALUE ... {new_place(rcp)}"
    cmd = f"ffdist train {recipe_path} {again}" if world_size == 1 and recipe_path else \
        f"the same command + {again}"
    return [*lines, f"  {cmd}  # train again with a change ({run} keeps this run)"]


def finished(rcp: Recipe, result: dict[str, Any], seconds: float, recipe_path: str | None,
             world_size: int, n: int | None = None) -> str:
    """The block printed when a run has finished: ~8 lines."""
    run = rcp.run_dir
    lines = [f"ffdist: {rcp.name} finished in {took(seconds, result.get('segments', 1))}, "
             f"{result['step']} steps; " + _result_line(rcp, result, n),
             f"  run folder {run}/: {_files(run, result)}",
             "next:", *next_commands(rcp, recipe_path, world_size)]
    return "\n".join(lines)


def already_finished(message: str, rcp: Recipe, recipe_path: str | None) -> str:
    """The "nothing to do" message and, on a second line, the commands that use the run."""
    run = rcp.run_dir
    examples = _examples(rcp)
    images = examples[0] if examples else "IMAGES..."
    cmds = [f"ffdist eval {run}", f"ffdist predict {run} {images} --out preds.csv"]
    if "tensorboard" in selected(rcp.log) and (run / "tb").exists():
        cmds.append(tb_command(f"{run}/tb"))
    return f"{message}\n  next: {'  |  '.join(cmds)}"


def regularization(rcp: Recipe, image_size: int) -> str:
    """One line naming the regularization a recipe turns on ('none' when it has none), for
    `ffdist plan` and `ffdist bench`; `image_size` is the resolved training image side."""
    from ffdist import mixup  # imports torch: plan reads and checks the recipe first

    d, o, m = rcp.data, rcp.optim, rcp.model
    parts = []
    if o.ema_decay > 0:
        parts.append(f"EMA {o.ema_decay:g} every {o.ema_every_steps} step(s)")
    if mixup.enabled(d):
        group = "" if d.mix_mode != "batch" else f", group {d.mix_group or d.batch_size}"
        parts.append(f"mixup {d.mixup_alpha:g} / cutmix {d.cutmix_alpha:g} ({d.mix_mode}"
                     f"{group}; soft targets)")
    if o.label_smoothing:
        parts.append(f"label smoothing {o.label_smoothing:g}")
    if d.auto_augment:
        parts.append(f"auto_augment {d.auto_augment}")
    if d.random_erase:
        parts.append(f"random erase {d.random_erase:g} ({d.random_erase_mode})")
    if d.repeated_augmentation > 1:
        parts.append(f"repeated augmentation x{d.repeated_augmentation}")
    if m.drop_path_rate:
        parts.append(f"drop path {m.drop_path_rate:g}")
    if d.eval_image_size and d.eval_image_size != image_size:
        parts.append(f"eval at {d.eval_image_size}px")
    return ", ".join(parts) or "none"
