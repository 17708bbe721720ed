"""Log sinks: where the records of a run go (rank 0 only). A seam: the protocol
(`ffdist.sinks.base.Sink`), and this registry of name -> "module:Class".

The registry holds strings so that nothing heavy is imported before a sink is built:
TensorBoard, MLflow and W&B (about 1 s of imports each) only when their sink is. A new sink is one
file in this folder plus one line in REGISTRY; the recipe names it in `log.sinks`.
ffdist.monitor.Monitor is the fan-out that builds the sinks and feeds them.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from ffdist.errors import RecipeError, printable
from ffdist.sinks.base import ENVELOPE, STATUSES, Record, Sink, SinkSetup, measurements

if TYPE_CHECKING:
    from ffdist.recipe import LogConfig

REGISTRY: dict[str, str] = {
    "jsonl": "ffdist.sinks.jsonl:JsonlSink",
    "tensorboard": "ffdist.sinks.tensorboard:TensorBoardSink",
    "progress": "ffdist.sinks.progress:ProgressSink",
    "csv": "ffdist.sinks.csv:CsvSink",
    "mlflow": "ffdist.sinks.mlflow:MlflowSink",
    "wandb": "ffdist.sinks.wandb:WandbSink",
}

SWITCHES = ("tensorboard", "progress")
"""Sinks with a LogConfig switch of their own name (log.tensorboard, log.progress): false
leaves the sink out whatever log.sinks says; true adds nothing that log.sinks leaves out."""


def selected(log: LogConfig) -> list[str]:
    """The sinks a run has: log.sinks in its order, less those switched off. THE place that
    decides it (train, eval and the end-of-run summary ask here)."""
    return [name for name in log.sinks
            if name not in SWITCHES or getattr(log, name)]


def check(log: LogConfig) -> None:
    """RecipeError unless every name in log.sinks is in the registry (before the run
    directory is touched: ffdist.train calls it right after loading the recipe)."""
    for name in log.sinks:
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, list(REGISTRY), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise RecipeError(f"log.sinks: '{printable(name)}' is not a log sink (the sinks "
                              f"are {', '.join(sorted(REGISTRY))}){hint}")


def build(name: str, setup: SinkSetup) -> Sink:
    """The sink registered as `name`, built (its module imported now, not before)."""
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)(setup)


__all__ = ["ENVELOPE", "REGISTRY", "STATUSES", "Record", "Sink", "SinkSetup", "build", "check",
           "measurements", "selected"]
