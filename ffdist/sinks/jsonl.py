"""metrics.jsonl: one JSON object per record, the whole record, in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

from ffdist.sinks.base import Record, Sink, SinkSetup

FILE = "metrics.jsonl"


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop records logged after the checkpoint's step: the resumed run logs them
    again, and the file must hold no duplicated steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if event.get("step", 0) <= after_step and event.get("event") != "end":
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


class JsonlSink(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        setup.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = setup.run_dir / FILE
        if setup.resume_step is not None:
            truncate_metrics(self.path, setup.resume_step)
        elif self.path.exists():  # a fresh run never starts where a run is (ffdist.run_dir)
            self.path.unlink()

    def record(self, rec: Record) -> None:
        # opened per record: a line is on disk when the next step runs, and a kill tears at
        # most the last line (truncate_metrics skips it on resume)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
