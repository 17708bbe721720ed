"""The EMA of the weights under DeepSpeed (DeepSpeed.make_ema builds it): an EMA of the
fp32 MASTER weights, each rank averaging the part of them it owns, gathered only to
evaluate and to write.

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
Frozen parameters have no master and never change (their EMA is themselves); float
buffers (BatchNorm statistics) are never partitioned: they are averaged from the module on
every rank, as ffdist.ema does.

Evaluating with the EMA (`swapped`): ZeRO-3 writes each rank's EMA partition into
`ds_tensor` and releases every gathered copy (`engine.empty_partition_cache`), so the
forward all-gathers EMA weights and no rank holds more than usual; ZeRO-1/2 gather each
parameter's EMA (one all-reduce per parameter) into the module's full weights. The raw
weights are restored exactly from saved copies. `state_dict()` / `weights()` consolidate
the full fp32 EMA on rank 0 (collectives: every rank calls them), the same plain state
dict as ffdist.ema.EMA's, so checkpoints, best.pt and model.pt hold one format whatever
the strategy; `load_state_dict` takes each rank's part back out of it, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ffdist.ema import EMA, _named_state, average, copy_masked
from ffdist.state_dicts import clean_state_dict


@dataclass
class Piece:
    """This rank's part of one trainable parameter's EMA."""

    name: str
    param: nn.Parameter
    kind: str                     # z3 | frag | full
    shadow: torch.Tensor          # fp32, flat (empty when this rank owns nothing of it)
    start: int = 0                # frag: where the part sits in the flattened parameter
    source: torch.Tensor | None = None  # the master part, cached when it is a stable view


class ZeroEMA(EMA):
    """ffdist.ema.EMA's interface (update, swapped, state_dict, load_state_dict, restore,
    weights) over the fp32 master partitions of a DeepSpeed engine."""

    collective = True  # state_dict() and weights() gather the partitions: every rank calls

    def __init__(self, engine: Any, decay: float, every: int = 1,
                 warmup_steps: int = 0, buffers: str = "average"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in [0, 1)")
        self.decay, self.every, self.warmup_steps, self.buffers = decay, every, warmup_steps, buffers
        self.updates = 0
        self.engine = engine  # deepspeed's DeepSpeedEngine
        self.module = engine.module
        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.pieces = [self._piece(n, p) for n, p in _named_params(self.module) if p.requires_grad]
        state = _named_state(self.module)
        owned = {p.name for p in self.pieces}
        frozen = {n for n, p in _named_params(self.module) if not p.requires_grad}
        # buffers (never partitioned), as ffdist.ema.EMA keeps them
        self.buffer_names = [k for k in state if k not in owned and k not in frozen]
        self.shadow = {k: _fp32(state[k]) for k in self.buffer_names}
        self.averaged = [k for k in self.buffer_names
                         if state[k].is_floating_point() and buffers == "average"]
        self.copied = [k for k in self.buffer_names if k not in set(self.averaged)]
        self.frozen = sorted(frozen)
        self._lists = None
        self._buffers = self._buffer_refs()

    def _buffer_refs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The module's buffers to average and to copy, held by reference: a state_dict()
        per update costs ~1.4 ms for a ResNet-50 (see EMA._tensors)."""
        state = _named_state(self.module)
        return ([state[k].detach() for k in self.averaged],
                [state[k].detach() for k in self.copied])

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

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, model: nn.Module, step: int,
               applied: bool | torch.Tensor | None = None) -> bool:
        """As EMA.update, over this rank's master partitions (`model` is the engine's
        module; its buffers are averaged like EMA's). No collective, no host read."""
        if not self.due(step):
            return False
        self.updates += 1
        if applied is False:
            return True
        weight = 1.0 - self.decay_at(step)
        mine = [p for p in self.pieces if p.shadow.numel()]
        by_device: dict[torch.device, tuple[list, list]] = {}
        for p in mine:  # offloaded masters live on the CPU: one foreach call per device
            ema, cur = by_device.setdefault(p.shadow.device, ([], []))
            ema.append(p.shadow)
            cur.append(p.source if p.source is not None else _local_fp32(p.param))
        for ema, cur in by_device.values():
            average(ema, cur, weight, applied)
        averaged, copied = self._buffers
        average([self.shadow[k] for k in self.averaged], averaged, weight, applied)
        if self.copied:
            copy_masked([self.shadow[k] for k in self.copied], copied, applied)
        return True

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
        p = dict(_named_params(self.module))[name]
        if not hasattr(p, "ds_id"):
            return p.detach().float()
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().float().clone()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any] | None:
        """The consolidated EMA (EMA.state_dict's format) on rank 0, None on the others; a
        collective (one gather per parameter)."""
        shadow = {}
        for piece in self.pieces:
            full = self._full(piece)
            if self.rank == 0:
                shadow[piece.name] = full.detach().cpu().clone()
        for name in self.frozen:  # constant: the EMA of a frozen weight is the weight
            full = self._frozen_full(name)
            if self.rank == 0:
                shadow[name] = full.cpu().clone()
        if self.rank != 0:
            return None
        shadow.update({k: v.detach().cpu().clone() for k, v in self.shadow.items()})
        order = list(_named_state(self.module))
        return {"decay": self.decay, "every": self.every, "warmup_steps": self.warmup_steps,
                "buffers": self.buffers, "updates": self.updates,
                "shadow": {k: shadow[k] for k in order}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank takes its own part of the consolidated EMA (any rank's file)."""
        shadow = state["shadow"]
        want = set(_named_state(self.module))
        if set(shadow) != want:
            missing, extra = sorted(want - set(shadow))[:3], sorted(set(shadow) - want)[:3]
            raise KeyError(f"EMA state does not fit the model (missing {missing}, unexpected "
                           f"{extra})")
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
        for k in self.buffer_names:
            self.shadow[k].copy_(shadow[k])
        self.updates = int(state["updates"])

    def restore(self, state: dict[str, Any] | None, model: nn.Module) -> bool:
        self._buffers = self._buffer_refs()
        for piece in self.pieces:  # the restore may have replaced the master tensors
            if piece.kind == "z3" and piece.source is not None:
                piece.source = _local_fp32(piece.param)
            elif piece.kind == "frag" and piece.shadow.numel():
                piece.source = piece.param._hp_mapping.hp_fragment
        if state is not None:
            self.load_state_dict(state)
            return True
        with torch.no_grad():  # no EMA in the checkpoint: start again from the weights
            for piece in self.pieces:
                if piece.shadow.numel():
                    piece.shadow.copy_(piece.source if piece.source is not None
                                       else _local_fp32(piece.param))
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
        """The engine's module holds the EMA inside the block, its raw weights after it
        (restored from copies: exact). A collective: every rank enters it."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        z3 = [p.param for p in self.pieces if p.kind == "z3"]
        with torch.no_grad():
            for piece in self.pieces:
                target = piece.param.ds_tensor if piece.kind == "z3" else piece.param.data
                value = piece.shadow if piece.kind == "z3" else self._full(piece)
                saved.append((target, target.detach().clone()))
                target.copy_(value.view(target.shape).to(target.dtype))
            state = _named_state(self.module)
            for k in self.buffer_names:
                saved.append((state[k], state[k].detach().clone()))
                state[k].copy_(self.shadow[k].to(state[k].dtype))
            self._release(z3)
        try:
            yield model
        finally:
            with torch.no_grad():
                for target, value in saved:
                    target.copy_(value)
                self._release(z3)

    def _release(self, z3: list[nn.Parameter]) -> None:
        """ZeRO-3: gathered parameters (persistent ones, or left over from the last
        forward) hold full copies of the old partitions; release them all (DeepSpeed's
        engine.empty_partition_cache, local), so the next forward gathers the new ones."""
        if z3:
            self.engine.empty_partition_cache()

    def copy_to(self, model: nn.Module) -> None:
        raise NotImplementedError("ZeroEMA: use swapped() (the weights are partitioned)")

    def module_copy(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("ZeroEMA: use swapped() or weights() (partitioned weights)")


def _named_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(clean_state_dict(dict(module.named_parameters())).items())


def _fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float().clone() if t.is_floating_point() else t.clone()


def _local_fp32(p: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)
