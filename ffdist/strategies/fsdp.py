"""FSDP2: torch.distributed.fsdp.fully_shard per block, then at the root.

Sharding. Every block of the model (ffdist.models.blocks, handed over as `blocks` by
ffdist.assemble: ResNet stages, ViT encoder layers, ...) is one FSDP unit, the root the
last one (whatever no block holds: stem, head, final norm). Each rank keeps 1/N of every
parameter, of its gradient and of its optimizer states (DTensors sharded on dim 0); a
unit's parameters are all-gathered for its forward, freed after it
(strategy.reshard_after_forward, the root's are kept), gathered again for its backward,
and its gradients reduce-scattered (averaged) into the shards. Gradient accumulation
reduce-scatters every micro-step (as ZeRO-2/3 do): the full gradients are never held.

Numerics (MixedPrecisionPolicy from the resolved precision): the sharded parameters, the
gradients and the optimizer states are fp32 in every precision; with bf16/fp16 the
all-gather casts the parameters to that dtype and the forward/backward compute in it (no
autocast), and gradients are reduce-scattered in fp32 (strategy.fsdp_reduce_dtype=fp32,
the safe default; `compute` halves the traffic). BatchNorm layers keep fp32 parameters
(their own units, one per block, with an fp32 policy): their running statistics are fp32
and torch's batch_norm takes low-precision inputs only with fp32 weights.

The optimizer step. Fused AdamW runs on DTensors (torch has its sharding rule), so a
step with a non-finite loss is skipped on the device (found_inf, ffdist.optim.step_unless).
torch has no DTensor rule for the fused SGD kernel: SGD is foreach here, and its skip is
decided on the host (a sync point per step). Gradient clipping is clip_grad_norm_ on the
DTensor gradients (the norm is all-reduced over the shards). fp16 scales the loss with
torch.amp.GradScaler: its unscale_ runs on the DTensor gradients, and torch's DTensor rule
for the inf check reports an overflow in any rank's shard on every rank, so all ranks
skip together (on the device).
fp16 runs on the CPU too (emulated and slow: ffdist.precision warns), which is where the
tests exercise its loss scaling.

Checkpoints: per-rank shards of format "torch-dcp", a torch.distributed.checkpoint (DCP)
folder of get_state_dict(model, optimizer): every rank writes its `__<rank>_0.distcp`,
rank 0 the `.metadata`. DCP reshards on load, so a checkpoint resumes at any world size
(`reshards`). model.pt and best.pt hold the consolidated fp32 weights
(get_model_state_dict with full_state_dict, cpu_offload), plain state dicts that
eval/predict/export read as from any run. Its EMA averages the local shards
(ffdist.strategies.fsdp_ema).

Memory model (`ffdist plan`'s FSDP row, per device, N ranks): params 4P/N + w x (the root's
parameters + the largest block's), grads 4T/N + 4 x the largest block's, optimizer
4*S*T/N (w: bytes of the compute dtype; the gathered root and one gathered block with its
unsharded gradient are the transient part). With strategy.fsdp_offload the shards live in
CPU memory and the GPU holds only the gathered parts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ffdist import memory, optim
from ffdist.ckpt_format import SHARDS
from ffdist.dist import DistInfo, ensure_process_group
from ffdist.errors import CheckpointError, RecipeError, shorten
from ffdist.optim import build_optimizer, set_lr
from ffdist.recipe import Recipe
from ffdist.state_dicts import clean_state_dict
from ffdist.strategies.base import Strategy, padded_eval_batches

if TYPE_CHECKING:
    from ffdist.ema import EMA
    from ffdist.resolved import Resolved

DCP_FORMAT = "torch-dcp"
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP(Strategy):
    title = "FSDP"
    layout_kind = SHARDS
    layout_format = DCP_FORMAT
    reads = (DCP_FORMAT,)
    reshards = True  # DCP reshards on load: any world size
    uses_blocks = True
    memory_rows = {"FSDP": "strategy.name=fsdp"}
    skips_on_device = True  # fused AdamW; foreach SGD reads the flag (optim.step_unless)

    # ---------------------------------------------------------------- declarations
    @classmethod
    def row_bytes(cls, row: str, num_params: int, trainable: int, recipe: Recipe,
                  resolved: Resolved, block_params: tuple[int, ...] = ()) -> dict[str, int]:
        """The module docstring's accounting: sharded fp32 states plus what is gathered."""
        n, w = max(1, resolved.plan.world_size), memory.weight_bytes(resolved.precision)
        s = memory.optimizer_states_per_param(recipe.optim.name, recipe.optim.momentum > 0)
        largest = max(block_params, default=0)
        root = num_params - sum(block_params)  # outside every block: gathered all step long
        gathered, unsharded_grad = w * (root + largest), 4 * largest
        shards = {"params": -(-4 * num_params // n), "grads": -(-4 * trainable // n),
                  "optimizer": -(-4 * s * trainable // n)}
        if recipe.strategy.fsdp_offload:  # the shards are in CPU memory
            shards = {k: 0 for k in shards}
        return memory.with_total({"params": shards["params"] + gathered,
                                  "grads": shards["grads"] + unsharded_grad,
                                  "optimizer": shards["optimizer"]})

    @classmethod
    def ema_bytes(cls, num_params: int, trainable: int, world_size: int) -> int:
        """An fp32 shadow of each rank's shards."""
        return -(-4 * num_params // world_size)

    # ---------------------------------------------------------------- building
    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo,
                 blocks: list[str] | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        cfg, device = recipe.strategy, info.device
        if cfg.fsdp_offload and device.type != "cuda":
            raise RecipeError("strategy.fsdp_offload=true moves FSDP's shards from GPU to CPU "
                              "memory, but this run is on the CPU already; remove it.")
        if cfg.fsdp_offload and resolved.precision == "fp16":
            raise RecipeError("strategy.fsdp_offload=true with precision=fp16 is not supported "
                              "(the loss scaler's flag lives on the GPU, the optimizer on the "
                              "CPU); use precision=bf16.")
        self.info, self.device = info, device
        self.grad_clip = recipe.optim.grad_clip
        self.low = LOW.get(resolved.precision)
        ensure_process_group(device)  # alone (python -m): a one-rank group to shard over
        self.mesh = init_device_mesh(device.type, (info.world_size,))
        self.raw = model.to(device)  # contiguous weights: FSDP shards them on dim 0
        if recipe.model.compile:
            _compile_blocks(self.raw, blocks or [], recipe.model.compile_backend)
        self._shard(self.raw, blocks or [], recipe)
        self.model = self.raw
        self.optimizer = build_optimizer(self.raw, recipe.optim, device, sharded=True)
        self.offload = cfg.fsdp_offload
        # fp16: loss scaling (the overflow check covers every rank's shards: see step)
        self.scaler = torch.amp.GradScaler(device.type) if resolved.precision == "fp16" else None

    def _shard(self, model: nn.Module, blocks: list[str], recipe: Recipe) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        cfg = recipe.strategy
        reduce = torch.float32 if cfg.fsdp_reduce_dtype == "fp32" else self.low
        policy = MixedPrecisionPolicy(param_dtype=self.low, reduce_dtype=reduce) \
            if self.low is not None else MixedPrecisionPolicy()
        # BatchNorm: fp32 weights (and inputs left as they come) in their own units
        keep = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
        common: dict[str, Any] = {"mesh": self.mesh}
        if cfg.fsdp_offload:
            common["offload_policy"] = CPUOffloadPolicy()
        for name in blocks:
            block = model.get_submodule(name)
            if self.low is not None:
                _shard_norms(block, keep, common)
            fully_shard(block, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward,
                        **common)
        if self.low is not None:
            _shard_norms(model, keep, common)
        # the root's parameters (stem, head) are needed first in backward: kept gathered
        fully_shard(model, mp_policy=policy, reshard_after_forward=False, **common)

    # ---------------------------------------------------------------- numerics
    def autocast(self) -> AbstractContextManager:
        """No autocast: the MixedPrecisionPolicy casts the gathered parameters and the root's
        inputs; the logits come out in the compute dtype (the Trainer's loss is fp32)."""
        return contextlib.nullcontext()

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the root's policy casts them (cast_forward_inputs)

    # ---------------------------------------------------------------- training
    def no_sync(self, boundary: bool) -> AbstractContextManager:
        return contextlib.nullcontext()  # reduce-scatter every micro-step (see the docstring)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float, skip: torch.Tensor) -> torch.Tensor:
        """Unscale (fp16), clip the sharded gradients, step unless `skip` or an overflow on
        any rank; zero the gradients. `applied` stays on the device."""
        set_lr(self.optimizer, lr)
        found = skip
        if self.scaler is not None:
            # unscale_'s inf check on DTensor gradients reports an overflow in ANY rank's
            # shard on every rank (tests/distributed/test_fsdp_step.py): all skip together
            self.scaler.unscale_(self.optimizer)
            found = torch.maximum(found, _overflow(self.scaler, self.optimizer).to(found.device))
        if self.grad_clip is not None:  # (non-finite grads make a NaN norm: skipped anyway)
            params = [p for p in self.raw.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        # offloaded shards step on the CPU: the flag goes there (a copy the step waits for)
        optim.step_unless(self.optimizer, found.to("cpu") if self.offload else found)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return 1.0 - found

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_batches(self, batches: Iterable) -> Iterator:
        """Every forward all-gathers parameters, so every rank runs the same number of them:
        the short eval shards are padded with empty batches (which count nothing)."""
        return padded_eval_batches(batches, self.device)

    # ---------------------------------------------------------------- state
    def unwrap(self) -> nn.Module:
        """The module (fully_shard changes it in place); its parameters are DTensor shards."""
        return self.raw

    def state_dict(self) -> dict[str, Any]:
        return {}  # model and optimizer live in the DCP shards (save_shards)

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.raw, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_shards(self, path: Path) -> None:
        """Every rank writes its shards of model and optimizer into `path` (DCP; rank 0 also
        the metadata), fsynced; the manager writes the marker after all have returned."""
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(os.fspath(path), sync_files=True)
        dcp.save(self._dcp_state(), storage_writer=writer)

    def load_shards(self, path: Path) -> None:
        """DCP reads each rank's part of every tensor, whatever world size wrote them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()  # templates: this world size's shards (optimizer initialised)
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(os.fspath(path)))
        except Exception as e:  # a marked folder whose shards were damaged afterwards
            why = shorten((str(e).strip().splitlines() or [type(e).__name__])[-1])
            raise CheckpointError(f"the DCP shards in {path} cannot be read ({why}); remove "
                                  "that folder to resume from the checkpoint before it.") from None
        set_state_dict(self.raw, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        optim.init_momentum_buffers(self.optimizer)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated fp32 weights on rank 0 (None elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        return clean_state_dict(full) if self.info.is_primary else None

    def make_ema(self, decay: float, every: int, warmup_steps: int, buffers: str) -> EMA:
        """The EMA of the local shards (ffdist.strategies.fsdp_ema)."""
        from ffdist.strategies.fsdp_ema import ShardEMA

        return ShardEMA(self.raw, decay, every, warmup_steps, buffers)


def _shard_norms(module: nn.Module, keep: Any, common: dict[str, Any]) -> None:
    """The BatchNorm layers directly under `module` (not inside a unit already) as one fp32
    unit: fp32 running statistics and weights, low-precision inputs."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    found: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, FSDPModule):
                continue
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                    any(True for _ in child.parameters()):
                found.append(child)
            else:
                walk(child)

    walk(module)
    if found:
        fully_shard(found, mp_policy=keep, reshard_after_forward=False, **common)


def _compile_blocks(model: nn.Module, blocks: list[str], backend: str) -> None:
    """model.compile under FSDP: each block compiled in place before it is sharded (as
    torchtitan does; FSDP's hooks stay outside the compiled graphs). Without blocks, the
    root is compiled."""
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):
        raise RecipeError(f"model.compile_backend={backend!r} is not a torch.compile backend; "
                          "use inductor, aot_eager or eager (all: torch._dynamo.list_backends()).")
    for name in blocks or [""]:
        model.get_submodule(name).compile(backend=backend)


def _overflow(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    from ffdist.strategies.single import _overflow as overflow

    return overflow(scaler, opt)
