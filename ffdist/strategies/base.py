"""The one small protocol every strategy follows (no deep class tree)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn


class Strategy(Protocol):
    model: nn.Module
    """What forward is called on (wrapped: DDP, compiled, DeepSpeed engine)."""
    optimizer: Any
    sharded: bool
    """True when every rank writes its own checkpoint shard (ZeRO)."""

    def no_sync(self, boundary: bool) -> AbstractContextManager:
        """Context for one micro-step; gradients are synchronized only when `boundary`."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> torch.Tensor | None:
        """Optimizer step at `lr`, zero the gradients; returns the grad norm if computed."""

    def unwrap(self) -> nn.Module:
        """The plain model (no DDP/compile/engine wrapper)."""

    def state_dict(self) -> dict[str, Any]:
        """Model/optimizer/scaler state for a checkpoint (plain types)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 model weights, plain and unprefixed, on rank 0 (None elsewhere); for
        model.pt and best.pt. A collective under ZeRO: every rank calls it."""

    def eval_batches(self, batches: Iterable) -> Iterator:
        """The eval batches this rank runs (ZeRO-3 pads short shards with empty batches so
        that every rank joins every parameter all-gather)."""

    # sharded strategies also have: save_shards(folder, tag, client_state)
