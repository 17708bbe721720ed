"""`python -m tests.shards.probe RECIPE [key=value ...]` (or under torchrun): ffdist's own
training entry point with one source added, `shards_probe`: the shards source, whose train
stream also appends the sample ids of every micro-batch it hands out to
$FFDIST_PROBE/rank<r>.jsonl, one line {"epoch", "step", "rank", "ids"} each (ids read from
the images: tests/shards/kit.py) when FFDIST_PROBE is set. Test-only: nothing in
ffdist's path records anything.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ffdist import train
from ffdist.data import sources
from ffdist.data.sources.shards import Shards
from tests.shards.kit import ids_of


class Recording:
    """A train stream that writes down what it yields, then yields it."""

    def __init__(self, stream: Any, rank: int) -> None:
        self.stream, self.rank = stream, rank
        self.spec, self.plan = stream.spec, stream.plan
        self.steps_per_epoch = stream.steps_per_epoch
        self.path = Path(os.environ["FFDIST_PROBE"]) / f"rank{rank}.jsonl"
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_steps
        self.stream.set_epoch(epoch, skip_steps)

    def __iter__(self) -> Iterator[Any]:
        for n, (x, y) in enumerate(self.stream):
            line = {"epoch": self.epoch, "step": self.skip + n // self.plan.accum,
                    "rank": self.rank, "ids": ids_of(x)}
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
            yield x, y

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class ProbeShards(Shards):
    def build(self, cfg: Any, req: Any) -> Any:
        streams = super().build(cfg, req)
        if os.environ.get("FFDIST_PROBE"):  # ffdist eval of a probe's run records nothing
            streams.train = Recording(streams.train, req.rank)
        return streams


if __name__ == "__main__":
    sources.register("shards_probe", ProbeShards)
    sys.exit(train.main())
