"""torch.profiler traces of optimizer steps: where a step's time goes.

`Recording` runs the profiler over some steps, writes the trace into a folder
(`<run_dir>/profile/`) as Chrome trace JSON named `<worker>.pt.trace.json`, the file that
Perfetto (ui.perfetto.dev), chrome://tracing and TensorBoard's profiler plugin open, and
makes the table of the operators that took the most time of their own (self time: on the
GPU when the run is on one, else on the CPU).

Two users: `log.profile_steps: [start, end]` in a training run (`StepWindow`, rank 0, driven
by the Trainer after each step; with the key unset there is no window and the step runs
nothing of it), and `ffdist bench --profile` (extra steps after the timed ones).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffdist.errors import RecipeError

if TYPE_CHECKING:
    from ffdist.recipe import Recipe

log = logging.getLogger("ffdist")
TOP = 15
"""Rows of the operator table."""
FOLDER = "profile"
"""The traces' folder in the run directory."""


class Recording:
    """One profiler recording on `device`: start(), the steps, then stop() writes it."""

    def __init__(self, folder: Path, worker: str, device: torch.device):
        self.folder, self.worker, self.device = Path(folder), worker, device
        self.prof: Any = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        else:  # a CUDA build on a machine without a GPU: kineto's "gpuGetDeviceCount failed"
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # is noise there (read at start)
        self.prof = profile(activities=activities)
        self.prof.start()

    def stop(self) -> tuple[Path, str]:
        """Stop; (the trace file, the table of the top operators by self time)."""
        if self.device.type == "cuda":  # sync point: the queued kernels belong to the trace
            torch.cuda.synchronize(self.device)
        self.prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._free_name()
        self.prof.export_chrome_trace(str(path))
        on_gpu = self.device.type == "cuda"
        table = self.prof.key_averages().table(
            sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
            row_limit=TOP, max_name_column_width=60)
        self.prof = None
        return path, table

    def _free_name(self) -> Path:
        """<worker>.pt.trace.json, or <worker>-2.pt.trace.json ...: a trace already there (a
        run resumed inside its window) is kept."""
        path, i = self.folder / f"{self.worker}.pt.trace.json", 2
        while path.exists():
            path = self.folder / f"{self.worker}-{i}.pt.trace.json"
            i += 1
        return path


def report(what: str, path: Path, table: str) -> None:
    """The trace's path and the operator table, as one log message (rank 0)."""
    log.info("profile of %s: %s (open it in https://ui.perfetto.dev or chrome://tracing); "
             "the %d operators with the most time of their own:\n%s", what, path, TOP, table)


class StepWindow:
    """log.profile_steps = [start, end]: records optimizer steps start..end (1-based, both
    included). `after_step(step)` is called with the number of steps done, first before the
    run's first step; a run that resumes inside the window records the rest of it."""

    def __init__(self, window: list[int], run_dir: Path, device: torch.device):
        self.start, self.end = window
        self.recording = Recording(Path(run_dir) / FOLDER,
                                   f"rank0.steps{self.start}-{self.end}", device)
        self.running = self.over = False

    def after_step(self, step: int) -> None:
        if not self.running and not self.over and self.start - 1 <= step < self.end:
            self.first = step + 1
            self.recording.start()
            self.running = True
        elif self.running and step >= self.end:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Stop and report now (the window's end, or the run's end inside the window)."""
        if not self.running:
            return
        self.running, self.over = False, True
        path, table = self.recording.stop()
        report(f"steps {self.first}-{step}", path, table)


def window(rcp: Recipe, total_steps: int) -> list[int] | None:
    """log.profile_steps, or None when unset; RecipeError when it starts after the run's
    last step (it would record nothing)."""
    steps = rcp.log.profile_steps
    if not steps:
        return None
    if steps[0] > total_steps:
        raise RecipeError(f"log.profile_steps={steps}: the run has {total_steps} optimizer "
                          f"steps, so the window records nothing; give steps between 1 and "
                          f"{total_steps}, e.g. log.profile_steps=[{min(10, total_steps)},"
                          f"{min(15, total_steps)}].")
    return list(steps)
