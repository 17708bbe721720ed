"""A data source that lives in a test: "dummy", deterministic grey 8x8 images of 4 classes
made in memory, with its own train and eval streams (no sampler, no DataLoader: a plain
iterator over global steps, as a streaming source would be).

`python -m tests.workflow.dummy_source RECIPE [key=value ...]` registers it, then runs
ffdist's own entry point (ffdist.train.main) in this process: nothing in ffdist knows the
source, which is the point of tests/workflow/test_data_source.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ffdist.data import sources
from ffdist.data.stream import DataSpec, StreamRequest, Streams, shard_bounds
from ffdist.errors import DataError, RecipeError

if TYPE_CHECKING:
    import torch

    from ffdist.recipe import DataConfig

N_TRAIN, N_VAL, CLASSES, SIZE = 200, 37, 4, 8
DATA_SEED = 1234  # the images are fixed; the recipe's seed orders them


def samples(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images first..first+count-1: sample i is class i % 4, a bright quadrant plus noise."""
    import torch

    labels = torch.arange(first, first + count) % CLASSES
    g = torch.Generator().manual_seed(DATA_SEED + first)
    images = torch.randint(0, 96, (count, 1, SIZE, SIZE), generator=g)
    for c in range(CLASSES):
        y, x = divmod(c, 2)
        images[labels == c, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4] += 128
    return images.to(torch.uint8), labels


class DummyTrainStream:
    """Global step k of epoch e is order[k*B:(k+1)*B] of a permutation seeded by (seed, e);
    rank r takes its contiguous per-rank share, cut into micro-batches."""

    def __init__(self, spec: DataSpec, req: StreamRequest):
        self.spec, self.plan, self.rank, self.seed = spec, req.plan, req.rank, req.seed
        self.steps_per_epoch = N_TRAIN // req.plan.global_batch
        if self.steps_per_epoch == 0:
            raise RecipeError(f"data.batch_size={req.plan.global_batch} is larger than the "
                              f"{N_TRAIN} dummy images; use a smaller batch.")
        self.images, self.labels = samples(N_VAL, N_TRAIN)
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(
            self.seed * 7919 + self.epoch))
        p = self.plan
        for k in range(self.skip, self.steps_per_epoch):
            mine = order[k * p.global_batch:][self.rank * p.per_rank:][:p.per_rank]
            for m in range(p.accum):
                idx = mine[m * p.micro:(m + 1) * p.micro]
                yield self.images[idx], self.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"dummy_images": N_TRAIN, "data_seed": DATA_SEED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        print(f"dummy stream: state {state} restored", flush=True)  # the test looks for it


class DummyEvalStream:
    """This rank's contiguous shard of the N_VAL eval images, in batches."""

    def __init__(self, req: StreamRequest):
        self.start, self.stop = shard_bounds(N_VAL, req.rank, req.world)
        self.batch = req.eval_batch
        self.images, self.labels = samples(0, N_VAL)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.start, self.stop, self.batch):
            j = min(i + self.batch, self.stop)
            yield self.images[i:j], self.labels[i:j]

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch)


class Dummy(sources.Source):
    name = "dummy"
    native_size = SIZE
    mean, std = (100.0,), (60.0,)

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        return [f"quadrant{c}" for c in range(CLASSES)]

    def build(self, cfg: DataConfig, req: StreamRequest) -> Streams:
        if req.pairs:
            raise DataError("data.name=dummy does not pair images for mixup/cutmix; set "
                            "data.mixup_alpha=0 and data.cutmix_alpha=0.")
        spec = DataSpec(self.classes(cfg, CLASSES), 1, SIZE, *self.normalization(1))
        return Streams(DummyTrainStream(spec, req), DummyEvalStream(req))


def main(argv: list[str]) -> int:
    from ffdist.train import main as train

    sources.register("dummy", Dummy)
    return train(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
