"""What ffdist's files hold: the checkpoint schema, written by `encode` and read by `decode`.

Files (see docs/architecture.md):
    checkpoints/step_XXXXXXXX.pt   a resumable Checkpoint (single device / DDP)
    checkpoints/step_XXXXXXXX/     ZeRO: DeepSpeed's per-rank shards + ffdist_state.pt, a
                                   Checkpoint without model/optimizer (they are in the
                                   shards), written LAST: a folder without it is incomplete
    checkpoints/best.pt            single/DDP: a copy of the best step file (resumable);
                                   ZeRO: a Checkpoint with the consolidated fp32 `model`,
                                   no optimizer and no RNG (weights only, not resumable)
    model.pt                       the final weights: a PLAIN state dict (no format, no
                                   prefixes), so a stock torchvision model loads it

A checkpoint is one flat dict of plain types (tensors, numbers, strings, lists, dicts) so
that `torch.load(path, weights_only=True)` reads it, with "format": FORMAT_VERSION and the
model's weights under "model" without `module.`/`_orig_mod.` prefixes (a stock model loads
`ckpt["model"]`). Optional sections (e.g. "ema" for an exponential moving average of the
weights) are further top-level keys, kept in `Checkpoint.sections`.

Format history: 1 (first release: no "strategy" for single/DDP runs, no "kind");
2 (this one: "strategy", "zero_stage" and "kind" always written).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffdist.errors import CheckpointError

FORMAT_VERSION = 2
SHARDED_STATE = "ffdist_state.pt"  # inside a ZeRO checkpoint folder; written last
RESUMABLE, WEIGHTS = "resumable", "weights"


@dataclass
class Checkpoint:
    """One checkpoint file, as every reader sees it."""

    step: int                       # optimizer steps done in total
    epoch: int                      # epoch in progress (or the next one, after an epoch ends)
    step_in_epoch: int              # optimizer steps done in `epoch`
    world_size: int                 # ranks that wrote it
    strategy: str                   # single | ddp | deepspeed
    recipe: dict[str, Any]          # the resolved recipe (Recipe.to_dict())
    classes: list[str]              # class names, in label order
    kind: str = RESUMABLE           # resumable | weights (ZeRO's best.pt)
    best_top1: float = -1.0
    skipped_steps: int = 0          # non-finite steps skipped (nan_policy=skip), in total
    bad_in_a_row: int = 0           # ... consecutively, up to `step`
    zero_stage: int | None = None   # deepspeed only
    rng: list[dict[str, Any]] = field(default_factory=list)  # every rank's RNG states
    model: dict[str, Any] | None = None      # plain state dict; None under ZeRO (shards)
    optimizer: dict[str, Any] | None = None  # None under ZeRO (shards) and in WEIGHTS
    scaler: dict[str, Any] | None = None     # fp16's GradScaler ({} when unused)
    sections: dict[str, Any] = field(default_factory=dict)  # optional: {"ema": ...}
    shards: Path | None = None      # NOT stored: the ZeRO folder this was read from

    def strategy_state(self) -> dict[str, Any]:
        """What Strategy.load_state_dict takes (single/DDP)."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}


_NOT_STORED = {"shards", "sections"}
CORE = {f.name for f in dataclasses.fields(Checkpoint)} - _NOT_STORED
REQUIRED = {f.name for f in dataclasses.fields(Checkpoint)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def encode(ckpt: Checkpoint) -> dict[str, Any]:
    """The dict a checkpoint file holds (the ONE writer of the layout)."""
    clash = CORE.intersection(ckpt.sections) | {"format"}.intersection(ckpt.sections)
    if clash:
        raise ValueError(f"checkpoint sections {sorted(clash)} clash with the schema's keys")
    out = {name: getattr(ckpt, name) for name in sorted(CORE)}
    return {"format": FORMAT_VERSION, **out, **ckpt.sections}


def decode(obj: Any, source: str | Path, shards: Path | None = None) -> Checkpoint:
    """A checkpoint file's dict as a Checkpoint (the ONE reader of the layout); an older,
    newer or foreign file is a CheckpointError that says what it is."""
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(
            f"{source} is not an ffdist checkpoint (no 'format' key: a plain state dict, "
            "e.g. a model.pt); it cannot be resumed, but its weights can start a run with "
            f"model.pretrained={source}.")
    version = obj["format"]
    if version != FORMAT_VERSION:
        when = "an older" if isinstance(version, int) and version < FORMAT_VERSION else \
            "a newer (or unknown)"
        raise CheckpointError(
            f"{source} has checkpoint format {version!r}, written by {when} ffdist; this one "
            f"reads format {FORMAT_VERSION}. Resume it with the ffdist that wrote it, or start "
            f"a new run from its weights with model.pretrained={source} and a new output_dir.")
    missing = sorted(REQUIRED - set(obj))
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; the checkpoint is "
                              "incomplete, remove it to resume from the one before.")
    fields = {k: v for k, v in obj.items() if k in CORE}
    sections = {k: v for k, v in obj.items() if k not in CORE and k != "format"}
    return Checkpoint(**fields, sections=sections, shards=shards)


def is_resumable(ckpt: Checkpoint) -> bool:
    """Progress, RNG and the strategy's state (in the file, or in its shards) are there."""
    if ckpt.kind != RESUMABLE or not ckpt.rng:
        return False
    return ckpt.shards is not None if ckpt.strategy == "deepspeed" else \
        ckpt.model is not None and ckpt.optimizer is not None
