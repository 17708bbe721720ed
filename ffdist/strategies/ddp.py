"""DistributedDataParallel: gradients all-reduced in buckets during backward.

Alone (strategy.name=ddp with one process) there is nothing to synchronise: it trains as
the single-device strategy does, with no wrapper."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ffdist.dist import DistInfo
from ffdist.recipe import Recipe
from ffdist.strategies.single import SingleDevice

if TYPE_CHECKING:
    from ffdist.resolved import Resolved


class DDP(SingleDevice):
    one_process = False
    alone = "single"  # nothing to all-reduce: resolve_name names what trains

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo):
        if info.world_size == 1:  # one process: no group to all-reduce over
            super().__init__(model, recipe, resolved, info)
            return
        if recipe.strategy.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(model, recipe, resolved, info)
        device = info.device
        # model.compile: SingleDevice compiled the plain module; DDP wraps the compiled one,
        # so checkpoints (from self.raw) carry neither `module.` nor `_orig_mod.`.
        self.model = DistributedDataParallel(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=recipe.strategy.bucket_cap_mb,
            find_unused_parameters=recipe.strategy.find_unused_parameters,
            gradient_as_bucket_view=True,
        )

    def no_sync(self, boundary: bool) -> AbstractContextManager:
        # Accumulation micro-steps skip the all-reduce; the boundary step syncs the sum.
        if boundary or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()
