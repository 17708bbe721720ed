"""<run_dir>/csv/<split>.csv: one file per split (train.csv, val.csv, val_ema.csv, and
end.csv for the end of the run), one row per record, for spreadsheets and pandas.

A file per split, not one wide file: a split's records share their keys, so every column
of a file is filled. The header is `step, epoch, time, world_size`, then the record's
other keys in the order the first record had them. A key that appears later (train's
`skipped_steps` after the first skipped step) adds a column: the file is rewritten once
with the wider header, earlier rows empty there. On resume, rows after the checkpoint's
step are dropped (the resumed run writes them again).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from ffdist.sinks.base import Record, Sink, SinkSetup

FOLDER = "csv"
FIRST = ("step", "epoch", "time", "world_size")
"""The columns every file starts with (those a record has)."""


def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """The whole file, replaced atomically (a kill leaves the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class CsvSink(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.folder = setup.run_dir / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.columns: dict[str, list[str]] = {}
        for path in self.folder.glob("*.csv"):
            if setup.resume_step is None:  # a fresh run never starts where a run is
                path.unlink()
                continue
            columns, rows = _read(path)
            keep = [r for r in rows if path.stem != "end" and int(r["step"]) <= setup.resume_step]
            _write(path, columns, keep)
            self.columns[path.stem] = columns

    def record(self, rec: Record) -> None:
        name = rec.get("split") or str(rec.get("event", "other"))
        row = {k: _cell(v) for k, v in rec.items() if k not in ("split", "event")}
        path = self.folder / f"{name}.csv"
        columns = self.columns.get(name)
        if columns is None:  # the split's first record: its keys make the header
            columns = [k for k in FIRST if k in row] + [k for k in row if k not in FIRST]
            self.columns[name] = columns
            _write(path, columns, [row])
            return
        new = [k for k in row if k not in columns]
        if new:  # a wider header: the file once more, earlier rows empty in the new columns
            columns += new
            _write(path, columns, [*_read(path)[1], row])
            return
        with open(path, "a", newline="") as f:  # a row is on disk when the next step runs
            csv.DictWriter(f, columns).writerow(row)
