"""Where the run stands, with the ETA of the whole run.

On a terminal (stdout is a TTY): two tqdm bars, the whole run's (its ETA from the average
step time of this process, evaluations included) above the epoch's (with the last logged
loss and learning rate). While the bars are up, console log lines are written above them
(tqdm's logging redirect) instead of through them.

Anywhere else (`> log.txt`, nohup, sbatch, a pipe), where a bar would be noise: one log
line per training record (every log.every_steps, and at an epoch's end):

    09:17:23 ffdist step 40/440 (9%)  epoch 1  loss 1.7334  lr 0.09959  151 img/s  data wait 5.8%  ETA 0:03:06

The ETA is the rest of the run's steps at the average time per step of this segment (since
the process started or resumed, evaluations and checkpoints included), as H:MM:SS.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from typing import Any

from ffdist.sinks.base import Record, Sink, SinkSetup

log = logging.getLogger("ffdist")


LINE = (("epoch", lambda v: f"epoch {v}"), ("loss", lambda v: f"loss {v:.4f}"),
        ("lr", lambda v: f"lr {v:.4g}"), ("images_per_s", lambda v: f"{v:.0f} img/s"),
        ("data_wait_fraction", lambda v: f"data wait {100 * v:.1f}%"))
"""The fields of a line without a terminal, in order, as each is written."""


def clock(seconds: float) -> str:
    """H:MM:SS (whole seconds), the ETA's format: 0:01:05, 12:00:00."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Pace:
    """The ETA of the run from the steps done in this segment and the time they took."""

    def __init__(self, first_step: int, total: int | None):
        self.first, self.total = first_step, total
        self.began = time.perf_counter()

    def eta(self, step: int) -> str:
        done = step - self.first
        if not self.total or done <= 0:
            return "?"
        per_step = (time.perf_counter() - self.began) / done
        return clock(max(0, self.total - step) * per_step)


class ProgressSink(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.bars = sys.stdout.isatty()
        self.total = setup.total_steps
        self.step = setup.resume_step or 0  # the run's optimizer steps done
        self.pace: Pace | None = None       # from the first progress call: this segment
        self.epoch, self.done = -1, 0
        self.run_bar: Any = None
        self.bar: Any = None
        self._redirect = ExitStack()

    def progress(self, epoch: int, done: int, total: int) -> None:
        if epoch == self.epoch:  # the steps of an epoch the run starts in are counted already
            self.step += done - self.done
        self.epoch, self.done = epoch, done
        if self.pace is None:
            self.pace = Pace(self.step, self.total)
        if not self.bars:
            return
        if self.bar is None:
            self._open(epoch, done, total)
        else:
            self.bar.update(done - self.bar.n)
            self.run_bar.update(self.step - self.run_bar.n)

    def record(self, rec: Record) -> None:
        if rec.get("split") != "train":
            return
        if self.bar is not None and "loss" in rec and "lr" in rec:
            self.bar.set_postfix({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.3g}"},
                                 refresh=False)
        if not self.bars:
            log.info("%s", self.line(rec))

    def line(self, rec: Record) -> str:
        """The line of a training record, for a log file (the fields it has)."""
        step = rec["step"]
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)" if self.total
                 else f"step {step}"]
        for key, form in LINE:
            if key in rec:
                parts.append(form(rec[key]))
        parts.append(f"ETA {self.pace.eta(step) if self.pace else '?'}")
        return "  ".join(parts)

    def epoch_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.epoch_end()
        if self.run_bar is not None:
            self.run_bar.close()
            self.run_bar = None
        self._redirect.close()

    def _open(self, epoch: int, done: int, total: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        if self.run_bar is None:
            # smoothing=0: tqdm's rate (and so its ETA) is the average over this segment,
            # evaluations included, not the speed of the last few steps
            self.run_bar = tqdm(total=self.total, initial=self.step, desc="run", position=0,
                                leave=False, dynamic_ncols=True, smoothing=0, unit="step")
            self._redirect.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", position=1,
                        leave=False, dynamic_ncols=True, unit="step")
