"""`python -m tests.sinks_probe RECIPE [key=value ...]`: ffdist.train with two test sinks
registered, for tests/integration/test_sinks.py (one process and under torchrun).

- `recorder` writes every call it receives to <run_dir>/recorder-rank<RANK>.jsonl, so a
  test can compare what a sink got with metrics.jsonl and see which ranks had sinks;
- `failing` notes each call in <run_dir>/failing-calls.txt, then raises in `record`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ffdist import sinks
from ffdist.sinks import Record, Sink, SinkSetup


class Recorder(Sink):
    shows_pictures = True

    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.path = setup.run_dir / f"recorder-rank{os.environ.get('RANK', '0')}.jsonl"
        self.path.unlink(missing_ok=True)

    def _note(self, member: str, **fields: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"member": member, **fields}) + "\n")

    def record(self, rec: Record) -> None:
        self._note("record", rec=rec)

    def image(self, tag: str, picture: Any, step: int) -> None:
        self._note("image", tag=tag, step=step, size=list(picture.size))

    def graph(self, model: Any, example: Any) -> None:
        self._note("graph")

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        self._note("hparams", lr=params["optim.lr"], metrics=metrics)

    def progress(self, epoch: int, done: int, total: int) -> None:
        self._note("progress", epoch=epoch, done=done, total=total)

    def epoch_end(self) -> None:
        self._note("epoch_end")

    def close(self) -> None:
        self._note("close")


class Failing(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.calls = setup.run_dir / "failing-calls.txt"

    def record(self, rec: Record) -> None:
        with open(self.calls, "a") as f:
            f.write("record\n")
        raise RuntimeError("this sink breaks on purpose")

    def close(self) -> None:
        with open(self.calls, "a") as f:
            f.write("close\n")


def register() -> None:
    sinks.REGISTRY["recorder"] = f"{__name__}:Recorder"
    sinks.REGISTRY["failing"] = f"{__name__}:Failing"


def calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


if __name__ == "__main__":
    register()
    from ffdist import train

    sys.exit(train.main(sys.argv[1:]))
