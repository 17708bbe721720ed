"""The generic map-style streams: every source whose splits are indexable datasets
(digits, MNIST, CIFAR, image folders, file lists, synthetic) trains and evaluates through
them. A sampler orders the keys, a DataLoader (workers, pinned memory) fetches them.

The batch arithmetic is ffdist.resolved's BatchPlan (recipes give the GLOBAL batch).
Rank r takes perm[r::world] of each epoch's permutation, so global step k always covers
perm[k*B:(k+1)*B] whatever the world size: 1, 2 or 8 ranks train the same schedule.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ffdist.data.datasets import collate
from ffdist.data.stream import DataSpec, StreamRequest, Streams, shard_bounds
from ffdist.errors import DataError, RecipeError
from ffdist.recipe import DataConfig
from ffdist.resolved import BatchPlan

log = logging.getLogger(__name__)

SAMPLE_LOG = "FFDIST_SAMPLE_LOG"
"""Tests only: a folder where each rank records the sample indices of each step it takes
(TrainSampler._log_samples); unset, nothing is written."""


class TrainSampler(Sampler[tuple]):
    """DistributedSampler semantics (seed + epoch permutation, `set_epoch`), but the epoch
    is cut to whole GLOBAL batches, a resumed epoch can start mid-way (`skip_steps`), and
    keys are (epoch, index) so that datasets seed each sample's augmentation from them.

    repeats > 1 is repeated augmentation (DeiT's RASampler, torchvision's --ra-reps): each
    index of the epoch's permutation appears `repeats` times in a row and the order is cut
    back to n samples, so an epoch covers about n/repeats distinct images, each `repeats`
    times. Keys become (epoch, index, copy): every copy gets its own augmentation. The
    copies of an image are consecutive in the global batch, so rank r's stride r::world
    spreads them over ranks, as DeiT's does; the global batch itself does not depend on the
    world size.

    pairs=True (mixup/cutmix on, ffdist.mixup): the global batch of B is reordered as the
    pairs (b[j], b[j + B/2]) and ranks take whole pairs (pair k goes to rank k % world), so
    every image and its mixing partner land in the same micro-batch, as neighbours, for
    any world size. The partner is half a batch away in the permutation, never another
    copy of the same image under repeated augmentation."""

    def __init__(self, n: int, plan: BatchPlan, rank: int, seed: int, shuffle: bool = True,
                 repeats: int = 1, pairs: bool = False):
        self.n, self.plan, self.rank, self.seed, self.shuffle = n, plan, rank, seed, shuffle
        self.repeats, self.pairs = repeats, pairs
        self.epoch, self.skip = 0, 0
        self.steps_per_epoch = n // plan.global_batch
        if self.steps_per_epoch == 0:
            raise RecipeError(f"data.batch_size={plan.global_batch} is larger than the "
                              f"{n} training images; use a smaller batch.")
        if pairs and (plan.per_rank % 2 or plan.micro % 2):
            raise RecipeError(f"mixup/cutmix mixes images in pairs inside a micro-batch, but the "
                              f"micro-batch is {plan.micro} (batch {plan.global_batch} over "
                              f"{plan.world_size} processes); use an even data.micro_batch_size "
                              "and a data.batch_size that gives an even per-process batch.")

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_steps

    def permutation(self) -> torch.Tensor:
        """The epoch's order of the n sample indices, a function of (seed, epoch, n) only: a
        uniform shuffle (or none). A subclass may order them otherwise (tar shards keep
        reads local: ffdist.data.shard_streams)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, copy) of every sample of the epoch, in global-batch order."""
        perm = self.permutation()
        used = self.steps_per_epoch * self.plan.global_batch
        if self.repeats > 1:
            index = perm.repeat_interleave(self.repeats)[:used]
            copy = torch.arange(self.repeats).repeat(self.n)[:used]
        else:
            index, copy = perm[:used], torch.zeros(used, dtype=torch.long)
        if self.pairs:  # b[j], b[j + B/2], b[j + 1], ... within each global batch
            b = self.plan.global_batch
            index = index.view(-1, 2, b // 2).transpose(1, 2).reshape(-1)
            copy = copy.view(-1, 2, b // 2).transpose(1, 2).reshape(-1)
        return index, copy

    def __iter__(self) -> Iterator[tuple]:
        index, copy = self.epoch_order()
        w, chunk = self.plan.world_size, 2 if self.pairs else 1
        # rank r takes chunks r, r + w, ... (a chunk is one sample, or one mixing pair)
        mine = torch.arange(len(index)).view(-1, w, chunk)[:, self.rank].reshape(-1)
        mine = mine[self.skip * self.plan.per_rank:]
        e = self.epoch
        if os.environ.get(SAMPLE_LOG):
            self._log_samples(index[mine].tolist())
        if self.repeats > 1:
            return iter([(e, i, c) for i, c in zip(index[mine].tolist(), copy[mine].tolist())])
        return iter([(e, i) for i in index[mine].tolist()])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.skip) * self.plan.per_rank

    def _log_samples(self, indices: list[int]) -> None:
        """Tests only (FFDIST_SAMPLE_LOG=<folder>): append to <folder>/rank<r>.jsonl one
        line per optimizer step of this epoch that this rank's iteration hands out, with
        the sample indices it takes at that step, in order; a test counts them over a
        resume."""
        folder = Path(os.environ[SAMPLE_LOG])
        folder.mkdir(parents=True, exist_ok=True)
        n, first = self.plan.per_rank, self.epoch * self.steps_per_epoch + self.skip + 1
        with open(folder / f"rank{self.rank}.jsonl", "a") as f:
            for k in range(len(indices) // n):
                f.write(json.dumps({"step": first + k, "epoch": self.epoch, "rank": self.rank,
                                    "world": self.plan.world_size,
                                    "index": indices[k * n:(k + 1) * n]}) + "\n")


class ShardSampler(Sampler[int]):
    """Eval: rank r gets a contiguous, disjoint shard; the shards cover the set exactly once
    (no padding with duplicates, unlike DistributedSampler)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.start, self.stop = shard_bounds(n, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class MapData:
    """What a map-style source reads: its two splits and their spec."""

    train: Dataset
    val: Dataset
    spec: DataSpec


class MapTrainStream:
    """A train stream (ffdist.data.stream) over a map-style dataset: TrainSampler's order,
    fetched by a DataLoader in micro-batches. Its order is a function of (seed, epoch,
    dataset size): the checkpoint's (epoch, step_in_epoch) is all it needs to resume; its
    state records the size, so that a resume over changed data says it cannot be exact."""

    def __init__(self, dataset: Dataset, spec: DataSpec, sampler: TrainSampler,
                 loader: DataLoader):
        self.dataset, self.spec, self.sampler, self.loader = dataset, spec, sampler, loader
        self.plan = sampler.plan
        self.steps_per_epoch = sampler.steps_per_epoch

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.sampler.set_epoch(epoch, skip_steps)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if batch is None:  # a micro-batch of skipped files: a step cannot be made of it
                raise DataError(f"all {self.plan.micro} images of a micro-batch are "
                                "unreadable (data.bad_images=skip skipped them); check the "
                                "dataset files.")
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.sampler.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("samples")
        if saved is not None and saved != self.sampler.n:
            log.warning("the checkpoint's run trained on %d images, the training data now "
                        "holds %d: the resumed epochs are ordered differently from the run's",
                        saved, self.sampler.n)


class MapEvalStream:
    """An eval stream over a map-style dataset: this rank's ShardSampler shard, batched. A
    batch whose files were all skipped as unreadable is an empty batch (it counts nothing),
    so that the stream still has len() batches."""

    def __init__(self, dataset: Dataset, loader: DataLoader, spec: DataSpec):
        self.dataset, self.loader, self.spec = dataset, loader, spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        side = self.spec.eval_size
        for batch in self.loader:
            yield batch if batch is not None else (
                torch.empty(0, self.spec.channels, side, side, dtype=torch.uint8),
                torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.loader)


def _loader(ds: Dataset, sampler: Sampler, batch: int, cfg: DataConfig, req: StreamRequest,
            drop_last: bool) -> DataLoader:
    extra = {}
    if req.workers > 0:  # resolved from data.num_workers: never more than the cores
        extra = {"persistent_workers": cfg.persistent_workers,
                 "prefetch_factor": cfg.prefetch_factor}
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=req.workers,
                      pin_memory=req.pin_memory, drop_last=drop_last, collate_fn=collate,
                      **extra)


def map_streams(data: MapData, cfg: DataConfig, req: StreamRequest) -> Streams:
    """This rank's streams over a map-style source's datasets."""
    plan = req.plan
    sampler = TrainSampler(len(data.train), plan, req.rank, req.seed,  # type: ignore[arg-type]
                           repeats=cfg.repeated_augmentation, pairs=req.pairs)
    train = _loader(data.train, sampler, plan.micro, cfg, req, drop_last=True)
    shard = ShardSampler(len(data.val), req.rank, req.world)  # type: ignore[arg-type]
    val = _loader(data.val, shard, req.eval_batch, cfg, req, drop_last=False)
    return Streams(MapTrainStream(data.train, data.spec, sampler, train),
                   MapEvalStream(data.val, val, data.spec))
