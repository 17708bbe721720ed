"""The EMA of the weights under FSDP (FSDP.make_ema builds it): each rank averages its
local shards of the fp32 parameters (the DTensors' local tensors). Buffers, the update,
the consolidated checkpoint format and the swap's bookkeeping are the shared sharded EMA's
(ffdist.strategies.sharded_ema).

The sharded parameters are fp32 in every precision (the MixedPrecisionPolicy casts only
the gathered copies), so this is the EMA of the full fp32 weights that DDP computes, with
4 bytes per parameter / world size per rank.

Gathering: one all-gather per parameter (`DTensor.full_tensor`). `load_state_dict` cuts
this rank's part out of the consolidated EMA at the CURRENT world size
(`distribute_tensor` with no source rank: no communication), so the EMA reshards with the
DCP shards. `swapped` writes each rank's EMA shard into its parameter shard: the next
forward gathers EMA weights; the raw shards are restored from copies, exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ffdist.ema import average
from ffdist.strategies.sharded_ema import Saved, ShardedEMA, named_params


class ShardEMA(ShardedEMA):
    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0,
                 buffers: str = "average"):
        super().__init__(model, decay, every, warmup_steps, buffers)
        self.params = named_params(model)  # name -> DTensor parameter (sharded)
        self.local = {n: _local(p).detach().float().clone() for n, p in self.params.items()}
        self._refresh_params()

    def _refresh_params(self) -> None:
        """The model's local shards, held by reference (updated in place by the optimizer
        and by load_shards)."""
        self._shards = [_local(p).detach() for p in self.params.values()]

    def _update_params(self, weight: float, applied: bool | torch.Tensor | None) -> None:
        average(list(self.local.values()), self._shards, weight, applied)

    def _full(self, name: str) -> torch.Tensor:
        """The full fp32 EMA of one parameter on every rank (an all-gather)."""
        from torch.distributed.tensor import DTensor

        p = self.params[name]
        if not isinstance(p, DTensor):
            return self.local[name]
        return DTensor.from_local(self.local[name], p.device_mesh, p.placements,
                                  shape=p.shape, stride=p.stride()).full_tensor()

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.params:
            yield name, self._full(name)

    def _load_params(self, shadow: dict[str, torch.Tensor]) -> None:
        """This rank's part, cut as its parameters are sharded now."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in self.params.items():
            full = shadow[name].to(self.local[name].device, torch.float32)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements,
                                         src_data_rank=None).to_local()
            self.local[name].copy_(full)

    def _reset_params(self) -> None:
        for ema, cur in zip(self.local.values(), self._shards):
            ema.copy_(cur)

    def _swap_params(self, saved: Saved) -> None:
        """Every rank's parameter shards hold its EMA shards (the forward gathers them)."""
        for target, value in zip(self._shards, self.local.values()):
            saved.append((target, target.clone()))
            target.copy_(value.to(target.dtype))


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of FSDP's sharded storage), else the tensor."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p
