"""Samplers, loaders and the device prefetcher.

The batch arithmetic is ffdist.resolved's BatchPlan (recipes give the GLOBAL batch).
Rank r takes perm[r::world] of each epoch's permutation, so global step k always covers
perm[k*B:(k+1)*B] whatever the world size: 1, 2 or 8 ranks train the same schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ffdist.data.datasets import DataSpec, build_datasets, collate
from ffdist.errors import RecipeError
from ffdist.recipe import Recipe
from ffdist.resolved import BatchPlan


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

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, copy) of every sample of the epoch, in global-batch order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
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
        if self.repeats > 1:
            return iter([(e, i, c) for i, c in zip(index[mine].tolist(), copy[mine].tolist())])
        return iter([(e, i) for i in index[mine].tolist()])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.skip) * self.plan.per_rank


class ShardSampler(Sampler[int]):
    """Eval: rank r gets a contiguous, disjoint shard; the shards cover the set exactly once
    (no padding with duplicates, unlike DistributedSampler)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.start = n * rank // world_size
        self.stop = n * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _loader(ds: Dataset, sampler: Sampler, batch: int, recipe: Recipe, pin: bool,
            drop_last: bool) -> DataLoader:
    workers = recipe.data.num_workers
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": recipe.data.persistent_workers,
                 "prefetch_factor": recipe.data.prefetch_factor}
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=drop_last, collate_fn=collate, **extra)


@dataclass
class Loaders:
    spec: DataSpec
    plan: BatchPlan
    train: DataLoader
    val: DataLoader
    train_sampler: TrainSampler


def build(recipe: Recipe, rank: int, plan: BatchPlan, device: torch.device) -> Loaders:
    """Train/eval loaders of this rank, for the batch plan the run resolved
    (ffdist.assemble.resolve: the loaders never recompute it)."""
    if not isinstance(plan, BatchPlan):
        raise TypeError("ffdist.data.build takes the BatchPlan of ffdist.assemble.resolve() "
                        f"(resolved.plan), not {type(plan).__name__}")
    from ffdist import mixup
    world_size = plan.world_size
    spec = build_datasets(recipe.data, recipe.seed, recipe.model.num_classes,
                          recipe.model.in_channels)
    sampler = TrainSampler(len(spec.train), plan, rank, recipe.seed,
                           repeats=recipe.data.repeated_augmentation,
                           pairs=mixup.enabled(recipe.data))
    eval_global = recipe.data.eval_batch_size or recipe.data.batch_size
    eval_batch = max(1, eval_global // world_size)
    pin = device.type == "cuda"  # pinned host memory only helps (and only works) with CUDA
    train = _loader(spec.train, sampler, plan.micro, recipe, pin, drop_last=True)
    val = _loader(spec.val, ShardSampler(len(spec.val), rank, world_size), eval_batch, recipe,
                  pin, drop_last=False)
    return Loaders(spec, plan, train, val, sampler)


class DevicePrefetcher:
    """Moves uint8 batches to the device, then converts, normalizes and lays them out there.

    On CUDA the copy of batch k+1 runs on a side stream (pinned memory, non_blocking) while
    batch k computes, as in timm's PrefetchLoader; `record_stream` tells the caching
    allocator the tensors are used on the main stream. On the CPU it is a pass-through that
    still does the normalization and memory format, so both paths feed the model alike.
    """

    def __init__(self, loader: DataLoader, device: torch.device, mean: tuple[float, ...],
                 std: tuple[float, ...], channels_last: bool = False):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        # (x - mean) / std as x * scale + shift: one fused addcmul pass over the batch
        self.scale = 1.0 / self.std
        self.shift = -self.mean * self.scale

    def __len__(self) -> int:
        return len(self.loader)

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # uint8 -> float32 and the layout change in one copy, then one normalizing pass
        # (two passes over the batch, not four: layout, float, sub, div; every step).
        x = torch.addcmul(self.shift, x.to(dtype=torch.float32, memory_format=fmt), self.scale)
        if self.channels_last and not x.is_contiguous(memory_format=fmt):
            x = x.contiguous(memory_format=fmt)  # addcmul's broadcast may pick NCHW
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cuda":
            yield from self._iter_cuda()
        else:
            for x, y in self.loader:
                yield self._prepare(x, y)

    def _iter_cuda(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = torch.cuda.Stream(device=self.device)
        pending = None
        for x, y in self.loader:
            with torch.cuda.stream(stream):
                nxt = self._prepare(x, y)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in nxt:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = nxt
        if pending is not None:
            yield pending
