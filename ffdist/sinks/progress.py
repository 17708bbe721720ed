"""The tqdm progress bar of each epoch, on a terminal only (a log file gets no bar), with the
last logged loss and learning rate beside it. While a bar is open, console log lines are
written above it (tqdm's logging redirect) instead of through it."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from typing import Any

from ffdist.sinks.base import Record, Sink, SinkSetup


class ProgressSink(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.on = sys.stdout.isatty()
        self.bar: Any = None
        self.epoch = -1
        self._redirect = ExitStack()

    def progress(self, epoch: int, done: int, total: int) -> None:
        if not self.on:
            return
        if self.bar is None or epoch != self.epoch:
            self._open(epoch, done, total)
        else:
            self.bar.update(done - self.bar.n)

    def record(self, rec: Record) -> None:
        if self.bar is not None and rec.get("split") == "train":
            self.bar.set_postfix({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.3g}"},
                                 refresh=False)

    def epoch_end(self) -> None:
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.epoch_end()

    def _open(self, epoch: int, done: int, total: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.epoch_end()
        self.epoch = epoch
        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False,
                        dynamic_ncols=True)
        self._redirect.enter_context(logging_redirect_tqdm())
