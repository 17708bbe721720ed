"""One device, no wrapper: the fallback when no launcher started us. DDP extends it.

Its memory model (`ffdist plan`'s "DDP" row, single device and DDP alike): the module
keeps fp32 weights also with bf16/fp16 (autocast casts activations, not weights): params
4P, grads 4T, optimizer 4*S*T (P all parameters, T trainable ones, S optimizer states per
parameter: ffdist.memory); no master copy. So "bf16" does not shrink DDP's model states;
it shrinks activations.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ffdist import memory, optim
from ffdist.dist import DistInfo
from ffdist.optim import build_optimizer, set_lr
from ffdist.precision import Autocast
from ffdist.recipe import Recipe
from ffdist.state_dicts import clean_state_dict
from ffdist.strategies.base import TORCH_FILE, Strategy

if TYPE_CHECKING:
    from ffdist.resolved import Resolved


class SingleDevice(Strategy):
    title = "single device / DDP"
    one_process = True
    # The one-file layout holds the whole state: any world size resumes it (DDP too).
    reads = (TORCH_FILE, "v2:single", "v2:ddp")  # and what format 2 called them
    reshards = True
    has_reference_loop = True
    memory_rows = {"DDP": "strategy.name=ddp"}
    # The optimizer update is applied or skipped on the device (ffdist.optim.step_unless).
    skips_on_device = True

    @classmethod
    def model_state_bytes(cls, num_params: int, trainable: int, optimizer: str,
                          precision: str, world_size: int = 1,
                          momentum: bool = True) -> dict[str, int]:
        """Bytes per device of params / grads / optimizer states and their total: fp32
        weights whatever the precision (checked all the same), replicated on every rank."""
        memory.weight_bytes(precision)
        s = memory.optimizer_states_per_param(optimizer, momentum)
        return memory.with_total({"params": 4 * num_params, "grads": 4 * trainable,
                                  "optimizer": 4 * s * trainable})

    @classmethod
    def row_bytes(cls, row: str, num_params: int, trainable: int, recipe: Recipe,
                  resolved: Resolved) -> dict[str, int]:
        return cls.model_state_bytes(num_params, trainable, recipe.optim.name,
                                     resolved.precision, resolved.plan.world_size,
                                     momentum=recipe.optim.momentum > 0)

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo):
        device = info.device
        fmt = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
        self.raw = model.to(device=device, memory_format=fmt)
        self.device = device
        self.grad_clip = recipe.optim.grad_clip
        self.optimizer = build_optimizer(self.raw, recipe.optim, device)
        # fp32 weights, ops autocast to bf16/fp16 (DeepSpeed instead converts the weights).
        self.numerics = Autocast(resolved.precision, device)
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type) if resolved.precision == "fp16" else None
        # Compile the plain module; a DDP subclass wraps the compiled one. Checkpoints come
        # from self.raw, so their keys carry no `_orig_mod.` prefix.
        self.model = _compiled(self.raw, recipe.model.compile_backend) if recipe.model.compile \
            else self.raw

    def autocast(self) -> AbstractContextManager:
        return self.numerics.autocast()

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def no_sync(self, boundary: bool) -> AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, skip: torch.Tensor) -> torch.Tensor:
        """Unscale (fp16), clip, and step unless `skip` or an fp16 overflow, all decided on
        the device: GradScaler's found_inf joins ours, and the fused optimizer honours the
        sum (ffdist.optim.step_unless). No host sync (GradScaler.update is on the device)."""
        set_lr(self.optimizer, lr)
        found = skip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # fp32 grads, and the overflow check
            found = torch.maximum(found, _overflow(self.scaler, self.optimizer))
        if self.grad_clip is not None:  # (non-finite grads make a NaN norm: skipped anyway)
            params = [p for p in self.raw.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        optim.step_unless(self.optimizer, found)
        if self.scaler is not None:
            self.scaler.update()  # backs off on the scaler's own overflow only
        self.optimizer.zero_grad(set_to_none=True)
        return 1.0 - found

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def unwrap(self) -> nn.Module:
        return self.raw

    def state_dict(self) -> dict[str, Any]:
        return {"model": clean_state_dict(self.raw.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {}}

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        return clean_state_dict(self.raw.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # ffdist.strategies.check_resume has refused the layouts this class does not read.
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        optim.init_momentum_buffers(self.optimizer)  # (a step-0 checkpoint may lack some)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _overflow(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    """1.0 where GradScaler.unscale_ found inf/NaN gradients, else 0.0 (on the device).

    GradScaler keeps this per optimizer and device and hands it to fused optimizers as
    `found_inf` inside its own step(); we step the optimizer ourselves (to add the loss
    flag), so we read it through `_found_inf_per_device`, the one private GradScaler call
    in ffdist (tests/unit/test_device_skip.py fails if torch changes it)."""
    per_device = list(scaler._found_inf_per_device(opt).values())
    found = per_device[0]
    for more in per_device[1:]:
        found = torch.maximum(found, more.to(found.device))
    return found


def _compiled(model: nn.Module, backend: str) -> nn.Module:
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if backend not in known:
        from ffdist.errors import RecipeError

        raise RecipeError(f"model.compile_backend={backend!r} is not a torch.compile backend; "
                          "use inductor, aot_eager or eager (all: torch._dynamo.list_backends()).")
    return torch.compile(model, backend=backend)
