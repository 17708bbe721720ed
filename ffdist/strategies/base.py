"""What every strategy is: its declarations (class-level) and its protocol (instances).

A strategy owns everything that differs between single device, DDP and DeepSpeed: the
numerics of a forward pass (autocast / input casting), backward, the optimizer step and
its skip, where its state lives (in the checkpoint file, or in per-rank shards), its EMA,
and which eval batches a rank runs. The Trainer only drives it.

The DECLARATIONS are class attributes and class methods, so that the rest of ffdist can
ask a strategy what it is before it is built (ffdist.strategies.get(name) returns the
class): which checkpoint layout it writes and reads, and at which world sizes
(`check_resume`, asked before the run directory is touched), which precisions it refuses,
its rows in `ffdist plan`, whether `bench --reference` has a loop to compare it with. No
code outside ffdist/strategies/ tests a strategy's name: it asks these.

The defaults here are those of a strategy whose whole state fits in one file that the
primary rank writes (single device, DDP); a sharded one overrides the layout and the
shard half of the state methods (save_shards / load_shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ffdist.ckpt_format import ONE_FILE, Layout
from ffdist.errors import CheckpointError

if TYPE_CHECKING:
    from ffdist.ema import EMA
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

TORCH_FILE = "torch-file"
"""The format id of the one-file layout: model, optimizer and scaler state dicts in the
checkpoint file itself (Checkpoint.model / .optimizer / .scaler)."""


class Strategy:
    # ================================================================ declarations
    title: ClassVar[str] = "a strategy"
    """What people call it, in messages ("DeepSpeed")."""
    one_process: ClassVar[bool] = False
    """True: refused when several processes were started (ffdist.strategies.resolve_name)."""
    alone: ClassVar[str | None] = None
    """The registered strategy one process of this one trains as, when it has nothing to
    share with a single process (DDP: single); resolve_name then names that one, so the
    start line, bench.json and plan say what runs. None: itself."""
    layout_kind: ClassVar[str] = ONE_FILE
    """ONE_FILE: the primary rank writes state_dict() into the checkpoint file; SHARDS:
    every rank writes its own shards through save_shards() into the checkpoint's folder
    (ffdist.checkpoint.CheckpointManager decides when and where)."""
    layout_format: ClassVar[str] = TORCH_FILE
    """The format id of what it writes; a new kind of content needs a new id."""
    reads: ClassVar[tuple[str, ...]] = (TORCH_FILE,)
    """The format ids it resumes from; it must include layout_format (checked on lookup)."""
    reshards: ClassVar[bool] = True
    """True: a checkpoint it reads may come from another world size (the one-file layout
    holds the whole state; each rank then starts a fresh, deterministic RNG stream). False:
    `check_resume` refuses one of another world size."""
    has_reference_loop: ClassVar[bool] = False
    """True: `ffdist bench --reference` has a hand-written loop that trains it
    (ffdist.reference: single device / DDP)."""
    memory_rows: ClassVar[dict[str, str]] = {}
    """Its rows in `ffdist plan`: row name -> the overrides that train as that row."""
    uses_blocks: ClassVar[bool] = False
    """True: built with `blocks=`, the module names of the model's blocks
    (ffdist.models.blocks, decided by ffdist.assemble): FSDP shards one unit per block."""

    @classmethod
    def layout_params(cls, recipe: Recipe) -> dict[str, Any]:
        """The layout's own parameters that a resumed run must share (e.g. the ZeRO stage)."""
        return {}

    @classmethod
    def layout(cls, recipe: Recipe, resolved: Resolved) -> Layout:
        """The layout this run's checkpoints have."""
        return Layout(cls.layout_kind, cls.layout_format, resolved.plan.world_size,
                      cls.layout_params(recipe))

    @classmethod
    def describe(cls, layout: Layout) -> str:
        """A checkpoint of `layout` (a format it reads), for messages."""
        ranks = f"{layout.world_size} rank{'s' if layout.world_size != 1 else ''}"
        if layout.kind == ONE_FILE:
            return f"one file with the whole state ({cls.title}, {ranks})"
        return f"{cls.title} shards of {ranks}"

    @classmethod
    def check_resume(cls, saved: Layout, source: str | Path, recipe: Recipe,
                     resolved: Resolved) -> None:
        """Refuse (CheckpointError, one sentence) a checkpoint of `saved` layout, one of the
        formats this class reads, that this run cannot continue: another world size when it
        does not reshard, other layout parameters. Called before the run directory is
        touched (ffdist.checkpoint.check_compatible, through ffdist.strategies)."""
        mine = cls.layout(recipe, resolved)
        other_world = saved.world_size != mine.world_size and not cls.reshards
        if other_world or saved.params != mine.params:
            same = " ".join([f"{saved.world_size} process(es)",
                             *(f"{k}={v}" for k, v in saved.params.items())])
            raise CheckpointError(
                f"{source} holds {cls.describe(saved)}, this run would write "
                f"{cls.describe(mine)}; {cls.title} resumes its checkpoints only as they were "
                f"written: resume with {same}, or start from the weights with "
                "model.pretrained=<run>/model.pt and a new output_dir.")

    @classmethod
    def check_precision(cls, precision: str, device: torch.device) -> None:
        """Refuse (LaunchError) a resolved precision it cannot train in on `device`."""

    @classmethod
    def row_bytes(cls, row: str, num_params: int, trainable: int, recipe: Recipe,
                  resolved: Resolved, block_params: tuple[int, ...] = ()) -> dict[str, int]:
        """Bytes per device of params / grads / optimizer and their total, for its row `row`
        (one of memory_rows). A strategy that declares `uses_blocks` is also given
        `block_params=`: the parameter count of each of the model's blocks (FSDP gathers one
        at a time)."""
        raise NotImplementedError(f"{cls.__name__} declares no memory rows")

    @classmethod
    def ema_bytes(cls, num_params: int, trainable: int, world_size: int) -> int:
        """Bytes per device of its EMA of the weights (optim.ema_decay > 0): by default an
        fp32 shadow of every parameter."""
        return 4 * num_params

    @classmethod
    def row_of(cls, recipe: Recipe) -> str:
        """The row of `ffdist plan` that judges this recipe."""
        return next(iter(cls.memory_rows))

    # ================================================================ protocol (instances)
    model: nn.Module
    """What forward is called on (wrapped: DDP, compiled, DeepSpeed engine)."""
    optimizer: Any
    skips_on_device: bool
    """True: step() applies or skips the update on the device, from a device flag, with no
    host sync (single, DDP: ffdist.optim.step_unless). False (DeepSpeed): the Trainer reads
    the flag on the host first and calls step() or skip_step()."""

    # ---------------------------------------------------------------- numerics
    def autocast(self) -> AbstractContextManager:
        """The context every forward runs in (train and eval): torch.autocast for
        single/DDP (fp32 weights), nothing for DeepSpeed (its weights are low-precision)."""
        raise NotImplementedError

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The batch in the dtype the model's first layer takes."""
        raise NotImplementedError

    # ---------------------------------------------------------------- one optimizer step
    def no_sync(self, boundary: bool) -> AbstractContextManager:
        """Context for one micro-step; gradients are synchronized only when `boundary`."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, lr: float, skip: torch.Tensor) -> torch.Tensor:
        """Optimizer step at `lr` unless `skip` (0-dim float32 on the device, 1.0: the loss
        is not finite on some rank), then zero the gradients. Returns `applied`, 0-dim
        float32 on the device: 1.0 when the update was applied, 0.0 when it was skipped
        (`skip`, or an fp16 overflow). Reads nothing back when `skips_on_device`."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drop this step's gradients without updating anything (a non-finite loss; only
        called when not `skips_on_device`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    def unwrap(self) -> nn.Module:
        """The plain model (no DDP/compile/engine wrapper)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint file holds of this strategy: {"model", "optimizer",
        "scaler"} (plain types) for the one-file layout, {} with shards (they hold it)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict (one-file layouts)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its state in shards "
                                  "(load_shards)")

    def save_shards(self, path: Path) -> None:
        """SHARDS layout: called on EVERY rank; each writes its own files into the folder
        `path` (it exists). The manager then marks the folder complete."""
        raise NotImplementedError(f"{type(self).__name__} writes one file; its state goes "
                                  "into the checkpoint file (state_dict)")

    def load_shards(self, path: Path) -> None:
        """SHARDS layout: every rank reads its own from `path`, a folder save_shards wrote
        (check_resume accepted it before)."""
        raise NotImplementedError(f"{type(self).__name__} writes one file; its state comes "
                                  "from the checkpoint file (load_state_dict)")

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 model weights, plain and unprefixed, on rank 0 (None elsewhere); for
        model.pt and best.pt. A collective under ZeRO: every rank calls it."""
        raise NotImplementedError

    def make_ema(self, decay: float, every: int, warmup_steps: int, buffers: str) -> EMA:
        """The EMA of the weights this strategy holds (ffdist.ema.for_run): by default
        ffdist.ema.EMA over the plain module."""
        from ffdist.ema import EMA

        return EMA(self.unwrap(), decay, every, warmup_steps, buffers)

    # ---------------------------------------------------------------- evaluation
    def eval_batches(self, batches: Iterable) -> Iterator:
        """The eval batches this rank runs (ZeRO-3 and FSDP pad short shards with empty
        batches so that every rank joins every parameter all-gather: padded_eval_batches)."""
        return iter(batches)


def padded_eval_batches(batches: Iterable, device: torch.device) -> Iterator:
    """`batches`, then empty ones until this rank has run as many as the rank with the most
    (one all-reduce of the counts): for strategies whose every forward is a collective.
    Eval shards differ by up to one batch; an empty batch counts nothing."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        yield from batches
        return
    count = torch.tensor([len(batches)], device=device)  # type: ignore[arg-type]
    tdist.all_reduce(count, op=tdist.ReduceOp.MAX)
    done, last = 0, None
    for last in batches:
        done += 1
        yield last
    for _ in range(int(count.item()) - done):
        x, y = last
        yield x[:0], y[:0]
