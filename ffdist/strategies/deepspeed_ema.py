"""The EMA of the weights under DeepSpeed (DeepSpeed.make_ema builds it): an EMA of the
fp32 MASTER weights, each rank averaging the part of them it owns. Buffers, the update,
the consolidated checkpoint format and the swap's bookkeeping are the shared sharded EMA's
(ffdist.strategies.sharded_ema).

Why the master and not the module: under bf16 the module holds bf16 copies of the
weights; their EMA would average rounded values, and an update smaller than a bf16 step
(~0.4% of the weight) would not reach it. The optimizer's fp32 master is what training
really moves: its EMA is the EMA of the full fp32 weights that DDP computes, with the
memory of ZeRO: 4 bytes per trainable parameter / world size per rank.

Which part a rank owns (DeepSpeed's public tensor-fragment API, deepspeed.utils):
- ZeRO-1/2 (and bf16 ZeRO-0): `param._hp_mapping`, the fragment [start, start + n) of the
  flattened parameter that this rank's fp32 partition holds (none on some ranks);
- ZeRO-3: `safe_get_local_fp32_param(param)`, this rank's partition, the same elements as
  `param.ds_tensor` (the low-precision partition the forward all-gathers);
- DeepSpeed without a master (fp32 ZeRO-0): the module's weights, full on every rank.
Frozen parameters have no master and never change (their EMA is themselves).

Evaluating with the EMA (`swapped`): ZeRO-3 writes each rank's EMA partition into
`ds_tensor` and releases every gathered copy (`engine.empty_partition_cache`), so the
forward all-gathers EMA weights and no rank holds more than usual; ZeRO-1/2 gather each
parameter's EMA (one all-reduce per parameter) into the module's full weights.
Consolidating (`state_dict()` / `weights()`) gathers the trainable parameters (an
all-gather per ZeRO-3 partition, an all-reduce per ZeRO-1/2 fragment), then the frozen
ones; `load_state_dict` takes each rank's part back out of it, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ffdist.ema import average
from ffdist.strategies.sharded_ema import Saved, ShardedEMA, named_params


@dataclass
class Piece:
    """This rank's part of one trainable parameter's EMA."""

    name: str
    param: nn.Parameter
    kind: str                     # z3 | frag | full
    shadow: torch.Tensor          # fp32, flat (empty when this rank owns nothing of it)
    start: int = 0                # frag: where the part sits in the flattened parameter
    source: torch.Tensor | None = None  # the master part, cached when it is a stable view


class ZeroEMA(ShardedEMA):
    """ShardedEMA over the fp32 master partitions of a DeepSpeed engine."""

    split = "partitioned"

    def __init__(self, engine: Any, decay: float, every: int = 1,
                 warmup_steps: int = 0, buffers: str = "average"):
        super().__init__(engine.module, decay, every, warmup_steps, buffers)
        self.engine = engine  # deepspeed's DeepSpeedEngine
        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        params = named_params(self.module)
        self.pieces = [self._piece(n, p) for n, p in params.items() if p.requires_grad]
        self.frozen = sorted(n for n, p in params.items() if not p.requires_grad)

    def _piece(self, name: str, p: nn.Parameter) -> Piece:
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the parameter
            src = _local_fp32(p)
            stable = src.data_ptr() == _local_fp32(p).data_ptr()  # a view, not a copy
            return Piece(name, p, "z3", src.detach().float().clone(),
                         source=src if stable else None)
        mapping = getattr(p, "_hp_mapping", "none")
        if mapping == "none":  # no master (fp32 ZeRO-0): the module's weights
            return Piece(name, p, "full", p.detach().float().reshape(-1).clone(),
                         source=p.detach().view(-1))
        if mapping is None:  # ZeRO-1/2: another rank's partition holds all of it
            return Piece(name, p, "frag", torch.empty(0, device=p.device))
        frag = mapping.hp_fragment
        return Piece(name, p, "frag", frag.detach().float().clone(),
                     start=mapping.lp_fragment_address.start, source=frag)

    def _update_params(self, weight: float, applied: bool | torch.Tensor | None) -> None:
        mine = [p for p in self.pieces if p.shadow.numel()]
        by_device: dict[torch.device, tuple[list, list]] = {}
        for p in mine:  # offloaded masters live on the CPU: one foreach call per device
            ema, cur = by_device.setdefault(p.shadow.device, ([], []))
            ema.append(p.shadow)
            cur.append(p.source if p.source is not None else _local_fp32(p.param))
        for ema, cur in by_device.values():
            average(ema, cur, weight, applied)

    # ------------------------------------------------------------------ gathering
    def _full(self, piece: Piece) -> torch.Tensor:
        """The full fp32 EMA of one parameter on every rank (a collective)."""
        p = piece.param
        numel = int(getattr(p, "ds_numel", p.numel()))
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if piece.kind == "full" or self.world == 1 and piece.kind != "z3":
            return piece.shadow.view(shape)
        if piece.kind == "z3":
            parts = [torch.empty_like(piece.shadow) for _ in range(self.world)]
            tdist.all_gather(parts, piece.shadow)
            return torch.cat(parts)[:numel].view(shape)
        full = torch.zeros(numel, dtype=torch.float32, device=piece.shadow.device)
        n = piece.shadow.numel()
        full[piece.start:piece.start + n] = piece.shadow
        tdist.all_reduce(full)  # each element is owned by one rank, the others add 0
        return full.view(shape)

    def _frozen_full(self, name: str) -> torch.Tensor:
        p = named_params(self.module)[name]
        if not hasattr(p, "ds_id"):
            return p.detach().float()
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().float().clone()

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        for piece in self.pieces:
            yield piece.name, self._full(piece)
        for name in self.frozen:  # constant: the EMA of a frozen weight is the weight
            yield name, self._frozen_full(name)

    # ------------------------------------------------------------------ checkpoints
    def _load_params(self, shadow: dict[str, torch.Tensor]) -> None:
        """Every rank takes its own part of the consolidated EMA (any rank's file)."""
        for piece in self.pieces:
            flat = shadow[piece.name].reshape(-1)
            n = piece.shadow.numel()
            if piece.kind == "z3":
                padded = torch.zeros(n * self.world, dtype=torch.float32)
                padded[:flat.numel()] = flat
                part = padded[self.rank * n:(self.rank + 1) * n]
            elif piece.kind == "frag":
                part = flat[piece.start:piece.start + n]
            else:
                part = flat
            piece.shadow.copy_(part)

    def _refresh_params(self) -> None:
        for piece in self.pieces:  # the restore may have replaced the master tensors
            if piece.kind == "z3" and piece.source is not None:
                piece.source = _local_fp32(piece.param)
            elif piece.kind == "frag" and piece.shadow.numel():
                piece.source = piece.param._hp_mapping.hp_fragment

    def _reset_params(self) -> None:
        for piece in self.pieces:
            if piece.shadow.numel():
                piece.shadow.copy_(piece.source if piece.source is not None
                                   else _local_fp32(piece.param))

    # ------------------------------------------------------------------ evaluation
    def _swap_params(self, saved: Saved) -> None:
        """ZeRO-3: the EMA partitions into ds_tensor; ZeRO-1/2 and ZeRO-0: the gathered
        EMA into the full weights (a collective per parameter: every rank enters swapped)."""
        for piece in self.pieces:
            target = piece.param.ds_tensor if piece.kind == "z3" else piece.param.data
            value = piece.shadow if piece.kind == "z3" else self._full(piece)
            saved.append((target, target.detach().clone()))
            target.copy_(value.view(target.shape).to(target.dtype))

    def _after_swap(self) -> None:
        """ZeRO-3: gathered parameters (persistent ones, or left over from the last
        forward) hold full copies of the old partitions; release them all (DeepSpeed's
        engine.empty_partition_cache, local), so the next forward gathers the new ones."""
        if any(p.kind == "z3" for p in self.pieces):
            self.engine.empty_partition_cache()


def _local_fp32(p: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)
