"""The values every layer reads and none recomputes: the batch plan and `Resolved`.

`ffdist.assemble.resolve()` derives them once per run from (recipe, world size, device,
launcher precision); the strategies, the data streams, the Trainer, the checkpoint manager
and every command receive them. This module is at the bottom of the import graph (it
imports only ffdist.errors), so that everyone can import it without forming a circle.

Batch arithmetic (recipes give the GLOBAL batch):
    per_rank = batch_size / world_size          (must divide)
    micro    = min(micro_batch_size, per_rank)  (what one device holds at once)
    accum    = per_rank / micro                 (micro-steps per optimizer step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ffdist.errors import RecipeError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    per_rank: int
    micro: int
    accum: int


def scaled_lr(lr: float, reference_batch: int | None, global_batch: int,
              optimizer: str) -> tuple[float, str]:
    """(the run's peak lr, how it was derived). optim.lr is given for reference_batch and
    scaled to the global batch: linearly for SGD (Goyal et al. 2017, "Accurate, Large
    Minibatch SGD: Training ImageNet in 1 Hour": lr x k for a k-times larger batch), by
    the square root of the ratio for Adam-family optimizers (their update is normalized
    by the gradient's second moment, whose noise shrinks as 1/sqrt(batch); Malladi et al.
    2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms")."""
    if reference_batch is None or reference_batch == global_batch:
        return lr, ""
    ratio = global_batch / reference_batch
    if optimizer == "sgd":
        return lr * ratio, f"optim.lr {lr:g} x {global_batch}/{reference_batch} (linear)"
    return lr * ratio ** 0.5, (f"optim.lr {lr:g} x sqrt({global_batch}/{reference_batch}) "
                               f"({optimizer}: square root)")


def plan_batches(global_batch: int, micro_batch: int | None, world_size: int) -> BatchPlan:
    """The batch arithmetic above; a run calls it once, through ffdist.assemble.resolve."""
    if global_batch % world_size:
        up = -(-global_batch // world_size) * world_size
        raise RecipeError(f"data.batch_size={global_batch} is the global batch and does not "
                          f"divide over {world_size} processes; set data.batch_size={up} (or "
                          f"another multiple of {world_size}).")
    per_rank = global_batch // world_size
    micro = min(micro_batch or per_rank, per_rank)
    if per_rank % micro:
        fits = max(d for d in range(1, micro + 1) if per_rank % d == 0)
        raise RecipeError(f"data.micro_batch_size={micro_batch} does not divide the per-rank "
                          f"batch {per_rank} (= {global_batch} / {world_size} processes); "
                          f"set data.micro_batch_size={fits} (or another divisor of it).")
    return BatchPlan(global_batch, world_size, per_rank, micro, per_rank // micro)


@dataclass(frozen=True)
class Resolved:
    """Everything derived from (recipe, world size, device, launcher's precision)."""

    plan: BatchPlan
    """Global batch -> per rank -> micro-batch x accumulation (plan_batches)."""
    precision: str
    """fp32 | bf16 | fp16: `auto` and `accelerate launch --mixed_precision` resolved."""
    strategy: str
    """The registered strategy's name: `auto` resolved for the world size."""
    image_size: int
    """Side of the training images (the data source's native size, or data.image_size)."""
    device: torch.device
    """Where this process computes (decided by ffdist.dist; carried here for reports)."""
    eval_image_size: int
    """Side of the eval/predict/export images (data.eval_image_size, else image_size)."""
    lr: float
    """The peak learning rate: optim.lr, scaled from optim.lr_reference_batch to the global
    batch when that is set (`lr_why` says how)."""
    threads: int
    """Intra-op CPU threads of this process (launch.threads; ffdist.threads)."""
    workers: int
    """DataLoader workers per rank (data.num_workers, capped at the cores; ffdist.threads)."""
    lr_why: str = ""
    """How lr was derived, for the start line: '' (as given) or 'lr 0.1 x 64/256 (linear)'."""
    threads_why: str = ""
    """The start line's words on threads: '2 threads (auto: 2 cores, 1 rank)'."""
    workers_note: str | None = None
    """One sentence when data.num_workers was capped at the cores (printed once)."""
    decode: str = "cpu"
    """Who decodes and crops encoded images: cpu | gpu | boxes (data.decode, `auto`
    resolved: ffdist.data.decoding)."""
    decode_why: str = ""
    """What decided it (data.decode=auto), or the GPU decoder's name."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for `ffdist plan --json` and bench.json."""
        p = self.plan
        return {"global_batch": p.global_batch, "world_size": p.world_size,
                "per_rank": p.per_rank, "micro": p.micro, "accum": p.accum,
                "precision": self.precision, "strategy": self.strategy,
                "image_size": self.image_size, "eval_image_size": self.eval_image_size,
                "device": self.device.type, "lr": self.lr, "threads": self.threads,
                "workers": self.workers, "decode": self.decode}
