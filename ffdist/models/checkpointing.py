"""Activation checkpointing (`model.activation_checkpointing`): a block's activations are
not kept for backward but recomputed from its input, for any strategy.

Modes: none | blocks (every block of ffdist.models.model_blocks) | every_n (blocks N, 2N, ...,
1-based, N = model.activation_checkpointing_every) | selective (every block, but the
outputs of matmuls, convolutions and attention are saved and only the cheap ops between
them, norms, activations, additions, are recomputed: torch's selective activation
checkpointing with an op-level policy, the rule of torchtitan's op-level SAC without its
every-other-matmul refinement).

How: torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)
around the block's own forward. The block's CLASS is swapped for a subclass whose forward
does that (as FSDP2's fully_shard itself swaps classes), rather than wrapping the block
in a module: parameter names, state dicts and checkpoints stay exactly those of the plain
model, and torch.compile traces it (torch.distributed's hook-based composable
`checkpoint` fails under compile in torch 2.14: its recomputed tensors' metadata differ).
fully_shard applied afterwards puts its all-gather hooks around the checkpointed forward,
so a block's parameters are gathered once for its forward and once for its backward
(whose recompute runs inside it), as torchtitan composes them.

Exactness: the recompute restores the RNG state of the forward (preserve_rng_state), so
dropout and drop-path draw the same masks, and the gradients are bit-identical to a run
without checkpointing in fp32 (tests/unit/test_activation_checkpointing.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ffdist.errors import RecipeError
from ffdist.models import model_blocks as blocks_mod


class Checkpointed:
    """Put in front of a block's class: its forward runs under activation checkpointing."""

    ffdist_selective: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        extra = _selective_kwargs() if self.ffdist_selective else {}
        return checkpoint(super().forward, *args, use_reentrant=False,  # type: ignore[misc]
                          preserve_rng_state=True, **extra, **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if issubclass(cls, Checkpointed):
        return cls
    if cls not in _CLASSES:  # one subclass per block class, so instances share it
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {})
    return _CLASSES[cls]


@functools.cache
def _save_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: the expensive ones to recompute."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _save_ops() else CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def _selective_kwargs() -> dict[str, Any]:
    """checkpoint()'s arguments for selective checkpointing. What it saves goes through the
    saved-tensor hooks around it (torch 2.14's respect_saved_tensors_hooks; older ones
    route them so already): the hooks `ffdist plan` measures activations with see them."""
    import inspect

    from torch.utils.checkpoint import checkpoint

    kwargs: dict[str, Any] = {"context_fn": _selective_contexts}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters:
        kwargs["respect_saved_tensors_hooks"] = True
    return kwargs


def _selective_contexts() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def chosen(names: list[str], mode: str, every: int) -> list[str]:
    """Which of the blocks `names` a mode checkpoints."""
    if mode == "none":
        return []
    if mode == "every_n":
        return [n for i, n in enumerate(names, start=1) if i % every == 0]
    return list(names)


def apply(model: nn.Module, mode: str, every: int = 2, block_names: list[str] | None = None,
          model_name: str = "the model") -> list[str]:
    """Checkpoint the blocks `mode` selects (of `block_names`, else ffdist.models.model_blocks's)
    in place; returns their names. RecipeError when the model has no blocks to wrap."""
    if mode == "none":
        return []
    names = block_names if block_names is not None else blocks_mod.found(model)
    if not names:
        raise RecipeError(f"model.activation_checkpointing={mode}: model.name={model_name} has "
                          "no blocks ffdist knows; name them with model.blocks=[...] (module "
                          "names of the model), or set model.activation_checkpointing=none.")
    picked = chosen(names, mode, every)
    for module in blocks_mod.modules(model, picked):
        module.__class__ = _checkpointed_class(type(module))
        module.ffdist_selective = mode == "selective"
    return picked


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, Checkpointed)
