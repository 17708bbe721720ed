"""Which recipe keys may change when a run continues: the one table that decides.

A checkpoint holds the recipe it was trained with (`Checkpoint.recipe`). Continuing it with
another recipe is fine for keys that say *where* and *how fast* (launch, workers, logging,
checkpoint cadence) and for the run's length; it is wrong for keys that *define* the run
(global batch, model, data, optimizer, schedule shape, seed): the learning-rate schedule
and the step count would change under the checkpoint, and the result would match neither
recipe. Those are refused, naming key, old and new value, with the override that starts a
fresh run from the weights instead.

Each rule has two verdicts:
  on_resume  the key may differ from the checkpoint's when an unfinished run continues;
  result     a different value would train a different model. A FINISHED run asked again
             with such a difference is refused (ffdist.run_dir): it must not say "nothing
             to do" while ignoring the change, nor train over the finished model.
Keys that no rule names are treated as defining the run (a new key must be classified
here; tests/unit/test_resume_rules.py checks that every recipe key is).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist.errors import CheckpointError
from ffdist.recipe import Recipe, flatten

if TYPE_CHECKING:
    from ffdist.ckpt_format import Checkpoint

log = logging.getLogger("ffdist")


class RunRefused(CheckpointError):
    """The run directory holds what this recipe must not train over or continue. Every rank
    reads the same files and recipe, so every rank refuses alike (rank 0 prints it)."""

    same_on_all_ranks = True


@dataclass(frozen=True)
class Rule:
    pattern: str       # a dotted key, or a section wildcard "log.*"
    on_resume: bool
    result: bool
    why: str


RULES: tuple[Rule, ...] = (
    # where and how fast: never part of the result
    Rule("name", True, False, "a label; the run is where output_dir says"),
    Rule("output_dir", True, False, "the run directory may have been moved"),
    Rule("launch.*", True, False, "where it runs; the batch in the recipe is global, so other "
                                  "world sizes train the same schedule"),
    Rule("log.*", True, False, "what is logged"),
    Rule("checkpoint.*", True, False, "when checkpoints are written and which are kept"),
    Rule("data.num_workers", True, False, "loader speed"),
    Rule("data.prefetch_factor", True, False, "loader speed"),
    Rule("data.persistent_workers", True, False, "loader speed"),
    Rule("data.download", True, False, "how the files got there"),
    Rule("data.micro_batch_size", True, False, "splits the same global batch into "
                                               "accumulation micro-steps"),
    Rule("data.eval_batch_size", True, False, "evaluation speed"),
    Rule("data.bad_images", True, False, "what to do about unreadable files"),
    Rule("data.max_bad_fraction", True, False, "what to do about unreadable files"),
    Rule("model.compile", True, False, "the same model, compiled"),
    Rule("model.compile_backend", True, False, "the same model, compiled"),
    Rule("model.channels_last", True, False, "memory layout only"),
    Rule("strategy.bucket_cap_mb", True, False, "DDP communication only"),
    Rule("strategy.reshard_after_forward", True, False, "FSDP memory and traffic only"),
    Rule("strategy.fsdp_offload", True, False, "where FSDP keeps its shards"),
    Rule("model.activation_checkpointing", True, False, "recomputes the same activations"),
    Rule("model.activation_checkpointing_every", True, False,
         "recomputes the same activations"),
    Rule("model.blocks", True, False, "FSDP's units and what is recomputed; the same "
                                      "weights and gradients"),
    Rule("strategy.find_unused_parameters", True, False, "DDP bookkeeping only"),
    Rule("schedule.eval_every_epochs", True, False, "when to evaluate"),
    Rule("schedule.evaluate_before_train", True, False, "when to evaluate"),
    Rule("schedule.nan_policy", True, False, "what to do about a NaN loss"),
    Rule("schedule.max_bad_steps", True, False, "what to do about a NaN loss"),
    Rule("schedule.stop_if_not_learning", True, False, "what to do about a run that does not "
                                                   "learn"),
    # may change on resume, but make another result
    Rule("data.root", True, True, "the same data may have moved (e.g. to node-local disk)"),
    Rule("data.train_shards", True, True, "the same shards may have moved (to node-local disk, "
                                          "a server); the stream's state holds their index's "
                                          "fingerprint and says when they differ"),
    Rule("data.val_shards", True, True, "the same shards may have moved"),
    Rule("data.shard_index", True, True, "the same index may have moved"),
    Rule("schedule.epochs", True, True, "the run's length: the schedule follows the new "
                                        "length from the resumed step on"),
    Rule("schedule.max_steps", True, True, "the run's length"),
    Rule("optim.lr", True, True, "a lower lr after a divergence is the usual remedy; it "
                                 "applies from the resumed step on"),
    Rule("optim.lr_reference_batch", True, True, "scales optim.lr: a change of lr, from the "
                                                 "resumed step on"),
    Rule("optim.grad_clip", True, True, "a remedy after a divergence, from the resumed step on"),
    Rule("data.decode", True, True, "where images are decoded and cropped (e.g. a run moved "
                                    "between GPU and CPU machines): the same samples, boxes "
                                    "and flips; cpu and the box path resample differently"),
    Rule("strategy.fsdp_reduce_dtype", True, True, "the precision of FSDP's gradient "
                                                   "reduction, from the resumed step on"),
    Rule("precision", True, True, "optimizer state is fp32 in every precision (e.g. resume a "
                                  "bf16 run on hardware without bf16)"),
    # define the run: fixed for its life
    Rule("seed", False, True, "initial weights, data order and augmentation"),
    Rule("model.*", False, True, "the network the checkpoint's weights belong to"),
    Rule("data.batch_size", False, True, "the global batch: steps per epoch and the lr "
                                         "schedule"),
    Rule("data.*", False, True, "what is trained on"),
    Rule("optim.*", False, True, "the optimizer and its state in the checkpoint"),
    Rule("schedule.*", False, True, "the shape of the learning-rate schedule"),
    Rule("strategy.name", False, False, "names that write the same checkpoint layout count as "
                                        "one value (auto, single and ddp: one file); "
                                        "deepspeed's are ZeRO shards, fsdp's DCP shards"),
    Rule("strategy.sync_bn", False, True, "BatchNorm statistics"),
    Rule("strategy.*", False, True, "DeepSpeed's shard layout and settings"),
)


def rule_for(key: str) -> Rule:
    """The first rule that matches (exact keys come before their section's wildcard)."""
    for rule in RULES:
        if rule.pattern == key:
            return rule
    for rule in RULES:
        if "*" in rule.pattern and fnmatch.fnmatchcase(key, rule.pattern):
            return rule
    return Rule(key, False, True, "not classified: treated as defining the run")


def _canonical(key: str, value: Any) -> Any:
    if key == "strategy.name":  # the checkpoint's layout is what must not change
        from ffdist import strategies

        return strategies.layout_format_of(str(value))
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical("", v) for v in value]
    return value


