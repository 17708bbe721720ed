"""What ffdist's files hold: the checkpoint schema, written by `encode` and read by `decode`.

Files (see docs/architecture.md):
    checkpoints/step_XXXXXXXX.pt   a resumable Checkpoint whose layout is ONE FILE: the
                                   primary rank wrote the whole state (single device, DDP)
    checkpoints/step_XXXXXXXX/     a layout of per-rank SHARDS: every rank wrote its shards
                                   (the strategy decides which files: DeepSpeed ZeRO's
                                   partitions, ...), then the primary rank wrote
                                   ffdist_state.pt LAST, a Checkpoint without model/optimizer
                                   (they are in the shards): a folder without it is incomplete
    checkpoints/best.pt            the best evaluation so far, whatever the layout: a
                                   WEIGHTS Checkpoint with the consolidated fp32 `model` (and
                                   its `ema`), no optimizer, no RNG (not resumable), and the
                                   `best` section saying which evaluation it is
    model.pt                       the final weights: a PLAIN state dict (no format, no
                                   prefixes), so a stock torchvision model loads it

A checkpoint is one flat dict of plain types (tensors, numbers, strings, lists, dicts) so
that `torch.load(path, weights_only=True)` reads it, with "format": FORMAT_VERSION and the
model's weights under "model" without `module.`/`_orig_mod.` prefixes (a stock model loads
`ckpt["model"]`). Optional sections are further top-level keys, kept in
`Checkpoint.sections` (a reader that does not know one ignores it, so adding one keeps the
format):
    "data"     the train stream's state_dict()
    "ema"      the exponential moving average of the weights (ffdist.ema's state_dict)
    "totals"   {"seconds", "images", "segments"}: the run's training time and images over
               all its segments (a segment: one process lifetime; a resume starts the next)
    "window"   per rank, the partial log window at the checkpoint (the device sums of the
               loss since the last log line and its host counters), so that the first log
               line after a resume covers the same steps as in a run never stopped
    "best"     best.pt only: {"step", "epoch", "split" (val | val_ema), "weights" (raw |
               ema), "metric" (top1), "value", "n"}: the evaluation that made it best

A checkpoint records its LAYOUT, not the name of the strategy that wrote it: whether it is
one file or per-rank shards, the format id of what is inside (which strategies can read
it: ffdist.strategies declares that), the world size that wrote it, and the layout's own
parameters (e.g. the ZeRO stage). So a new strategy that writes an existing layout resumes
its checkpoints, and one with a new layout declares its own format id.

Format history: 1 (first release: no "strategy" for single/DDP runs, no "kind");
2 ("strategy", "zero_stage", "world_size" and "kind" always written; still read: its
strategy/zero_stage become a layout, see `_from_v2`); 3 (this one: "layout").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffdist.errors import CheckpointError

FORMAT_VERSION = 3
OLDEST_READ = 2  # format 2 files are read (their layout derived from what they name)
SHARDED_STATE = "ffdist_state.pt"  # inside a folder of shards; written last
RESUMABLE, WEIGHTS = "resumable", "weights"
BEST_FILE = "best.pt"  # in checkpoints/
BEST, TOTALS, WINDOW = "best", "totals", "window"  # optional sections (see above)
ONE_FILE, SHARDS = "file", "shards"  # Layout.kind


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's state lies on disk; the strategies say which ones they write and
    read (ffdist.strategies.base.Strategy.layout / .reads)."""

    kind: str                       # ONE_FILE (the primary rank writes the whole state into
    #                                 the checkpoint file) | SHARDS (every rank writes its own
    #                                 shards into the checkpoint's folder)
    format: str                     # what the state is, e.g. "torch-file", "deepspeed-zero"
    world_size: int                 # ranks that wrote it
    params: dict[str, Any] = field(default_factory=dict)  # the format's own, e.g. zero_stage

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format, "world_size": self.world_size,
                "params": dict(self.params)}

    @staticmethod
    def from_dict(obj: Any, source: str | Path) -> Layout:
        ok = isinstance(obj, dict) and obj.get("kind") in (ONE_FILE, SHARDS) and \
            isinstance(obj.get("format"), str) and isinstance(obj.get("world_size"), int) \
            and isinstance(obj.get("params", {}), dict)
        if not ok:
            raise CheckpointError(f"{source} has a malformed 'layout' ({str(obj)[:80]}); the "
                                  "checkpoint is damaged, remove it to resume from the one "
                                  "before.")
        return Layout(obj["kind"], obj["format"], obj["world_size"], dict(obj.get("params", {})))


