"""Optimizers, their skip on the device, and the learning-rate schedule.

The schedule is a pure function of the optimizer step (`lr_at`), set on the param groups
before every step: a checkpoint needs no scheduler object, only the step, and a resumed
run (with any world size) gets the same learning rate as an uninterrupted one.

Skipping a step on the device. torch's fused SGD/Adam/AdamW kernels (CUDA, and the CPU
since torch 2.4) take a `found_inf` tensor, the mechanism GradScaler uses: when it holds
1.0 the kernel returns before touching anything, so a step with a non-finite loss (or an
fp16 overflow) is skipped without the host reading a flag. `step_unless` drives it.

Fused Adam/AdamW honour it exactly (their step counters are restored on the device).
Fused SGD with momentum does not, on its FIRST step (torch 2.4-2.14, torch/optim/sgd.py
`_fused_sgd`): with no momentum buffer yet it allocates them with `torch.empty_like` and
tells the kernel `is_first_step=True` (buffer = gradient); a skipped kernel leaves that
uninitialised memory in the buffers, which are now in the optimizer state, and the next
applied step computes momentum * garbage + gradient. fp16 overflows its first steps by
design (GradScaler starts at 2**16), hence the NaN from step 4 on seen on an H100 and
reproduced on the CPU with GradScaler("cpu"). `build_optimizer` therefore creates the
momentum buffers up front as zeros: the kernel never takes its first-step branch, and
momentum * 0 + (1 - dampening) * g == g exactly (ffdist uses dampening 0), which is what
the first-step branch computes. The skip is then exact: a run with skipped steps equals,
bit for bit, the same fused optimizer stepping only the applied steps
(tests/unit/test_device_skip.py).
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


# Devices with fused SGD/Adam/AdamW kernels that honour found_inf (torch >= 2.4).
FUSED_DEVICES = ("cuda", "cpu")


def _impl_kwargs(device: torch.device) -> dict:
    # fused: one kernel per step and the on-device skip; foreach (multi-tensor) elsewhere.
    return {"fused": True} if device.type in FUSED_DEVICES else {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, *,
                    skips_on_device: bool = True, sharded: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters, fused where torch has the kernel.

    `skips_on_device` (single device, DDP, FSDP): SGD's momentum buffers are created now, so
    that the fused kernel's found_inf skip is exact (see the module docstring). DeepSpeed
    passes False: it skips on the host and re-partitions the param groups into flat shards,
    which per-parameter buffers would only duplicate. `sharded` (FSDP: DTensor parameters):
    torch 2.14 has DTensor rules for the fused AdamW kernel but not for fused SGD, so SGD
    is foreach there (its skip then decided on the host: step_unless)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        from ffdist.errors import RecipeError

        raise RecipeError("model.freeze leaves no trainable parameter; freeze less.")
    if cfg.name == "sgd":
        impl = {"foreach": True} if sharded else _impl_kwargs(device)
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, **impl)
        if skips_on_device:
            init_momentum_buffers(opt)
        return opt
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_impl_kwargs(device))


def init_momentum_buffers(opt: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for every SGD parameter that has none (after construction and
    after load_state_dict: a checkpoint written before a parameter's first step lacks
    them). Exact for dampening 0: the first update is then momentum * 0 + g = g."""
    if not isinstance(opt, torch.optim.SGD):
        return
    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:  # then momentum * 0 + (1 - d) * g differs from g
            raise ValueError("init_momentum_buffers needs dampening=0")
        for p in group["params"]:
            state = opt.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def skips_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt.step()` honours `opt.found_inf` on the device (torch's fused kernels)."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


def step_unless(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`opt.step()`, skipped where `found_inf` (0-dim float32 on the parameters' device)
    holds 1.0: on the device with a fused optimizer, as GradScaler.step drives it; on the
    host otherwise (a sync point, only for optimizers without a fused kernel here).
    The kernels compare with 1.0 exactly: pass 0.0 or 1.0, never a count."""
    if skips_on_device(opt):
        opt.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
    elif not found_inf.item():  # sync point: no kernel here can skip by itself
        opt.step()


def total_steps(sched: ScheduleConfig, steps_per_epoch: int) -> int:
    full = sched.epochs * steps_per_epoch
    return min(full, sched.max_steps) if sched.max_steps else full


def lr_at(step: int, base_lr: float, sched: ScheduleConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup (schedule.warmup_steps,
    or warmup_epochs of steps_per_epoch), then the decay. `base_lr`: the run's peak lr
    (Resolved.lr: optim.lr, scaled when optim.lr_reference_batch says so)."""
    total = total_steps(sched, steps_per_epoch)
    warmup = sched.warmup_steps or int(round(sched.warmup_epochs * steps_per_epoch))
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
