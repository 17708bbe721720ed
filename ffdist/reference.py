"""The hand-written training loop that `ffdist bench --reference` times next to the Trainer.

It is what a PyTorch user writes for the same run, and nothing more: the recipe's model
(ffdist.assemble.build_model: same architecture, same frozen layers), moved to the device
in the recipe's memory format, compiled when the recipe compiles (same backend), wrapped in
DDP under a launcher; forward under torch.autocast to the run's precision; cross-entropy
on fp32 logits; backward (GradScaler-scaled for fp16); clipping if the recipe clips; the
optimizer step (GradScaler.step for fp16); zero_grad(set_to_none=True). The optimizer is
ffdist.optim.build_optimizer's: the same fused kernel and the same two param groups, so
the ratio measures the Trainer's own overhead (flags, logging window, prefetcher, schedule),
not a different optimizer. No NaN check, no flags, no host read: the limit, on batches that
are already on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ffdist.precision import autocast

if TYPE_CHECKING:
    from ffdist.dist import DistInfo
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

Batch = tuple[torch.Tensor, torch.Tensor]


def refuse(resolved: Resolved) -> None:
    """A run the loop cannot mirror (its strategy declares no hand-written loop to compare
    with) is one sentence, before bench builds anything."""
    from ffdist import strategies

    cls = strategies.get(resolved.strategy)
    if not cls.has_reference_loop:
        from ffdist.errors import RecipeError

        raise RecipeError("bench --reference times a hand-written single-device/DDP loop; "
                          f"{cls.title} has none to compare with: drop --reference or use "
                          "strategy.name=ddp.")


class ReferenceLoop:
    def __init__(self, recipe: Recipe, resolved: Resolved, info: DistInfo):
        from ffdist.assemble import build_model
        from ffdist.optim import build_optimizer
        from ffdist.strategies.single import _compiled

        refuse(resolved)
        device = info.device
        fmt = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
        self.raw = build_model(recipe, load_weights=False).to(device=device, memory_format=fmt)
        self.optimizer = build_optimizer(self.raw, recipe.optim, device)
        self.model: nn.Module = self.raw
        if recipe.model.compile:
            self.model = _compiled(self.raw, recipe.model.compile_backend)
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=recipe.strategy.bucket_cap_mb, gradient_as_bucket_view=True)
        self.precision, self.device = resolved.precision, device
        self.scaler = torch.amp.GradScaler(device.type) if resolved.precision == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
        self.accum, self.grad_clip = resolved.plan.accum, recipe.optim.grad_clip

    def train_step(self, batches: Iterator[Batch], lr: float) -> None:
        opt, scaler = self.optimizer, self.scaler
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(self.accum):
            x, y = next(batches)
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with autocast(self.precision, self.device):
                    logits = self.model(x)
                loss = self.criterion(logits.float(), y) / self.accum
                (scaler.scale(loss) if scaler else loss).backward()
        if self.grad_clip is not None:
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip, foreach=True)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
