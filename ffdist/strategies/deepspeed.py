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

Checkpoints: per-rank shards of format "deepspeed-zero" (DeepSpeed's own files: every rank
its optimizer partition, rank 0 the module states), with the ZeRO stage as the layout's
parameter; they resume at the same stage. ZeRO-1/2/3 shards also resume at another world
size: ffdist converts them once into a world-size-free `resharded/` folder inside the
checkpoint and every rank cuts its partitions out of it (ffdist.strategies.zero_reshard);
ZeRO-0 resumes only at the world size that wrote it. Its EMA averages the fp32 master
partitions (ffdist.strategies.deepspeed_ema).

Memory model (`ffdist plan`'s ZeRO rows): the module holds low-precision weights w = 2
bytes (bf16/fp16) or 4 (fp32); the optimizer holds a fp32 master copy (4 bytes, made even
in fp32) plus its states: optimizer 4 + 4*S per trainable parameter (S: ffdist.memory).
Stage 0 replicates everything, stage 1 partitions the optimizer, 2 also the gradients (w
bytes), 3 also the parameters. With bf16 + AdamW that is exactly the ZeRO paper's 2 + 2 +
12 bytes per parameter.
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

from ffdist import memory
from ffdist.ckpt_format import SHARDS, Layout
from ffdist.dist import DistInfo, ensure_process_group
from ffdist.errors import CheckpointError, LaunchError, shorten
from ffdist.optim import build_optimizer
from ffdist.recipe import Recipe
from ffdist.strategies import ds_config
from ffdist.strategies.base import Strategy, padded_eval_batches

if TYPE_CHECKING:
    from ffdist.ema import EMA
    from ffdist.resolved import Resolved

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = (1, 2, 3)  # those with a row in `ffdist plan` (stage 0 is judged as DDP's row)


class DeepSpeed(Strategy):
    title = "DeepSpeed"
    layout_kind = SHARDS
    layout_format = "deepspeed-zero"
    reads = ("deepspeed-zero", "v2:deepspeed")  # and what format 2 called it
    reshards = True  # ZeRO-1/2/3, through ffdist.strategies.zero_reshard (check_resume)
    memory_rows = {f"ZeRO-{s}": f"strategy.name=deepspeed strategy.zero_stage={s}"
                   for s in STAGES}
    # The engine decides fp16 overflow on the host (DeepSpeed's loss scaler reads it back
    # every step), so the Trainer also reads its NaN/stop flag before step(): a sync point.
    skips_on_device = False

    # ---------------------------------------------------------------- declarations
    @classmethod
    def layout_params(cls, recipe: Recipe) -> dict[str, Any]:
        return {"zero_stage": recipe.strategy.zero_stage}

    @classmethod
    def describe(cls, layout: Layout) -> str:
        return (f"DeepSpeed ZeRO-{layout.params.get('zero_stage')} shards of "
                f"{layout.world_size} ranks")

    @classmethod
    def check_resume(cls, saved: Layout, source: str | Path, recipe: Recipe,
                     resolved: Resolved) -> None:
        world, stage = resolved.plan.world_size, recipe.strategy.zero_stage
        saved_stage = saved.params.get("zero_stage")
        if saved_stage != stage:
            raise CheckpointError(
                f"{source} holds ZeRO-{saved_stage} shards of {saved.world_size} ranks, this "
                f"run is ZeRO-{stage} on {world}; resume with strategy.zero_stage="
                f"{saved_stage}, or start from the weights with "
                "model.pretrained=<run>/model.pt and a new output_dir.")
        if saved.world_size != world and stage not in STAGES:  # no partitions to recut
            raise CheckpointError(
                f"{source} holds ZeRO-{saved_stage} shards of {saved.world_size} ranks, this "
                f"run would continue them on {world}; ZeRO-0 resumes only at the world size "
                f"that wrote it: resume with {saved.world_size} processes, or start from the "
                "weights with model.pretrained=<run>/model.pt and a new output_dir.")

    @classmethod
    def check_precision(cls, precision: str, device: torch.device) -> None:
        if precision == "fp16" and device.type != "cuda":
            raise LaunchError("precision=fp16 with DeepSpeed needs a GPU (DeepSpeed has no "
                              "fp16 on the CPU); use precision=bf16 or fp32.")

    @classmethod
    def model_state_bytes(cls, num_params: int, trainable: int, optimizer: str,
                          precision: str, world_size: int = 1, momentum: bool = True,
                          zero_stage: int = 0) -> dict[str, int]:
        """Bytes per rank of params / grads / optimizer states and their total, under
        ZeRO-`zero_stage` over `world_size` ranks (the module docstring's accounting)."""
        n, w = max(1, world_size), memory.weight_bytes(precision)
        opt = (4 + 4 * memory.optimizer_states_per_param(optimizer, momentum)) * trainable
        return memory.with_total({
            "params": w * num_params // (n if zero_stage >= 3 else 1),
            "grads": w * trainable // (n if zero_stage >= 2 else 1),
            "optimizer": opt // (n if zero_stage >= 1 else 1),
        })

    @classmethod
    def row_bytes(cls, row: str, num_params: int, trainable: int, recipe: Recipe,
                  resolved: Resolved) -> dict[str, int]:
        return cls.model_state_bytes(num_params, trainable, recipe.optim.name,
                                     resolved.precision, resolved.plan.world_size,
                                     recipe.optim.momentum > 0, int(row.split("-")[1]))

    @classmethod
    def ema_bytes(cls, num_params: int, trainable: int, world_size: int) -> int:
        """An fp32 shadow of each rank's part of the fp32 master (any stage): 4 bytes x
        trainable / N (frozen weights are their own EMA; buffers are small)."""
        return -(-4 * trainable // world_size)

    @classmethod
    def row_of(cls, recipe: Recipe) -> str:
        stage = recipe.strategy.zero_stage
        return f"ZeRO-{stage}" if stage in STAGES else "DDP"

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Resolved, info: DistInfo):
        # (precision=fp16 without a GPU was refused by check_precision, before)
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
        if self.zero_stage < 3:
            return iter(batches)
        return padded_eval_batches(batches, self.info.device)

    # ---------------------------------------------------------------- state
    def unwrap(self) -> nn.Module:
        """The plain module; under ZeRO-3 its parameters are partitioned placeholders, use
        model_state_dict() for weights."""
        return self.engine.module

    def state_dict(self) -> dict[str, Any]:
        return {}  # model and optimizer state live in the shards (save_shards)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("DeepSpeed's state is in its shards (load_shards)")

    def save_shards(self, path: Path) -> None:
        """Every rank writes its own partition: <path>/*_optim_states.pt (+ model states
        from rank 0). `latest` and the progress (ffdist_state.pt) are ffdist's business."""
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)

    def load_shards(self, path: Path) -> None:
        """(World size and ZeRO stage were checked against the checkpoint by check_resume
        before the run directory was touched.) Shards of another world size are converted
        once (rank 0) and every rank takes its partitions from the conversion."""
        from ffdist.strategies import zero_reshard

        path = Path(path)
        # (ZeRO-0 writes no partitions to count; check_resume kept it at its world size)
        if self.zero_stage in STAGES and zero_reshard.saved_world_size(path) != \
                self.info.world_size:
            self._load_resharded(path)
            return
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the shards in {path}; the "
                                  "checkpoint is incomplete, remove that folder to resume "
                                  "from the one before.")

    def _load_resharded(self, path: Path) -> None:
        from ffdist.dist import all_reduce_sum
        from ffdist.strategies import zero_reshard

        failed = None
        if self.info.is_primary:
            try:
                zero_reshard.convert(path)
            except Exception as e:  # the others must not wait for a file that never comes
                failed = e
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.info.device)
        if all_reduce_sum(flag).item():
            if isinstance(failed, CheckpointError):
                raise failed
            raise CheckpointError(
                f"converting the DeepSpeed shards in {path} to this world size failed"
                + (f" ({type(failed).__name__}: {shorten(str(failed))})" if failed
                   else " on rank 0")
                + "; resume with the world size that wrote them, or remove that folder to "
                "resume from the one before.") from failed
        zero_reshard.load(self.engine, path / zero_reshard.FOLDER / zero_reshard.STATE,
                          self.info.rank, self.info.world_size)

    def make_ema(self, decay: float, every: int, warmup_steps: int, buffers: str) -> EMA:
        """The EMA of the fp32 master partitions (ffdist.strategies.deepspeed_ema)."""
        from ffdist.strategies.deepspeed_ema import ZeroEMA

        return ZeroEMA(self.engine, decay, every, warmup_steps, buffers)

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
