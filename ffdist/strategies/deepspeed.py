"""DeepSpeed ZeRO 1/2/3 (optionally offloading optimizer state / parameters to the CPU).

`deepspeed.initialize` is called directly (accelerate's DeepSpeed plugin fails on CPUs).
The config comes from ffdist.strategies.ds_config (derived from the recipe); the optimizer
is ffdist.optim's, handed over as a client optimizer; the learning rate is set on its
param groups before each step (no DeepSpeed scheduler).

Gradient accumulation, as the engine drives it: the Trainer divides every micro-step's
loss by the accumulation count itself, so `engine.backward(loss, scale_wrt_gas=False)`
(DeepSpeed 0.19's default would divide a second time), and it tells us which micro-step
ends the accumulation (`no_sync(boundary)`): we pass that on with
`engine.set_gradient_accumulation_boundary`, the documented way to call `engine.step()`
once per optimizer step (`engine.no_sync()` itself refuses ZeRO-2/3).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ffdist.dist import DistInfo, ensure_process_group
from ffdist.errors import CheckpointError
from ffdist.optim import build_optimizer
from ffdist.recipe import Recipe
from ffdist.strategies import ds_config

if TYPE_CHECKING:
    from ffdist.resolved import Resolved

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeepSpeed:
    sharded = True
    # The engine decides fp16 overflow on the host (DeepSpeed's loss scaler reads it back
    # every step), so the Trainer also reads its NaN/stop flag before step(): a sync point.
    skips_on_device = False

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo):
        # (precision=fp16 without a GPU was refused by ffdist.assemble.resolve)
        self.info, self.zero_stage = info, recipe.strategy.zero_stage
        # Checked before importing deepspeed: a config error stays one clean line.
        self.config = ds_config.build(recipe, resolved.plan, resolved.precision, info.device)
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ensure_process_group(info.device)  # alone (python -m): DeepSpeed still wants a group

        ds_logger.setLevel(logging.WARNING)  # its INFO lines repeat our own, once per rank
        # torch warns that DeepSpeed's collectives are deprecated names, once per call site.
        warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed",
                                category=FutureWarning)
        # Weights stay contiguous: ZeRO flattens them into buffers anyway, and DeepSpeed's
        # initial broadcast views each one as bytes (fails on channels_last bf16 weights).
        # The inputs are still channels_last (ffdist.data's prefetcher), convs accept both.
        self.raw = model.to(device=info.device)
        client = build_optimizer(self.raw, recipe.optim, info.device, skips_on_device=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.raw, optimizer=client, config=self.config, dist_init_required=False)
        self.low = LOW.get(resolved.precision)
        if self.low is not None:
            # DeepSpeed converts the parameters only; BatchNorm wants its running stats in
            # the weights' dtype too (on the CPU a mix is an error).
            for buf in self.engine.module.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(self.low)
        self.model = self.engine

    # ---------------------------------------------------------------- numerics
    def autocast(self) -> AbstractContextManager:
        """No autocast: DeepSpeed's bf16/fp16 mode converts the module's weights (and we
        its buffers) to that dtype, keeping the fp32 master copy in the optimizer. (CPU
        autocast would also run batch_norm in fp32 and feed fp32 activations to bf16
        BatchNorm weights.) The logits come out in bf16/fp16; the Trainer's loss is fp32."""
        return contextlib.nullcontext()

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.low is None else x.to(self.low)

    # ---------------------------------------------------------------- training
    def no_sync(self, boundary: bool) -> AbstractContextManager:
        # ZeRO-1 (and stage 0) reduce only at the boundary; ZeRO-2/3 reduce-scatter every
        # micro-step's gradients into their partitions and accumulate there.
        self.engine.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # loss is already / accumulation

    def step(self, lr: float, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(`skip` is unused: the Trainer calls skip_step() instead, having read the flag.)"""
        for group in self.engine.optimizer.param_groups:  # ZeRO exposes the client's groups
            group["lr"] = lr
        self.engine.step()  # clips (gradient_clipping), steps (unless fp16 overflowed), zeroes
        # a fill, not a host->device copy: the host already knows (DeepSpeed synced)
        return torch.full((), float(self.engine.was_step_applied()), device=self.info.device)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_batches(self, batches: Iterable) -> Iterator:
        """Under ZeRO-3 every forward all-gathers parameters, so all ranks must run the same
        number of forwards; eval shards differ by up to one batch, and the short ranks run
        empty batches (which count nothing)."""
        if self.zero_stage < 3 or not torch.distributed.is_initialized():
            yield from batches
            return
        count = torch.tensor([len(batches)], device=self.info.device)  # type: ignore[arg-type]
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        done, last = 0, None
        for last in batches:
            done += 1
            yield last
        for _ in range(int(count.item()) - done):
            x, y = last
            yield x[:0], y[:0]

    # ---------------------------------------------------------------- state
    def unwrap(self) -> nn.Module:
        """The plain module; under ZeRO-3 its parameters are partitioned placeholders, use
        model_state_dict() for weights."""
        return self.engine.module

    def state_dict(self) -> dict[str, Any]:
        return {}  # model and optimizer state live in the shards (save_shards)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("DeepSpeed's state is in its shards (load_shards)")

    def save_shards(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its own partition: <folder>/<tag>/*_optim_states.pt (+ model
        states from rank 0). `latest` is ffdist's business, not DeepSpeed's."""
        self.engine.save_checkpoint(str(folder), tag=tag, client_state=client_state,
                                    save_latest=False)

    def load_shards(self, path: Path) -> None:
        """(World size and ZeRO stage were checked against the checkpoint by
        ffdist.checkpoint.check_compatible before the run directory was touched.)"""
        path = Path(path)
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the shards in {path}; the "
                                  "checkpoint is incomplete, remove that folder to resume "
                                  "from the one before.")

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated fp32 weights (plain state dict, no prefixes) on rank 0, None on the
        others. A collective: every rank must call it. The fp32 master copy is assembled
        from the partitions (ZeRO-1/2/3; in bf16 the module holds only bf16 weights);
        frozen parameters, which have no master copy, are gathered from the module."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = dict(module.named_parameters(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for name, value in module.state_dict().items():
            p = params.get(name)
            full = safe_get_full_fp32_param(p) if p is not None and p.requires_grad else None
            if full is None and p is not None:
                full = self._gather(p)
            elif full is None:
                full = value  # a buffer: never partitioned
            full = full.detach().to("cpu", copy=True)
            out[name] = full.float() if full.is_floating_point() else full
        return out if self.info.is_primary else None

    def _gather(self, p: nn.Parameter) -> torch.Tensor:
        if self.zero_stage < 3:
            return p.data
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.clone()
