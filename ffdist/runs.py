"""`ffdist runs [FOLDER] [--json]`: the runs under a folder (default runs/), one line each:
its state (finished; stopped at step N; running, with the process that holds it), best and
final val top-1, steps, training time over all its segments, and the recipe keys in which
the runs differ.

Fast, whatever the size of the runs: torch is never imported, and no checkpoint is loaded.
What it reads, per run: recipe.yaml; the tail of metrics.jsonl (the end record, the last
step logged); whether the run directory's lock is held (ffdist.run_dir.holder); and only
for a run that has not finished, the few plain fields of its latest checkpoint and of
best.pt (ffdist.ckpt_peek: the pickled dict without the tensors it points to).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffdist import run_dir
from ffdist.ckpt_format import BEST, BEST_FILE, SHARDED_STATE, TOTALS
from ffdist.ckpt_peek import peek
from ffdist.errors import FfdistError
from ffdist.recipe import flatten

IDENTITY = ("name", "output_dir")
"""Recipe keys that name the run rather than describe it: never listed as differences."""
TAIL = 1 << 16
"""Bytes read from the end of metrics.jsonl: the end record and the last lines logged."""


@dataclass
class RunInfo:
    name: str                        # the folder, relative to FOLDER
    path: str
    state: str                       # finished | stopped | running
    step: int | None = None          # steps done (finished), checkpointed (stopped), logged
    best_top1: float | None = None
    best_step: int | None = None
    final_top1: float | None = None
    seconds: float | None = None     # training time over all segments (ffdist.engine totals)
    segments: int | None = None
    holder: str | None = None        # running: the lock's text (pid, host, since)
    pid: int | None = None
    host: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # flattened recipe.yaml

    def describe(self) -> str:
        if self.state == "running":
            who = f"pid {self.pid} on {self.host}" if self.pid else self.holder
            return f"running ({who})"
        if self.state == "stopped":
            return f"stopped at step {self.step}" if self.step is not None else \
                "stopped before its first checkpoint"
        return self.state


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in (
        "recipe.yaml", "metrics.jsonl", "model.pt", "checkpoints", run_dir.LOCK_FILE))


def find(folder: Path) -> list[Path]:
    """The run directories in `folder` (or `folder` itself when it is one), by name."""
    if not folder.is_dir():
        raise FfdistError(f"{folder} is not a folder; give the folder that holds the runs "
                          "(the parent of their output_dir, runs/ by default).")
    if (folder / "recipe.yaml").is_file():
        return [folder]
    return sorted((d for d in folder.iterdir() if is_run(d)), key=lambda d: d.name)


def tail_records(path: Path) -> list[dict[str, Any]]:
    """The last records of a metrics.jsonl (a line torn by a kill is skipped)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    if size > TAIL:
        lines = lines[1:]  # the first line read may be cut
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint that `latest` names (a file, or a folder of shards
    with its marker), without loading it."""
    pointer = run / "checkpoints" / "latest"
    try:
        named = run / "checkpoints" / pointer.read_text().strip()
    except OSError:
        return None
    if named.is_dir():
        named = named / SHARDED_STATE
    return named if named.is_file() else None


def read_run(run: Path, root: Path) -> RunInfo:
    info = RunInfo(name=str(run.relative_to(root)) if run != root else run.name,
                   path=str(run), state="stopped", recipe=_recipe(run))
    records = tail_records(run / "metrics.jsonl")
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    info.holder = run_dir.holder(run)
    if info.holder is not None:
        info.state = "running"
        found = re.match(r"pid (\d+) on (\S+?),", info.holder)
        if found:
            info.pid, info.host = int(found[1]), found[2]
    elif (run / "model.pt").is_file():
        info.state = "finished"
    if info.state != "finished":
        _unfinished(run, info, records)
    elif end is not None:  # (a run that logged no metrics.jsonl says no more)
        info.step, info.best_top1, info.final_top1 = (end.get("step"), end.get("best_top1"),
                                                       end.get("final_top1"))
        info.best_step, info.seconds = end.get("best_step"), end.get("seconds")
        info.segments = end.get("segments", 1 if "seconds" in end else None)
    return info


def _unfinished(run: Path, info: RunInfo, records: list[dict[str, Any]]) -> None:
    """Steps, time and best so far of a run that is stopped or running, from its latest
    checkpoint's and best.pt's plain fields (ffdist.ckpt_peek: no tensor is read)."""
    latest = latest_checkpoint(run)
    fields = peek(latest, ("step", TOTALS)) if latest else None
    if fields:
        info.step = fields.get("step")
        totals = fields.get(TOTALS) or {}
        info.seconds, info.segments = totals.get("seconds"), totals.get("segments")
    if info.state == "running":  # its progress: the last step logged
        logged = [r["step"] for r in records if r.get("split") == "train"]
        info.step = max(logged, default=info.step)
    best = (peek(run / "checkpoints" / BEST_FILE, (BEST,)) or {}).get(BEST)
    if isinstance(best, dict):
        info.best_top1, info.best_step = best.get("value"), best.get("step")


def _recipe(run: Path) -> dict[str, Any]:
    import yaml

    from ffdist import safe_yaml

    try:
        loaded = safe_yaml.load((run / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return flatten(loaded) if isinstance(loaded, dict) else {}


def differing(runs: list[RunInfo]) -> list[str]:
    """The flattened recipe keys whose values are not the same in every run (a key one
    recipe lacks counts as a difference), identity keys left out."""
    keyed = [r for r in runs if r.recipe]
    if len(keyed) < 2:
        return []
    keys = sorted(set().union(*(r.recipe for r in keyed)) - set(IDENTITY))
    missing = object()
    return [k for k in keys if len({json.dumps(r.recipe.get(k, missing), default=str)
                                    for r in keyed}) > 1]


def _show(value: Any, width: int = 24) -> str:
    text = "-" if value is None else json.dumps(value) if isinstance(value, (list, dict)) \
        else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _time(run: RunInfo) -> str:
    from ffdist.summary import duration

    if run.seconds is None:
        return "-"
    segments = f" ({run.segments} segments)" if (run.segments or 1) > 1 else ""
    return duration(run.seconds) + segments


def table(runs: list[RunInfo], keys: list[str]) -> str:
    def top1(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    head = ["run", "state", "best", "final", "steps", "time", *keys]
    rows = [[r.name, r.describe(), top1(r.best_top1), top1(r.final_top1),
             "-" if r.step is None else str(r.step),
             _time(r),
             *(_show(r.recipe.get(k)) for k in keys)] for r in runs]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [head, *rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffdist runs", description="List the runs under a folder: state, best and final "
        "val top-1, steps, training time over all segments, and the recipe keys in which "
        "they differ. Reads no checkpoint's tensors and does not import torch.")
    p.add_argument("folder", nargs="?", default="runs",
                   help="the folder that holds the runs (default: runs)")
    p.add_argument("--json", action="store_true", help="the same, as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.folder)
    runs = [read_run(d, root) for d in find(root)]
    keys = differing(runs)
    if args.json:
        out = [{**{k: v for k, v in asdict(r).items() if k != "recipe"}, "describe": r.describe(),
                "differs": {k: r.recipe.get(k) for k in keys}} for r in runs]
        print(json.dumps({"folder": str(root), "keys": keys, "runs": out}, indent=2,
                         default=str))
        return 0
    if not runs:
        print(f"no runs in {root}/ (a run is a folder with a recipe.yaml, metrics.jsonl or "
              "checkpoints/)")
        return 0
    print(table(runs, keys))
    return 0


if __name__ == "__main__":
    from ffdist.errors import guard

    sys.exit(guard(main))
