"""What `ffdist bench` times and how: sides (the Trainer's own step, or the hand-written
loop of ffdist.reference) built on first use, warmed up, then timed in alternating blocks;
the batches that feed them; step times, data waits and peak memory.

Step times: on CUDA, events recorded between steps and read once per repetition, so no host
sync is added inside a repetition (training has none either); on the CPU, the wall clock.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pathlib import Path

    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.profiling import Recording
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

Batch = tuple[torch.Tensor, torch.Tensor]
SYNTHETIC_BATCHES = 4  # distinct device batches cycled by --synthetic
PIPELINE_MIN_S = 1.0  # the shortest window the input pipeline alone is timed over


def device_batches(rcp: Recipe, info: DistInfo, batch: int, size: int,
                   n: int = SYNTHETIC_BATCHES) -> list[Batch]:
    """`n` fixed batches made on the device: images distributed as the prefetcher's
    normalised ones (mean 0, std 1), in the run's memory format; labels uniform over the
    classes. Seeded per rank; cycled, they cost the step nothing."""
    device = info.device
    g = torch.Generator(device=device).manual_seed(rcp.seed + 1000 * info.rank)
    fmt = torch.channels_last if rcp.model.channels_last else torch.contiguous_format
    shape = (batch, rcp.model.in_channels, size, size)
    return [(torch.randn(shape, generator=g, device=device).contiguous(memory_format=fmt),
             torch.randint(0, rcp.model.num_classes, (batch,), generator=g, device=device))
            for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # sync point: bench reads its clocks, once per repetition
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA's max_memory_allocated, else this process's peak RSS (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def gpu_stats(device: torch.device) -> dict[str, Any]:
    """NVML utilization (%) and device memory in use; {} off GPU or without NVML."""
    if device.type != "cuda":
        return {}
    try:  # torch.cuda.* use pynvml lazily and map CUDA_VISIBLE_DEVICES to NVML indices
        return {"gpu_util_percent": int(torch.cuda.utilization(device)),
                "gpu_mem_used_bytes": int(torch.cuda.device_memory_used(device))}
    except Exception as e:  # no pynvml / no NVML driver: report why instead of failing
        return {"gpu_stats_error": f"{type(e).__name__}: {e}"[:200]}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def epochs(trainer: Trainer) -> Iterator[Batch]:
    """Training batches across epoch ends, as fit() would feed them."""
    return stream_epochs(trainer.data.train, trainer.train_batches)


def stream_epochs(stream: Any, prefetched: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of `prefetched` (a DevicePrefetcher over `stream`, a train stream of
    ffdist.data.stream) across epoch ends."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from prefetched
        epoch += 1


class Side:
    """One thing bench times: `step(i)` runs optimizer step i and returns the host's data
    wait; `finish()` settles what a step left pending (the Trainer's flags)."""

    def __init__(self, label: str, device: torch.device,
                 build: Callable[[], tuple[Callable[[int], float], Callable[[], None]]]):
        self.label, self.device, self.build = label, device, build
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.elapsed_s, self.peak_mem, self.gpu = 0.0, 0, {}
        self.built, self.done, self.resident = False, 0, 0

    def ensure(self, warmup: int) -> None:
        """Build on first use, run the untimed warm-up (compile, cuDNN autotuning, the
        optimizer state), and note the memory this side holds between steps."""
        if self.built:
            return
        before = _allocated(self.device)
        self.step, self.finish = self.build()
        for _ in range(warmup):
            self.step(self.done)
            self.done += 1
        self.finish()
        _sync(self.device)
        self.resident = _allocated(self.device) - before
        self.built = True

    def block(self, steps: int) -> None:
        """`steps` timed steps: per-step times from CUDA events (one read at the end) or
        the CPU clock; peak memory of this side alone (the others' resident state out)."""
        device, cuda = self.device, self.device.type == "cuda"
        _sync(device)
        base = _allocated(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        begin = last = time.perf_counter()
        if cuda:
            marks[0].record()
        for i in range(steps):
            self.wait_s.append(self.step(self.done))
            self.done += 1
            if cuda:
                marks[i + 1].record()
            else:
                now = time.perf_counter()
                self.step_s.append(now - last)
                last = now
            if i == steps // 2:
                self.gpu = gpu_stats(device) or self.gpu
        self.finish()
        _sync(device)
        self.elapsed_s += time.perf_counter() - begin
        if cuda:
            self.step_s += [marks[i].elapsed_time(marks[i + 1]) / 1000 for i in range(steps)]
            self.peak_mem = max(self.peak_mem, peak_memory(device) - base + self.resident)
        else:
            self.peak_mem = peak_memory(device)


def alternate(sides: list[Side], steps: int, reps: int, warmup: int) -> None:
    """Repetitions A B .., then .. B A, ...: each side built and warmed up just before its
    first block (so the first side's memory is measured with nothing else on the device)."""
    for rep in range(reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            side.ensure(warmup)
            side.block(steps)


def profile(side: Side, steps: int, recording: Recording | None) -> tuple[Path, str] | None:
    """`steps` more steps of `side` (built and warmed up by the timing), recorded when
    `recording` is given (rank 0: its trace and table); every rank runs them, so that their
    collectives pair up."""
    if recording is not None:
        recording.start()
    for _ in range(steps):
        side.step(side.done)
        side.done += 1
    side.finish()
    return recording.stop() if recording is not None else None


def trainer_side(label: str, trainer: Trainer, batches: Iterator[Batch]) -> Side:
    def step(i: int) -> float:
        # The step counter advances as in training, so the step's regularization costs
        # what it costs there: a new mixup/cutmix draw every step, the EMA update every
        # optim.ema_every_steps.
        wait = trainer.train_step(batches, trainer.lr_at(i)).data_wait
        trainer.progress.step += 1
        return wait

    def build() -> tuple[Callable[[int], float], Callable[[], None]]:
        trainer.strategy.model.train()
        return step, trainer.settle_flags

    return Side(label, trainer.info.device, build)


def reference_side(label: str, rcp: Recipe, resolved: Resolved, info: DistInfo,
                   batches: Iterator[Batch], lr_at: Callable[[int], float]) -> Side:
    def build() -> tuple[Callable[[int], float], Callable[[], None]]:
        from ffdist.reference import ReferenceLoop

        loop = ReferenceLoop(rcp, resolved, info)
        return (lambda i: (loop.train_step(batches, lr_at(i)), 0.0)[1], lambda: None)

    return Side(label, info.device, build)


def time_train(trainer: Trainer, steps: int, warmup: int,
               batches: Iterator[Batch] | None = None) -> dict[str, Any]:
    """Per-step times and data waits of the Trainer's own optimizer step, on the recipe's
    batches (or `batches`): one warm-up, one block."""
    side = trainer_side("ffdist", trainer, epochs(trainer) if batches is None else batches)
    alternate([side], steps, 1, warmup)
    return {"elapsed_s": side.elapsed_s, "step_s": side.step_s, "wait_s": side.wait_s,
            "gpu": side.gpu, "peak_mem": side.peak_mem}


def cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and its live child processes (the loader
    workers), from /proc; None where there is no /proc (not Linux)."""
    import os
    from pathlib import Path

    def own(pid: str) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime stime, and cutime cstime: the workers of an epoch that ended and were reaped
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    try:
        pids, seen, total = [str(os.getpid())], set(), 0.0
        while pids:
            pid = pids.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                total += own(pid)
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += (task / "children").read_text().split()
            except OSError:  # a child that just ended
                continue
        return total
    except (OSError, ValueError):
        return None


def draw(trainer: Trainer, n: int = SYNTHETIC_BATCHES) -> list[Batch]:
    """The next `n` training micro-batches, on the device (to time the step alone)."""
    source = epochs(trainer)
    return [next(source) for _ in range(n)]


def time_pipeline(trainer: Trainer, batches: int) -> dict[str, Any]:
    """The Trainer's input pipeline alone (time_input)."""
    return time_input(trainer.data.train, trainer.train_batches, trainer.info.device, batches)


def time_input(stream: Any, prefetched: Any, device: torch.device,
               batches: int) -> dict[str, Any]:
    """An input pipeline alone: `batches` micro-batches (and PIPELINE_MIN_S at least) of a
    train stream through its DevicePrefetcher (the box path's decode and crop on the device
    included), nothing else. Its images/s and the CPU cores it kept busy (this process and
    its loader workers, from /proc), and the box path's counts of device- and
    worker-decoded samples."""
    source = stream_epochs(stream, prefetched)
    next(source)  # workers up, first batch out: not timed
    _sync(device)
    cpu0, begin, images, timed = cpu_seconds(), time.perf_counter(), 0, 0
    # At least PIPELINE_MIN_S as well as `batches`: a few small batches come out of the
    # workers' prefetch queue in milliseconds, below the 10 ms tick /proc counts CPU in.
    while timed < batches or time.perf_counter() - begin < PIPELINE_MIN_S:
        x, _y = next(source)
        images, timed = images + len(x), timed + 1
    _sync(device)
    wall = time.perf_counter() - begin
    cpu1 = cpu_seconds()
    cores = (cpu1 - cpu0) / wall if cpu0 is not None and cpu1 is not None else None
    decoder = getattr(prefetched, "box_decoder", None)
    return {"images_per_s": images / wall, "cores": cores, "batches": timed,
            "counts": dict(decoder.counts) if decoder is not None else None,
            "decoder": decoder.decoder.name if decoder is not None else None}


def time_step_alone(trainer: Trainer, batches: list[Batch], steps: int, warmup: int) -> float:
    """Median step (s) of the Trainer cycling `batches` already on the device: the step
    without its input pipeline."""
    side = trainer_side("step alone", trainer, itertools.cycle(batches))
    alternate([side], steps, 1, warmup)
    return percentile(side.step_s, 50)


@torch.no_grad()
def time_eval(trainer: Trainer, batches_max: int,
              batches: list[Batch] | None = None) -> tuple[int, float]:
    """(images, seconds) of up to `batches_max` eval batches after one untimed batch, of
    the recipe's eval data (or cycled `batches`)."""
    from ffdist.engine import forward

    if batches_max == 0:
        return 0, 0.0
    device, model, strategy = trainer.info.device, trainer.strategy.model, trainer.strategy
    source = trainer.val_batches if batches is None else itertools.islice(
        itertools.cycle(batches), batches_max + 1)
    model.eval()
    images, begin = 0, None
    for i, (x, _) in enumerate(source):
        if i == 1:
            _sync(device)
            begin = time.perf_counter()
        forward(model, x, strategy)
        if i >= 1:
            images += len(x)
        if i >= batches_max:
            break
    _sync(device)
    if begin is None:  # a single eval batch per rank: time it again, warm
        begin = time.perf_counter()
        forward(model, x, strategy)
        _sync(device)
        images = len(x)
    model.train()
    return images, time.perf_counter() - begin
