"""Plain state dicts, as every checkpoint and model.pt holds them: no wrapper prefixes.

A low module (it imports nothing of ffdist) so that strategies, the EMA and the checkpoint code share it
without importing each other."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")


def clean_state_dict(state: dict[str, V]) -> dict[str, V]:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.replace(prefix, "") if k.startswith(prefix) or f".{prefix}" in k else k
        out[k] = v
    return out
