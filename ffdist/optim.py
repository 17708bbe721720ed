"""Optimizers and the learning-rate schedule.

The schedule is a pure function of the optimizer step (`lr_at`), set on the param groups
before every step: a checkpoint needs no scheduler object, only the step, and a resumed
run (with any world size) gets the same learning rate as an uninterrupted one.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from ffdist.recipe import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (frozen ones stay out of the optimizer); no weight decay
    on biases and normalization weights (1-d tensors), as in timm and torchvision refs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _impl_kwargs(device: torch.device) -> dict:
    # fused kernels exist for CUDA; foreach (multi-tensor) is the fast path elsewhere.
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        from ffdist.errors import RecipeError

        raise RecipeError("model.freeze leaves no trainable parameter; freeze less.")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **_impl_kwargs(device))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_impl_kwargs(device))


def total_steps(sched: ScheduleConfig, steps_per_epoch: int) -> int:
    full = sched.epochs * steps_per_epoch
    return min(full, sched.max_steps) if sched.max_steps else full


def lr_at(step: int, base_lr: float, sched: ScheduleConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay."""
    total = total_steps(sched, steps_per_epoch)
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    if step < warmup:
        f = sched.warmup_start_factor
        return base_lr * (f + (1.0 - f) * step / warmup)
    epoch = step // steps_per_epoch
    if sched.scheduler == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return sched.min_lr + (base_lr - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if sched.scheduler == "step":
        return base_lr * sched.gamma ** (epoch // sched.step_size)
    if sched.scheduler == "multistep":
        return base_lr * sched.gamma ** bisect.bisect_right(sorted(sched.milestones), epoch)
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