def differences(saved: dict[str, Any], recipe: Recipe) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value differs; keys the saved recipe lacks (it
    is older than they are) count as their default."""
    now = flatten(recipe.to_dict())
    old = {**flatten(Recipe().to_dict()), **flatten(saved)}
    return [(k, old[k], v) for k, v in now.items()
            if _canonical(k, old.get(k)) != _canonical(k, v)]


def _listing(diffs: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} ({_show(a)} -> {_show(b)})" for k, a, b in diffs)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).replace(" ", "")


def check(state: Checkpoint, recipe: Recipe, source: str) -> None:
    """Refuse to continue the checkpoint `source` with keys that define the run changed."""
    diffs = differences(state.recipe, recipe)
    fixed = [d for d in diffs if not rule_for(d[0]).on_resume]
    if not fixed:
        changed = [d for d in diffs if rule_for(d[0]).result]
        if changed:  # allowed, but the result is not the checkpoint's recipe's: say so
            log.warning("continuing %s with %s", source, _listing(changed))
        return
    k, old, _ = fixed[0]
    why = rule_for(k).why
    back = " ".join(f"{key}={_show(a)}" for key, a, _ in fixed)
    raise RunRefused(
        f"checkpoint {source} (step {state.step}) was trained with another "
        f"{_listing(fixed)}, which a resumed run cannot change ({k}: {why}); resume it with "
        f"{back}, or start a new run from its weights: model.pretrained={weights_of(source)} "
        f"{new_place(recipe)}.")


def weights_of(source: str) -> str:
    """What model.pretrained can read from a checkpoint: the file, or for a ZeRO folder
    the consolidated best.pt beside it."""
    path = Path(source)
    if path.is_dir():
        best = path.parent / "best.pt"
        return str(best if best.is_file() else path.parent.parent / "model.pt")
    return str(path)


def new_place(recipe: Recipe) -> str:
    """The override that gives a new run its own folder, the one way every message
    suggests it: output_dir=<run dir>_N, the first N >= 2 that does not exist yet
    (runs/digits -> output_dir=runs/digits_2)."""
    return f"output_dir={next_run_dir(recipe.run_dir)}"


def next_run_dir(run: Path) -> Path:
    """A folder next to `run` that holds nothing yet: <run>_2, <run>_3, ..."""
    i = 2
    while (candidate := run.with_name(f"{run.name}_{i}")).exists():
        i += 1
    return candidate


def finished_refusal(run_dir: Path, recipe: Recipe, diffs: list[tuple[str, Any, Any]],
                     can_extend: bool) -> str:
    """The refusal of a finished run asked again with changes that would make another
    result: train it as a new run, or (more epochs or steps only) extend it in place."""
    extend = ""
    if can_extend and all(rule_for(k).on_resume for k, _, _ in diffs) and any(
            k in ("schedule.epochs", "schedule.max_steps") for k, _, _ in diffs):
        extend = (", or continue this run in place with checkpoint.resume=extend (its "
                  "model.pt is then replaced)")
    return (f"output_dir={run_dir} already holds a finished run, and this recipe differs in "
            f"{_listing(diffs)}; training that here would replace its model: train it as a "
            f"new run with {new_place(recipe)}{extend}.")


def markdown_table() -> str:
    """The table for docs/failure-and-recovery.md (`python -m ffdist.resume_rules`; a test
    checks that the document holds exactly this)."""
    lines = ["| keys | resuming an unfinished run | a finished run asked again | why |",
             "|---|---|---|---|"]
    for rule in RULES:
        resume = "may change" if rule.on_resume else "**refused** if changed"
        finished = ("refused if changed (another result)" if rule.result
                    else "ignored: still nothing to do")
        keys = f"`{rule.pattern}`" + (" (the others)" if rule.pattern.endswith("*") and any(
            r.pattern.startswith(rule.pattern[:-1]) and r is not rule for r in RULES) else "")
        lines.append(f"| {keys} | {resume} | {finished} | {rule.why} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
