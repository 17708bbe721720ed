"""The fan-out of a run's logs: each record goes once to every sink of the run
(ffdist.sinks: metrics.jsonl, TensorBoard, the progress output, CSV, MLflow, W&B), plus
console lines and the pictures (drawn by ffdist.visual). Only the primary rank (global rank
0) has sinks and console lines; other ranks get a Monitor with neither, so callers never
branch on rank. At the end every sink learns how the run ended (`close(status)`).

A sink that raises is reported once (one warning naming it), switched off, and training
goes on: logging is never a reason to lose a run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ffdist import sinks
from ffdist.sinks import STATUSES, Record, Sink, SinkSetup

if TYPE_CHECKING:
    from ffdist.recipe import Recipe

log = logging.getLogger("ffdist")


@dataclass(frozen=True)
class Pictures:
    """What sinks that show pictures (TensorBoard) are shown beyond numbers (rank 0): the
    first training batch as the model sees it (augmented, denormalized) and the confusion
    matrix of every evaluation (log.images), the model graph traced once (log.graph)."""

    images: bool
    graph: bool
    mean: Sequence[float]     # the data's normalization (0..255 scale), to undo it
    std: Sequence[float]
    classes: Sequence[str]


def setup_logging(is_primary: bool) -> None:
    level = logging.INFO if is_primary else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s ffdist %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


class Monitor:
    """The run's sinks (name -> sink, in log.sinks order), fed through one guard each."""

    def __init__(self, opened: dict[str, Sink] | None = None, pictures: Pictures | None = None,
                 console: bool = True):
        self.sinks: dict[str, Sink] = dict(opened or {})
        self.pictures = pictures
        self.console = console
        self._epoch = self._done = self._total = 0

    @classmethod
    def open(cls, rcp: Recipe, primary: bool, resume_step: int | None = None,
             pictures: Pictures | None = None, total_steps: int | None = None) -> Monitor:
        """The sinks sinks.selected(rcp.log) names, on the primary rank; none elsewhere. A
        sink that cannot start is reported and left out, like one that fails later.
        `total_steps`: the run's optimizer steps, for a whole-run ETA."""
        if not primary:
            return cls.off()
        monitor = cls({}, pictures)
        setup = SinkSetup(rcp.run_dir, resume_step, rcp, total_steps)
        for name in sinks.selected(rcp.log):
            try:
                monitor.sinks[name] = sinks.build(name, setup)
            except Exception as e:
                monitor._report(name, "start", e)
        return monitor

    @classmethod
    def off(cls) -> Monitor:
        """No sinks, no console lines: the other ranks, and ffdist bench."""
        return cls({}, console=False)

    # -- the fan-out -------------------------------------------------------------------
    def _each(self, member: str, *args: Any) -> None:
        for name, sink in list(self.sinks.items()):
            self._call(name, sink, member, *args)

    def _call(self, name: str, sink: Sink, member: str, *args: Any) -> None:
        try:
            getattr(sink, member)(*args)
        except Exception as e:  # any failure of a sink: it goes, training goes on
            del self.sinks[name]
            self._report(name, member, e)
            if member != "close":
                try:
                    sink.close()  # let go of its files; a second failure is not news
                except Exception:
                    pass

    @staticmethod
    def _report(name: str, member: str, e: Exception) -> None:
        log.warning("log sink '%s' failed in %s (%s: %s); it is switched off and training "
                    "goes on without it", name, member, type(e).__name__, e)

    def record(self, rec: Record) -> None:
        """One record (split, epoch, step, world_size, measurements...; or event=end) to
        every sink, each its own copy; `time` (Unix seconds) is added when absent."""
        rec.setdefault("time", round(time.time(), 3))
        for name, sink in list(self.sinks.items()):
            self._call(name, sink, "record", dict(rec))

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        self._each("hparams", params, metrics)

    def close(self, status: str = "finished") -> None:
        """Tell every sink how the run ended (sinks.STATUSES: finished, stopped, failed),
        then close each once; nothing reaches a sink after this (a second close does
        nothing)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: use one of {', '.join(STATUSES)}")
        self._each("end", status)
        self._each("close")
        self.sinks.clear()

    def info(self, msg: str, *args: Any) -> None:
        """A console line (rank 0); log lines go around a progress bar (ffdist.sinks.progress)."""
        if self.console:
            log.info(msg, *args)

    # -- progress --------------------------------------------------------------------
    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        self._epoch, self._done, self._total = epoch, initial, total
        self._each("progress", epoch, initial, total)

    def advance(self, n: int = 1) -> None:
        """`n` more optimizer steps of the epoch are done (every step: no device sync)."""
        self._done += n
        self._each("progress", self._epoch, self._done, self._total)

    def end_epoch(self) -> None:
        self._each("epoch_end")

    # -- pictures (ffdist.visual draws them) -----------------------------------------
    def _drawing(self) -> bool:
        return any(s.shows_pictures for s in self.sinks.values())

    @property
    def wants_first_batch(self) -> bool:
        """Whether `first_batch` would draw anything (the Trainer asks once)."""
        p = self.pictures
        return p is not None and (p.images or p.graph) and self._drawing()

    def first_batch(self, x: Any, model: Any, example: Any, step: int) -> None:
        """Once per run: a grid of the normalized batch `x`, and the graph of `model`
        traced on `example` (a couple of inputs, already in the model's dtype)."""
        if not self.wants_first_batch:
            return
        from ffdist.visual import denormalize, image_grid

        p = self.pictures
        if p.images:
            self._each("image", "train/sample_images",
                       image_grid(denormalize(x[:32], p.mean, p.std)), step)
        if p.graph:
            self._each("graph", model, example)

    def confusion(self, confusion: Any, step: int, split: str = "val", title: str = "") -> None:
        """The confusion matrix of an evaluation (rows: true class), as `split`/confusion."""
        if self.pictures is None or not self.pictures.images or not self._drawing():
            return
        from ffdist.visual import confusion_image

        picture = confusion_image(confusion, self.pictures.classes, title=title, split=split)
        self._each("image", f"{split}/confusion", picture, step)
