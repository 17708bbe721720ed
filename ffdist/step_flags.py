"""The two numbers every optimizer step agrees on across ranks, decided on the device and
read by the host later: how many ranks saw a non-finite loss, and whether a rank was asked
to stop (a preemption signal).

Step k, in `Trainer.train_step`:

1. `start`, after the last forward and before its backward: this rank's two numbers, on
   the device, and ONE asynchronous all-reduce of them (it overlaps the backward pass).
2. `wait`: the all-reduce joins the compute stream (on CUDA the stream waits for NCCL's,
   the host does not), and the optimizer gets its skip flag as a device tensor
   (ffdist.optim.step_unless: the fused kernel skips by itself).
3. `record`: a non-blocking copy of the reduced numbers into pinned host memory, and a CUDA
   event behind it.
4. `settle(lag)`: the host reads the flags that are `lag` steps old. The Trainer settles with
   lag 1 after it has queued step k+1, so waiting for step k's event never leaves the GPU
   without queued work; with lag 0 wherever it syncs anyway (a log line, a checkpoint, the
   end of an epoch) and for DeepSpeed, which decides on the host before its step.

Every rank settles the same steps at the same iteration of the same loop, so all ranks act
(skip count, nan_policy, max_bad_steps, stop) on the same step. Waiting for an event is not
a stream or device synchronisation: `torch.cuda.set_sync_debug_mode` does not flag it, and
it waits only for the work queued before the event, not for the next step behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Flags:
    """One step's flags as the host reads them (the same on every rank)."""

    step: int        # 1-based optimizer step
    bad_ranks: int   # ranks whose loss was NaN/Inf: the update was skipped on the device
    stop: bool       # some rank was asked to stop


class StepFlags:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._pending: deque[tuple[int, torch.Tensor, Any]] = deque()
        self._free: list[tuple[torch.Tensor, Any]] = []  # pinned buffer + event, reused

    def start(self, step_loss: torch.Tensor, stop_requested: bool) -> tuple[torch.Tensor, Any]:
        """This rank's flags (loss not finite, asked to stop) and the all-reduce started.
        Issued in the same order on every rank. No host read: the stop value is a fill."""
        flags = torch.zeros(2, device=self.device)
        flags[0] = (~torch.isfinite(step_loss)).float()
        if stop_requested:
            flags[1] = 1.0
        work = tdist.all_reduce(flags, async_op=True) if tdist.is_initialized() else None
        return flags, work

    def wait(self, started: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """The reduced flags' skip decision: 0-dim float32 on the device, exactly 1.0 (some
        rank's loss is not finite) or 0.0, as the fused kernels' found_inf wants it."""
        flags, work = started
        if work is not None:
            work.wait()  # CUDA: the compute stream waits; gloo (CPU): the host, as always
        return (flags[0] > 0).float()

    def record(self, step: int, started: tuple[torch.Tensor, Any]) -> None:
        """Queue step `step`'s reduced flags for the host (after `wait`)."""
        flags = started[0]
        if not self._cuda:
            self._pending.append((step, flags, None))  # CPU: already final, nothing to wait
            return
        host, event = self._free.pop() if self._free else (
            torch.empty(2, pin_memory=True), torch.cuda.Event())
        host.copy_(flags, non_blocking=True)
        event.record()
        self._pending.append((step, host, event))

    def settle(self, lag: int) -> list[Flags]:
        """Read every pending step's flags but the newest `lag`, oldest first."""
        read = []
        while len(self._pending) > lag:
            step, values, event = self._pending.popleft()
            if event is not None:
                event.synchronize()  # host waits for THAT step's flags only (see above)
            bad, stop = values.tolist()
            if event is not None:
                self._free.append((values, event))
            read.append(Flags(step, int(bad), stop > 0))
        return read

    def pending(self) -> int:
        return len(self._pending)
