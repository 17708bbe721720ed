"""The EMA of the weights under FSDP (FSDP.make_ema builds it): each rank averages its
local shards of the fp32 parameters (the DTensors' local tensors), gathered only to
evaluate, to checkpoint and to write model.pt.

The sharded parameters are fp32 in every precision (the MixedPrecisionPolicy casts only
the gathered copies), so this is the EMA of the full fp32 weights that DDP computes, with
4 bytes per parameter / world size per rank. Buffers (BatchNorm statistics) are not
sharded: every rank averages its own, as ffdist.ema.EMA does, and rank 0's are saved.

The update is ffdist.ema's arithmetic (`average`: a foreach lerp, masked on the device by
the step's `applied` flag) over plain local tensors: no collective, no host read.
`state_dict()` / `weights()` consolidate the full fp32 EMA on rank 0 (collectives: one
all-gather per parameter), the same plain state dict as ffdist.ema.EMA's, so checkpoints,
best.pt and model.pt hold one format whatever the strategy; `load_state_dict` takes this
rank's part out of it at the CURRENT world size (so the EMA reshards with the DCP shards).
`swapped` writes each rank's EMA shard into its parameter shard: the next forward gathers
EMA weights; the raw shards are restored from copies, exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ffdist.ema import EMA, _named_state, average, copy_masked
from ffdist.state_dicts import clean_state_dict


class ShardEMA(EMA):
    collective = True  # state_dict() and weights() gather the shards: every rank calls

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0,
                 buffers: str = "average"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in [0, 1)")
        self.decay, self.every, self.warmup_steps, self.buffers = decay, every, warmup_steps, buffers
        self.updates = 0
        self.module = model
        self.params = _named_params(model)  # name -> DTensor parameter (sharded)
        self.local = {n: _local(p).detach().float().clone() for n, p in self.params.items()}
        state = _named_state(model)
        self.buffer_names = [k for k in state if k not in self.params]
        self.shadow = {k: _fp32(state[k]) for k in self.buffer_names}
        self.averaged = [k for k in self.buffer_names
                         if state[k].is_floating_point() and buffers == "average"]
        self.copied = [k for k in self.buffer_names if k not in set(self.averaged)]
        self._lists = None
        self._refs = self._references()

    def _references(self) -> tuple[list, list, list]:
        """The model's local shards and buffers, held by reference (updated in place by the
        optimizer and by load_shards)."""
        state = _named_state(self.module)
        return ([_local(p).detach() for p in self.params.values()],
                [state[k].detach() for k in self.averaged],
                [state[k].detach() for k in self.copied])

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, model: nn.Module, step: int,
               applied: bool | torch.Tensor | None = None) -> bool:
        if not self.due(step):
            return False
        self.updates += 1
        if applied is False:
            return True
        weight = 1.0 - self.decay_at(step)
        shards, averaged, copied = self._refs
        average(list(self.local.values()), shards, weight, applied)
        average([self.shadow[k] for k in self.averaged], averaged, weight, applied)
        if self.copied:
            copy_masked([self.shadow[k] for k in self.copied], copied, applied)
        return True

    # ------------------------------------------------------------------ checkpoints
    def _full(self, name: str) -> torch.Tensor:
        """The full fp32 EMA of one parameter on every rank (an all-gather)."""
        from torch.distributed.tensor import DTensor

        p = self.params[name]
        if not isinstance(p, DTensor):
            return self.local[name]
        return DTensor.from_local(self.local[name], p.device_mesh, p.placements,
                                  shape=p.shape, stride=p.stride()).full_tensor()

    def state_dict(self) -> dict[str, Any] | None:
        """The consolidated EMA (EMA.state_dict's format) on rank 0, None on the others."""
        import torch.distributed as tdist

        primary = not tdist.is_initialized() or tdist.get_rank() == 0
        shadow = {}
        for name in self.params:
            full = self._full(name)
            if primary:
                shadow[name] = full.detach().cpu().clone()
        if not primary:
            return None
        shadow.update({k: v.detach().cpu().clone() for k, v in self.shadow.items()})
        order = list(_named_state(self.module))
        return {"decay": self.decay, "every": self.every, "warmup_steps": self.warmup_steps,
                "buffers": self.buffers, "updates": self.updates,
                "shadow": {k: shadow[k] for k in order}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's part of the consolidated EMA, cut as its parameters are sharded now
        (no communication: every rank holds the whole section)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        shadow = state["shadow"]
        want = set(self.params) | set(self.buffer_names)
        if set(shadow) != want:
            missing, extra = sorted(want - set(shadow))[:3], sorted(set(shadow) - want)[:3]
            raise KeyError(f"EMA state does not fit the model (missing {missing}, unexpected "
                           f"{extra})")
        for name, p in self.params.items():
            full = shadow[name].to(self.local[name].device, torch.float32)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements,
                                         src_data_rank=None).to_local()
            self.local[name].copy_(full)
        for k in self.buffer_names:
            self.shadow[k].copy_(shadow[k])
        self.updates = int(state["updates"])

    def restore(self, state: dict[str, Any] | None, model: nn.Module) -> bool:
        self._refs = self._references()  # load_shards may have replaced tensors
        if state is not None:
            self.load_state_dict(state)
            return True
        with torch.no_grad():  # no EMA in the checkpoint: start again from the weights
            shards, _, _ = self._refs
            for ema, cur in zip(self.local.values(), shards):
                ema.copy_(cur)
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
        """Every rank's parameter shards hold its EMA shards inside the block (the forward
        gathers them), the raw ones after it (restored from copies: exact)."""
        shards, _, _ = self._refs
        state = _named_state(self.module)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for target, value in zip(shards, self.local.values()):
                saved.append((target, target.clone()))
                target.copy_(value.to(target.dtype))
            for k in self.buffer_names:
                buf = state[k].detach()
                saved.append((buf, buf.clone()))
                buf.copy_(self.shadow[k].to(buf.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for target, value in saved:
                    target.copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        raise NotImplementedError("ShardEMA: use swapped() (the weights are sharded)")

    def module_copy(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("ShardEMA: use swapped() or weights() (sharded weights)")


def _named_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return clean_state_dict(dict(module.named_parameters()))


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of FSDP's sharded storage), else the tensor."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float().clone() if t.is_floating_point() else t.clone()
