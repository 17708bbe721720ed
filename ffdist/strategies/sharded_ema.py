"""The shared part of the sharded EMAs of the weights: FSDP's ShardEMA (fsdp_ema.py, the
EMA of the DTensors' local fp32 shards) and DeepSpeed's ZeroEMA (deepspeed_ema.py, the EMA
of ZeRO's fp32 master partitions). Each rank averages only its own part of the parameters,
4 bytes per parameter / world size, gathered only to evaluate, to checkpoint and to write
model.pt. ShardedEMA holds everything that is not that part; a subclass supplies the
parameters' own update, gather, load, reset and swap (the abstract methods below).

Buffers (BatchNorm statistics) are never sharded: every rank averages (or, `buffers=
"copy"` and integer buffers, copies) its own from the module, as ffdist.ema.EMA does, and
rank 0's are saved. The update is ffdist.ema's arithmetic (`average`: a foreach lerp,
masked on the device by the step's `applied` flag) over plain local tensors: no
collective, no host read.

`state_dict()` / `weights()` consolidate the full fp32 EMA on rank 0 (collectives: every
rank calls them; one gather per parameter, in the same order on every rank), the same
plain state dict as ffdist.ema.EMA's, in the module's state order, so checkpoints, best.pt
and model.pt hold one format whatever the strategy. `load_state_dict` checks the section's
keys, then every rank takes its own part back out of it (no communication: every rank
holds the whole section). `swapped` puts the EMA into the module and restores the raw
weights from saved copies, exactly. `copy_to` / `module_copy` would need the full weights
on one rank: they raise NotImplementedError (use swapped() or weights()).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ffdist.ema import EMA, _named_state, average, copy_masked
from ffdist.state_dicts import clean_state_dict

Saved = list[tuple[torch.Tensor, torch.Tensor]]  # (tensor, its copy), put back after swapped


class ShardedEMA(EMA, ABC):
    """ffdist.ema.EMA's interface (update, swapped, state_dict, load_state_dict, restore,
    weights) over a parameter EMA that is split over the ranks."""

    collective = True  # state_dict() and weights() gather the parts: every rank calls
    split = "sharded"  # how the errors of copy_to / module_copy name the weights

    def __init__(self, module: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0,
                 buffers: str = "average"):
        # not EMA.__init__: it would hold a full fp32 shadow of every parameter on every rank
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in [0, 1)")
        self.decay, self.every, self.warmup_steps, self.buffers = decay, every, warmup_steps, buffers
        self.updates = 0
        self.module = module
        state = _named_state(module)
        params = named_params(module)
        self.buffer_names = [k for k in state if k not in params]
        self.shadow = {k: _fp32(state[k]) for k in self.buffer_names}  # the buffers' only
        self.averaged = [k for k in self.buffer_names
                         if state[k].is_floating_point() and buffers == "average"]
        self.copied = [k for k in self.buffer_names if k not in set(self.averaged)]
        self.state_names = set(params) | set(self.buffer_names)  # the saved shadow's keys
        self._lists = None
        self._buffers = self._buffer_refs()

    def _buffer_refs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The module's buffers to average and to copy, held by reference: a state_dict()
        per update costs ~1.4 ms for a ResNet-50 (see EMA._tensors)."""
        state = _named_state(self.module)
        return ([state[k].detach() for k in self.averaged],
                [state[k].detach() for k in self.copied])

    # ------------------------------------------------------------------ the parameters' part
    @abstractmethod
    def _update_params(self, weight: float, applied: bool | torch.Tensor | None) -> None:
        """Average this rank's part of the parameters (`average`): device work only."""

    @abstractmethod
    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 EMA) of every parameter, yielded on every rank: a collective
        per parameter, in the same order on every rank."""

    @abstractmethod
    def _load_params(self, shadow: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of every parameter out of a consolidated shadow."""

    @abstractmethod
    def _refresh_params(self) -> None:
        """Take the parameters' tensors again: a restore may have replaced them."""

    @abstractmethod
    def _reset_params(self) -> None:
        """Start this rank's part again from the weights (a checkpoint without an EMA)."""

    @abstractmethod
    def _swap_params(self, saved: Saved) -> None:
        """Write the EMA into the parameters, appending (tensor, its copy) to `saved`."""

    def _after_swap(self) -> None:
        """Called once the EMA is in the module and again once the raw weights are back."""

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, model: nn.Module, step: int,
               applied: bool | torch.Tensor | None = None) -> bool:
        """As EMA.update, over this rank's part of the parameters and the module's buffers
        (held by reference: `model` is not read). No collective, no host read."""
        if not self.due(step):
            return False
        self.updates += 1
        if applied is False:
            return True
        weight = 1.0 - self.decay_at(step)
        self._update_params(weight, applied)
        averaged, copied = self._buffers
        average([self.shadow[k] for k in self.averaged], averaged, weight, applied)
        if self.copied:
            copy_masked([self.shadow[k] for k in self.copied], copied, applied)
        return True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any] | None:
        """The consolidated EMA (EMA.state_dict's format) on rank 0, None on the others; a
        collective (one gather per parameter)."""
        primary = not tdist.is_initialized() or tdist.get_rank() == 0  # it receives the EMA
        shadow = {}
        for name, full in self._gathered():
            if primary:  # the other ranks only take part in the gather
                shadow[name] = full.detach().cpu().clone()
        if not primary:
            return None
        shadow.update({k: v.detach().cpu().clone() for k, v in self.shadow.items()})
        order = list(_named_state(self.module))
        return {"decay": self.decay, "every": self.every, "warmup_steps": self.warmup_steps,
                "buffers": self.buffers, "updates": self.updates,
                "shadow": {k: shadow[k] for k in order}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank takes its own part of the consolidated EMA (any rank's copy of it)."""
        shadow = state["shadow"]
        want = self.state_names
        if set(shadow) != want:
            missing, extra = sorted(want - set(shadow))[:3], sorted(set(shadow) - want)[:3]
            raise KeyError(f"EMA state does not fit the model (missing {missing}, unexpected "
                           f"{extra})")
        self._load_params(shadow)
        for k in self.buffer_names:
            self.shadow[k].copy_(shadow[k])
        self.updates = int(state["updates"])

    def restore(self, state: dict[str, Any] | None, model: nn.Module) -> bool:
        """As EMA.restore: the checkpoint's section, or a fresh EMA of the restored weights."""
        self._buffers = self._buffer_refs()  # the restore may have replaced the tensors
        self._refresh_params()
        if state is not None:
            self.load_state_dict(state)
            return True
        with torch.no_grad():  # no EMA in the checkpoint: start again from the weights
            self._reset_params()
            state_now = _named_state(self.module)
            for k in self.buffer_names:
                self.shadow[k].copy_(state_now[k].detach())
        return False

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 EMA, a plain state dict on rank 0 (None elsewhere): model.pt."""
        state = self.state_dict()
        return None if state is None else state["shadow"]

    # ------------------------------------------------------------------ evaluation
    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module holds the EMA inside the block, its raw weights after it (restored
        from copies: exact). Every rank enters it (the subclass may gather)."""
        saved: Saved = []
        with torch.no_grad():
            self._swap_params(saved)
            state = _named_state(self.module)
            for k in self.buffer_names:
                buf = state[k].detach()
                saved.append((buf, buf.clone()))
                buf.copy_(self.shadow[k].to(buf.dtype))
            self._after_swap()
        try:
            yield model
        finally:
            with torch.no_grad():
                for target, value in saved:
                    target.copy_(value)
                self._after_swap()

    def copy_to(self, model: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__}: use swapped() (the weights are "
                                  f"{self.split})")

    def module_copy(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}: use swapped() or weights() "
                                  f"({self.split} weights)")


def named_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters by state-dict name (no wrapper prefixes)."""
    return clean_state_dict(dict(module.named_parameters()))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float().clone() if t.is_floating_point() else t.clone()