@dataclass
class Checkpoint:
    """One checkpoint file, as every reader sees it."""

    step: int                       # optimizer steps done in total
    epoch: int                      # epoch in progress (or the next one, after an epoch ends)
    step_in_epoch: int              # optimizer steps done in `epoch`
    layout: Layout                  # how the strategy's state lies on disk, who wrote it
    recipe: dict[str, Any]          # the resolved recipe (Recipe.to_dict())
    classes: list[str]              # class names, in label order
    kind: str = RESUMABLE           # resumable | weights (best.pt: consolidated weights)
    best_top1: float = -1.0
    skipped_steps: int = 0          # non-finite steps skipped (nan_policy=skip), in total
    bad_in_a_row: int = 0           # ... consecutively, up to `step`
    rng: list[dict[str, Any]] = field(default_factory=list)  # every rank's RNG states
    model: dict[str, Any] | None = None      # plain state dict; None in shards' marker
    optimizer: dict[str, Any] | None = None  # None with shards and in WEIGHTS
    scaler: dict[str, Any] | None = None     # fp16's GradScaler ({} when unused)
    sections: dict[str, Any] = field(default_factory=dict)  # optional, see above
    shards: Path | None = None      # NOT stored: the folder of shards this was read from

    @property
    def world_size(self) -> int:
        """Ranks that wrote it (the layout's)."""
        return self.layout.world_size

    def strategy_state(self) -> dict[str, Any]:
        """What Strategy.load_state_dict takes (a one-file layout)."""
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
    out["layout"] = ckpt.layout.to_dict()
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
    known = isinstance(version, int) and not isinstance(version, bool)
    if not known or not OLDEST_READ <= version <= FORMAT_VERSION:
        when = "an older" if known and version < OLDEST_READ else "a newer (or unknown)"
        raise CheckpointError(
            f"{source} has checkpoint format {version!r}, written by {when} ffdist; this one "
            f"reads formats {OLDEST_READ} to {FORMAT_VERSION}. Resume it with the ffdist that "
            f"wrote it, or start a new run from its weights with model.pretrained={source} and "
            "a new output_dir.")
    if version == 2:
        obj = _from_v2(obj, source)
    missing = sorted(REQUIRED - set(obj))
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; the checkpoint is "
                              "incomplete, remove it to resume from the one before.")
    fields = {k: v for k, v in obj.items() if k in CORE}
    fields["layout"] = Layout.from_dict(fields["layout"], source)
    sections = {k: v for k, v in obj.items() if k not in CORE and k != "format"}
    return Checkpoint(**fields, sections=sections, shards=shards)


V2_ONLY = ("strategy", "zero_stage", "world_size")


def _from_v2(obj: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """A format-2 dict in format 3's terms. Format 2 named the strategy that wrote it
    ("strategy", "zero_stage") where format 3 records the layout: per-rank shards when a
    resumable file holds no model (the marker of a shard folder: the only such files
    format 2 wrote), else one file; the format id "v2:<strategy>", which the strategies
    that wrote format 2 declare they read; the ZeRO stage as the layout's parameter."""
    missing = [k for k in ("strategy", "world_size") if k not in obj]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; the checkpoint is "
                              "incomplete, remove it to resume from the one before.")
    out = {k: v for k, v in obj.items() if k not in V2_ONLY}
    in_shards = obj.get("kind", RESUMABLE) == RESUMABLE and obj.get("model") is None
    params = {} if obj.get("zero_stage") is None else {"zero_stage": obj["zero_stage"]}
    out["layout"] = {"kind": SHARDS if in_shards else ONE_FILE,
                     "format": f"v2:{obj['strategy']}", "world_size": obj["world_size"],
                     "params": params}
    return out


def is_resumable(ckpt: Checkpoint) -> bool:
    """Progress, RNG and the strategy's state (in the file, or in its shards) are there."""
    if ckpt.kind != RESUMABLE or not ckpt.rng:
        return False
    if ckpt.layout.kind == SHARDS:
        return ckpt.shards is not None
    return ckpt.model is not None and ckpt.optimizer is not None
