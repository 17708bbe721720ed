"""What the rest of ffdist sees of a dataset: a train stream, an eval stream and their spec.

A data source (ffdist.data.sources) builds `Streams` for one rank; the Trainer, `ffdist
bench`, `ffdist eval` and `ffdist train` use nothing else of it. The streams hand out
uint8 NCHW images and int64 labels on the host; ffdist.data.prefetch.DevicePrefetcher
moves them to the device and normalizes them there (with the spec's mean/std). On the box
path (data.decode=gpu | boxes) a batch is an ffdist.data.encoded.EncodedBatch instead
(bytes and crop boxes), which the prefetcher decodes and crops on the device first.

Contract of a train stream (what exact resume and world-size invariance rest on):
- `steps_per_epoch` optimizer steps make an epoch, the same for every rank and world size.
- `set_epoch(epoch, skip_steps)` positions it at global step `skip_steps` of `epoch`; the
  next iteration yields this rank's micro-batches from there to the end of the epoch:
  (steps_per_epoch - skip_steps) * plan.accum micro-batches of plan.micro samples each.
  An iteration without a new set_epoch repeats the same positions.
- What global step k of epoch e holds depends on (seed, epoch, k) only, never on the world
  size or on where a run was resumed; rank r of w holds its share of the global batch.
- `pairs=True` (mixup/cutmix on; the caller decides, ffdist.mixup reads the order): in the
  global batch of B samples positions 2j and 2j+1 are a mixing pair, and rank r's
  micro-batches hold pairs r, r + w, r + 2w, ... in that order.
- `state_dict()` is plain data (numbers, strings, lists, dicts) saved as the checkpoints'
  "data" section; `load_state_dict()` receives it back before the resumed set_epoch. The
  position itself is the checkpoint's (epoch, step_in_epoch): global steps, which do not
  depend on the world size, handed back through set_epoch. A stream keeps in its state
  what else it needs to continue exactly (a deterministic stream needs nothing more).

Contract of an eval stream: iterating yields this rank's batches of its shard; the shards
of all ranks are disjoint and cover the eval set exactly once (no padding duplicates), so
an evaluation over N images counts N. `len()` is this rank's number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ffdist.resolved import BatchPlan

Batch = tuple["torch.Tensor", "torch.Tensor"]
"""(uint8 images N x C x H x W, int64 labels N), on the host."""


@dataclass(frozen=True)
class DataSpec:
    """What the model and the pictures need to know of the data."""

    classes: list[str]
    channels: int
    image_size: int                      # side of the training images
    mean: tuple[float, ...]              # per channel, on the 0..255 scale of uint8 images
    std: tuple[float, ...]
    eval_image_size: int | None = None   # the eval side when it differs (FixRes)
    eval_resize_size: int | None = None  # short side before the eval centre crop (folders)

    @property
    def eval_size(self) -> int:
        return self.eval_image_size or self.image_size


@runtime_checkable
class TrainStream(Protocol):
    spec: DataSpec
    plan: BatchPlan          # the run's resolved batch plan (ffdist.assemble.resolve)
    steps_per_epoch: int

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class EvalStream(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class StreamRequest:
    """What a source's `build` is asked for: this rank's streams of the run."""

    plan: BatchPlan          # global batch -> per rank -> micro x accum, world size
    rank: int
    seed: int                # the recipe's seed (sample order and augmentation)
    num_classes: int         # model.num_classes
    channels: int            # model.in_channels
    pairs: bool              # mixup/cutmix pairs (see the module docstring)
    eval_batch: int          # this rank's eval batch
    pin_memory: bool = False  # CUDA: page-locked host batches for the async copy
    workers: int = 0         # DataLoader workers (data.num_workers as resolved: ffdist.threads)
    decode: str = "cpu"      # cpu | gpu | boxes: ffdist.data.decoding, resolved

    @property
    def world(self) -> int:
        return self.plan.world_size


@dataclass
class Streams:
    """One rank's data: the train stream and the eval stream, built by a source."""

    train: TrainStream
    eval: EvalStream

    @property
    def spec(self) -> DataSpec:
        return self.train.spec


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous eval shard of n samples: disjoint, covering all n
    exactly once, sizes differing by at most one."""
    return n * rank // world, n * (rank + 1) // world
