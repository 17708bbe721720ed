"""The train and eval streams of tar shards (data.name=shards): which samples each global
step holds, which of them this rank and each of its loader processes read, and the batches.

**The order does not depend on the world size nor on the loader workers.** An epoch's order
is a function of (seed, epoch, the index) only: a seeded shuffle of the shards, their
samples concatenated in file order, then a seeded shuffle window (each sample keyed by its
place q plus window * u, u uniform in [0, 1), sorted: a sample moves fewer than `window`
places, so the shards are read in a moving window, as WebDataset's shuffle buffer does, but
with a bound that a resume can rely on). From there it is TrainSampler's arithmetic
(ffdist.data.mapstyle): the epoch is cut to whole global batches (the remainder, total mod
global batch samples at the end of each epoch's order, is left out of that epoch: a
different set each epoch), global step k holds order[k*B:(k+1)*B], rank r of w holds
places r, r + w, ... of it (whole mixing pairs with mixup/cutmix), and repeated
augmentation repeats each sample in place. So 1, 2 or 3 ranks train the same global
batches, every rank has the same number of steps, and a checkpoint's (epoch, step) resumes
exactly at any world size: no sample of the epoch is seen twice or left out.

The I/O that costs: every rank (and loader process) reads only its own samples of a local
shard, at their offsets (ffdist.data.shard_reader); a streamed shard (URL, pipe) is read
through by each loader process that needs a sample of it, up to the last one it needs.

Loader processes: rank r's micro-batches are dealt out j, j + workers, ... to worker j; the
DataLoader yields an iterable dataset's workers' batches in that same round-robin order, so
the batches arrive in the sampler's order whatever data.num_workers is. The epoch and the
resume step reach persistent workers through a shared-memory tensor that `set_epoch`
writes before each iteration starts.

Eval: rank r reads the contiguous range shard_bounds(total, r, w) of the split in index
order (every sample once, no padding); its loader processes take its batches in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ffdist.data import tars
from ffdist.data.datasets import FileImages, collate
from ffdist.data.mapstyle import TrainSampler
from ffdist.data.shard_index import ShardSet
from ffdist.data.shard_reader import SampleReader
from ffdist.data.stream import DataSpec, StreamRequest, Streams, shard_bounds
from ffdist.errors import DataError
from ffdist.recipe import DataConfig
from ffdist.resolved import BatchPlan

log = logging.getLogger(__name__)


class ShardOrder(TrainSampler):
    """TrainSampler over a shard index, its permutation the shard shuffle + shuffle window
    above (a function of seed, epoch and the index's counts)."""

    def __init__(self, shards: ShardSet, window: int, plan: BatchPlan, rank: int, seed: int,
                 repeats: int = 1, pairs: bool = False):
        super().__init__(shards.total, plan, rank, seed, repeats=repeats, pairs=pairs)
        self.counts = [s.samples for s in shards.shards]
        self.window = window

    def permutation(self) -> torch.Tensor:
        return epoch_permutation(self.counts, self.seed, self.epoch, self.window)


def epoch_permutation(counts: list[int], seed: int, epoch: int, window: int) -> torch.Tensor:
    """Sample indices (shard s's samples are bounds[s] .. bounds[s+1]-1) in the epoch's order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    bounds = torch.tensor([0, *counts]).cumsum(0)
    shard_order = torch.randperm(len(counts), generator=g).tolist()
    order = torch.cat([torch.arange(int(bounds[s]), int(bounds[s + 1])) for s in shard_order])
    if window > 1:
        n = len(order)
        keys = torch.arange(n, dtype=torch.float64) + window * torch.rand(
            n, generator=g, dtype=torch.float64)
        order = order[torch.argsort(keys, stable=True)]
    return order


def _index(key: Any) -> int:
    return key[1] if isinstance(key, tuple) else key


class ShardBatches(IterableDataset):
    """One rank's batches of a split: `batches()` lists them (keys: (epoch, index[, copy])
    for training, indices for eval); loader process j of n reads and yields j, j + n, ..."""

    def __init__(self, shards: ShardSet, images: FileImages, batches: Callable[[], list[list]],
                 label_key: str | None, num_classes: int, key: str):
        self.shards, self.images, self.batches = shards, images, batches
        self.label_key, self.num_classes, self.key = label_key, num_classes, key
        self._reader: SampleReader | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.batches()[j::n]
        if self._reader is None:  # made in the process that reads (a worker keeps its own)
            self._reader = SampleReader(self.shards)
        self._reader.expect(_index(k) for keys in mine for k in keys)
        for keys in mine:
            yield collate([self._sample(k) for k in keys])  # type: ignore[misc]

    def _sample(self, key: Any) -> tuple[torch.Tensor, int] | None:
        i = _index(key)
        try:
            url, sample = self._reader.read(i)  # type: ignore[union-attr]
            field = tars.image_field(sample)
            if field is None:
                raise tars.Unreadable(f"sample {sample.key} has no image member (.jpg, .png, "
                                      ".webp or .gif)")
            label = tars.label_of(sample, self.label_key)
        except tars.Unreadable as e:
            s, pos = self.shards.locate(i)
            where = f"{self.shards.shards[s].url} (sample {pos})"
            if self.images.bad_images == "error":
                raise DataError(f"{self.key}: {where} cannot be read: {e}; fix or rewrite the "
                                "shard, or set data.bad_images=skip to skip such samples.") from None
            return self.images._unreadable(where, str(e))
        if not 0 <= label < self.num_classes:
            raise DataError(f"{self.key}: {url} sample {sample.key} has label {label}, outside "
                            f"0..{self.num_classes - 1}; set model.num_classes to the number of "
                            "classes the shards hold.")
        data = torch.frombuffer(bytearray(sample.fields[field]), dtype=torch.uint8)  # type: ignore[arg-type]
        return self.images.item(key, data, f"{url}:{sample.key}.{field}", label)


class ShardTrainStream:
    """The train stream (ffdist.data.stream's contract) over a ShardOrder."""

    def __init__(self, spec: DataSpec, order: ShardOrder, loader: DataLoader,
                 position: torch.Tensor, shards: ShardSet):
        self.spec, self.order, self.loader, self.position = spec, order, loader, position
        self.plan, self.steps_per_epoch = order.plan, order.steps_per_epoch
        self.fingerprint, self.window = shards.fingerprint(), order.window

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.order.set_epoch(epoch, skip_steps)
        self.position[0], self.position[1] = epoch, skip_steps  # seen by persistent workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The order needs nothing beyond (seed, epoch, step) and the shards: their
        fingerprint, so that a resume over other shards is told it is not exact."""
        return {"shards": self.fingerprint, "samples": self.order.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("shards")
        if saved is not None and saved != self.fingerprint:
            log.warning("the checkpoint's run trained on other shards (index fingerprint %s, "
                        "now %s): the resumed epoch is not the one it was in", saved,
                        self.fingerprint)


class ShardEvalStream:
    def __init__(self, loader: DataLoader, batches: int):
        self.loader, self.batches = loader, batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return self.batches


def _loader(ds: IterableDataset, cfg: DataConfig, workers: int, pin: bool) -> DataLoader:
    """`workers`: data.num_workers as the run resolved it (ffdist.threads: auto, the cap)."""
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": cfg.persistent_workers,
                 "prefetch_factor": cfg.prefetch_factor}
    return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin, **extra)


def _chunks(keys: list, size: int) -> list[list]:
    return [keys[i:i + size] for i in range(0, len(keys), size)]


class TrainKeys:
    """This rank's micro-batches of keys for the epoch and step that `position` (shared
    memory: set_epoch writes it, persistent workers read it) holds."""

    def __init__(self, order: ShardOrder, position: torch.Tensor):
        self.order, self.position = order, position

    def __call__(self) -> list[list]:
        self.order.set_epoch(int(self.position[0]), int(self.position[1]))
        return _chunks(list(self.order), self.order.plan.micro)


class EvalKeys:
    def __init__(self, batches: list[list]):
        self.batches = batches

    def __call__(self) -> list[list]:
        return self.batches


def shard_streams(train: ShardSet, val: ShardSet, spec: DataSpec,
                  tfs: tuple[Callable, Callable], cfg: DataConfig, req: StreamRequest) -> Streams:
    """This rank's streams over the train and val shard sets; `tfs`: the train and eval
    transforms (on decoded uint8 images)."""
    order = ShardOrder(train, cfg.shuffle_buffer, req.plan, req.rank, req.seed,
                       repeats=cfg.repeated_augmentation, pairs=req.pairs)
    position = torch.zeros(2, dtype=torch.long).share_memory_()
    bad = {"bad_images": cfg.bad_images, "max_bad_fraction": cfg.max_bad_fraction,
           "max_pixels": cfg.max_image_pixels}
    train_images = FileImages([], tfs[0], spec.channels, req.seed, split="train",
                              total=train.total, **bad)
    train_ds = ShardBatches(train, train_images, TrainKeys(order, position), cfg.label_key,
                            req.num_classes, "data.train_shards")
    start, stop = shard_bounds(val.total, req.rank, req.world)
    val_keys = EvalKeys(_chunks(list(range(start, stop)), req.eval_batch))
    val_images = FileImages([], tfs[1], spec.channels, split="val", total=val.total, **bad)
    val_ds = ShardBatches(val, val_images, val_keys, cfg.label_key, req.num_classes,
                          "data.val_shards")
    train_loader = _loader(train_ds, cfg, req.workers, req.pin_memory)
    val_loader = _loader(val_ds, cfg, req.workers, req.pin_memory)
    return Streams(ShardTrainStream(spec, order, train_loader, position, train),
                   ShardEvalStream(val_loader, len(val_keys.batches)))
