"""Every rank trains the same recipe: checked once at start, before any collective.

Ranks started with different overrides (a typo in one node's command, an environment
variable that differs) would otherwise train diverged replicas to the end, or abort in
gloo when a batch size differs. Right after the ranks meet (ffdist.dist.init), each hands
rank 0 a hash of its resolved recipe; on a mismatch they hand in the values, and every
rank stops with one sentence naming the keys that differ and which ranks had which value
(exit 2), before any step.

A node may set for itself what only says where and how fast it runs: PER_NODE.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ffdist import dist
from ffdist.errors import RecipeError
from ffdist.recipe import Recipe, flatten

PER_NODE = ("launch.", "data.root", "data.num_workers", "data.prefetch_factor",
            "data.persistent_workers", "data.download")
"""Keys (a trailing dot: a whole section) that may differ between ranks: where each node
runs and with which devices (`launch.*`: `ffdist launch --node-rank R` passes its own),
where its copy of the data lies, and how fast its loader reads it."""
SHOWN_KEYS = 3


class RanksDisagree(RecipeError):
    """Ranks were started with different recipes (every rank raises it alike)."""


def shared(rcp: Recipe) -> dict[str, Any]:
    """The flattened recipe every rank must agree on."""
    return {k: v for k, v in flatten(rcp.to_dict()).items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in PER_NODE)}


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()


def check(rcp: Recipe) -> None:
    """Raise RanksDisagree on every rank when their recipes differ (nothing with one)."""
    values = shared(rcp)
    alike = dist.decide("recipe", _digest(values), lambda ds: len(set(ds)) == 1,
                        "the recipe check")
    if alike:
        return
    shown = {k: _short(v) for k, v in values.items()}
    sentence = dist.decide("recipe-values", shown, differences, "the recipe check")
    raise RanksDisagree(sentence)


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(per_rank: list[dict[str, str]]) -> str:
    """The sentence: the keys that differ, and which ranks had which value."""
    keys = list(dict.fromkeys(k for values in per_rank for k in values))  # schema order
    differing = [k for k in keys if len({values.get(k) for values in per_rank}) > 1]
    parts = []
    for key in differing[:SHOWN_KEYS]:
        by_value: dict[str, list[int]] = {}
        for rank, values in enumerate(per_rank):
            by_value.setdefault(values.get(key, "(absent)"), []).append(rank)
        each = [f"{value} on {_ranks(ranks)}" for value, ranks in by_value.items()]
        parts.append(f"{key} is {', '.join(each[:-1])} and {each[-1]}")
    more = len(differing) - SHOWN_KEYS
    tail = f" (and {more} more key{'s' if more > 1 else ''})" if more > 0 else ""
    return (f"the ranks were started with different recipes: {'; '.join(parts)}{tail}; start "
            "every rank with the same recipe file and overrides.")


def _ranks(ranks: list[int]) -> str:
    """rank 1 / ranks 0, 2-5."""
    spans, start, prev = [], ranks[0], ranks[0]
    for r in [*ranks[1:], None]:
        if r is None or r != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = r
        prev = r
    shown = ", ".join(spans[:6]) + (", ..." if len(spans) > 6 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"
