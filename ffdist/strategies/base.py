"""The one small protocol every strategy follows (no deep class tree).

A strategy owns everything that differs between single device, DDP and DeepSpeed: the
numerics of a forward pass (autocast / input casting), backward, the optimizer step and
its skip, where its state lives (in the checkpoint file, or in per-rank shards), and which
eval batches a rank runs. The Trainer only drives it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Strategy(Protocol):
    model: nn.Module
    """What forward is called on (wrapped: DDP, compiled, DeepSpeed engine)."""
    optimizer: Any
    skips_on_device: bool
    """True: step() applies or skips the update on the device, from a device flag, with no
    host sync (single, DDP: ffdist.optim.step_unless). False (DeepSpeed): the Trainer reads
    the flag on the host first and calls step() or skip_step()."""
    sharded: bool
    """True when every rank writes its own checkpoint shard (ZeRO): then the checkpoint
    goes through save_shards/load_shards, else through state_dict/load_state_dict. Decided
    once, here; ffdist.checkpoint reads it."""

    # ---------------------------------------------------------------- numerics
    def autocast(self) -> AbstractContextManager:
        """The context every forward runs in (train and eval): torch.autocast for
        single/DDP (fp32 weights), nothing for DeepSpeed (its weights are low-precision)."""

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The batch in the dtype the model's first layer takes."""

    # ---------------------------------------------------------------- one optimizer step
    def no_sync(self, boundary: bool) -> AbstractContextManager:
        """Context for one micro-step; gradients are synchronized only when `boundary`."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, skip: torch.Tensor) -> torch.Tensor:
        """Optimizer step at `lr` unless `skip` (0-dim float32 on the device, 1.0: the loss
        is not finite on some rank), then zero the gradients. Returns `applied`, 0-dim
        float32 on the device: 1.0 when the update was applied, 0.0 when it was skipped
        (`skip`, or an fp16 overflow). Reads nothing back when `skips_on_device`."""

    def skip_step(self) -> None:
        """Drop this step's gradients without updating anything (a non-finite loss; only
        called when not `skips_on_device`)."""

    # ---------------------------------------------------------------- state
    def unwrap(self) -> nn.Module:
        """The plain model (no DDP/compile/engine wrapper)."""

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint file holds of this strategy: {"model", "optimizer",
        "scaler"} (plain types), or {} when sharded (the shards hold it)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict (NotImplementedError when sharded)."""

    def save_shards(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Sharded: every rank writes its partition into <folder>/<tag>/
        (NotImplementedError when not sharded)."""

    def load_shards(self, path: Path) -> None:
        """Sharded: every rank reads its partition from `path`, a folder save_shards wrote
        (NotImplementedError when not sharded)."""

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 model weights, plain and unprefixed, on rank 0 (None elsewhere); for
        model.pt and best.pt. A collective under ZeRO: every rank calls it."""

    # ---------------------------------------------------------------- evaluation
    def eval_batches(self, batches: Iterable) -> Iterator:
        """The eval batches this rank runs (ZeRO-3 pads short shards with empty batches so
        that every rank joins every parameter all-gather)."""


class NotSharded:
    """The shard half of the protocol for strategies whose state fits in one file."""

    sharded = False

    def save_shards(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not sharded; its state goes "
                                  "into the checkpoint file (state_dict)")

    def load_shards(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not sharded; its state comes "
                                  "from the checkpoint file (load_state_dict)")
