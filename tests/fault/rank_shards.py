"""A strategy that ffdist does not ship, registered from outside: `python -m
tests.fault.rank_shards RECIPE [key=value ...]` (or under torchrun) registers it as
`strategy.name=rank_shards` and runs `ffdist.train`'s main.

It is the single-device strategy with a SHARDED checkpoint layout: every rank writes its
own model/optimizer state into its own file of the checkpoint folder (save_shards) and
reads it back (load_shards); a checkpoint resumes only at the world size that wrote it
(`reshards = False`). Under N processes every rank trains its own replica (nothing is
synchronised), so the ranks' shards differ and a rank that read another's would show.
This file is the worked example of docs/extending.md ("Adding a strategy").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ffdist import strategies, train
from ffdist.ckpt_format import SHARDS
from ffdist.strategies.single import SingleDevice


class RankShards(SingleDevice):
    title = "rank-shards"
    one_process = False          # N processes: N independent replicas
    layout_kind = SHARDS         # every rank writes its own shard through save_shards
    layout_format = "rank-shards"
    reads = ("rank-shards",)     # nothing else: not the one-file checkpoints of single/DDP
    reshards = False             # a shard belongs to its rank: same world size only

    def __init__(self, model, recipe, resolved, info) -> None:
        super().__init__(model, recipe, resolved, info)
        self.rank = info.rank

    def state_dict(self) -> dict[str, Any]:
        return {}  # the shards hold it

    def save_shards(self, path: Path) -> None:
        torch.save(SingleDevice.state_dict(self), path / f"rank_{self.rank}.pt")

    def load_shards(self, path: Path) -> None:
        state = torch.load(path / f"rank_{self.rank}.pt", map_location="cpu",
                           weights_only=True)
        SingleDevice.load_state_dict(self, state)


if __name__ == "__main__":
    strategies.register("rank_shards", RankShards)
    sys.exit(train.main())
