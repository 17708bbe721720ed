"""The log-sink protocol: what every sink receives, and the record it receives.

A sink is a class built from a `SinkSetup`; it overrides the members it uses (the others
do nothing). Each member exists for one kind of output:

- `record(rec)`: every log record, once (training log lines, evaluations, the end of the
  run). A record is a plain dict: the envelope (`split`, `epoch`, `step`, `world_size`,
  `time`, or `event` for the end of a run) and its measurements (`loss`, `top1`, ...).
  metrics.jsonl writes it whole; TensorBoard writes the measurements as scalars.
- `image(tag, picture, step)`: a picture (a PIL image) drawn by the fan-out
  (ffdist.monitor); drawn only when some sink has `shows_pictures`, since drawing costs.
- `graph(model, example)`: the model, traced once (log.graph); only TensorBoard draws it.
- `hparams(params, metrics)`: the flattened recipe and the run's final numbers, once at
  the end, for the tools that compare runs.
- `progress(epoch, done, total)`: where the epoch stands, after every optimizer step (and
  at its start): progress bars. Called on the host with no device sync; keep it cheap.
- `epoch_end()`: the epoch's steps are over, before evaluation: a bar goes away so the
  evaluation's lines print clean (an epoch can end before `done == total`: a stop request).
- `end(status)`: how the run ended, once, just before `close`: `finished`, `stopped` (a
  stop request: a checkpoint was written and the run resumes) or `failed` (an error):
  experiment trackers mark their run with it.
- `close()`: flush and let go of files, once at the end of the run.

Sinks exist on rank 0 only (ffdist.monitor.Monitor.open). A sink that raises is reported
once and switched off by the fan-out; it never stops training, so a sink need not guard
itself against its own failures.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn

    from ffdist.recipe import Recipe

Record = dict[str, Any]

STATUSES = ("finished", "stopped", "failed")
"""What `Sink.end` is told: the run finished, stopped on request (a checkpoint was written:
the same command resumes it), or failed (an error; the last checkpoint is kept)."""

ENVELOPE = frozenset({"split", "epoch", "step", "world_size", "time", "event"})
"""The keys of a record that say where it belongs, not what was measured."""


def need(package: str, sink: str) -> Any:
    """`import package` for a sink whose package is optional; a missing one says how to
    install it (the fan-out reports the sentence and leaves the sink out)."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"the {sink} sink needs the {package} package: pip install "
                          f"{package} (or pip install -e \".[{sink}]\" in a checkout of "
                          f"ffdist)") from e


def save_json(path: Path, value: Any) -> None:
    """A small JSON file written whole or not at all (a temp file, then os.replace): what
    a tracker sink keeps in the run directory to resume its run (its id)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


def measurements(rec: Record) -> dict[str, float]:
    """The numeric fields of a record that are not its envelope: what a metrics tool plots
    (TensorBoard writes each as `<split>/<key>`)."""
    return {k: v for k, v in rec.items()
            if k not in ENVELOPE and isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class SinkSetup:
    """What a sink is built from."""

    run_dir: Path               # the run directory (it exists and is this run's own)
    resume_step: int | None     # the checkpoint's step when the run resumes, else None:
    #                             a sink that keeps history drops what came after it
    recipe: Recipe              # the resolved recipe (names, the log section)
    total_steps: int | None = None  # the run's optimizer steps (the whole schedule), for a
    #                                 whole-run ETA; None where no run trains (tests)


class Sink:
    """Base of every log sink: each member does nothing until a sink overrides it."""

    shows_pictures = False
    """True when `image` and `graph` show something: the fan-out draws pictures only then."""

    def __init__(self, setup: SinkSetup) -> None:
        self.setup = setup

    def record(self, rec: Record) -> None:
        """One log record (the sink's own copy)."""

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        """A picture, e.g. `train/sample_images`, `val/confusion`."""

    def graph(self, model: nn.Module, example: Any) -> None:
        """The model's graph, traced on `example` (inputs in the model's dtype)."""

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """The flattened recipe and the final metrics, once at the end of a finished run."""

    def progress(self, epoch: int, done: int, total: int) -> None:
        """`done` of `total` optimizer steps of `epoch` are done."""

    def epoch_end(self) -> None:
        """The steps of the current epoch are over (evaluation comes next)."""

    def end(self, status: str) -> None:
        """How the run ended: 'finished', 'stopped' (it resumes) or 'failed'; then `close`."""

    def close(self) -> None:
        """The run is over: flush and release files."""
