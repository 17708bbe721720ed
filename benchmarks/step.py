"""a. ffdist's training step vs the hand-written loop; e. what `ffdist bench --synthetic`
reports vs the training step's median. Same model (small_cnn, 3x32x32), batch 64,
precision (auto: bf16 on a CPU with AMX/AVX512-BF16, else fp32), channels_last, the same
fused optimizer, in ONE process, alternating repetitions (A B, B A, ...).

    python -m benchmarks.step            # both;  python -m benchmarks.step a   # one

a. `Trainer.train_epoch` as `ffdist train` runs it (sampler, loader, prefetcher, lr
   schedule, flags, the per-interval log line) against ffdist.reference.ReferenceLoop (the
   loop a user writes, on batches already in memory). Target >= 0.97 on the CPU.
e. the images/s `ffdist bench --synthetic` prints (device batches, its own timing) against
   the global batch over the median step of the Trainer's step in train_epoch. Target: within
   3%; and no stall spikes, p90/p50 of both near 1.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, alternate, load, result

BATCH, STEPS, THREADS = 64, 20, 1
# 1,601 synthetic images: 320 val, 1,281 train = 20 steps of 64 per epoch.
OVERRIDES = ["model.name=small_cnn", "model.in_channels=3", "data.name=synthetic",
             "data.image_size=32", "data.synthetic_size=1601", f"data.batch_size={BATCH}",
             "schedule.epochs=1000", "schedule.warmup_epochs=0", "log.tensorboard=false",
             "log.progress=false", "precision=auto", "optim.weight_decay=0",
             "model.channels_last=true"]
RECIPE = str(REPO / "recipes" / "digits.yaml")


def one_thread() -> None:
    """Both sides on one intra-op thread: on a shared 2-core machine, 2-thread OpenMP
    regions stall at their barriers whenever another process holds a core, which adds noise
    unrelated to either loop (torchrun's default for CPU ranks is 1 thread, too)."""
    import torch

    torch.set_num_threads(THREADS)


def _setup(out: Path) -> tuple[Any, Any, list]:
    """ffdist's Trainer (train's assembly, sinks off), the reference loop, device batches."""
    from ffdist import assemble, bench, bench_timing, dist, recipe_load
    from ffdist.reference import ReferenceLoop

    rcp = recipe_load.load(RECIPE, [*OVERRIDES, f"output_dir={out}"])
    info = dist.init()
    trainer = bench.setup(rcp, info)
    loop = ReferenceLoop(rcp, assemble.resolve_for(rcp, info), info)
    return trainer, loop, bench_timing.device_batches(rcp, info, BATCH, 32)


class EpochTimer:
    """Trainer.train_epoch, one epoch per call, with every train_step timed."""

    def __init__(self, trainer: Any):
        self.trainer, self.steps = trainer, []
        real = trainer.train_step

        def timed(batches: Any, lr: float) -> Any:
            t0 = time.perf_counter()
            out = real(batches, lr)
            self.steps.append(time.perf_counter() - t0)
            return out

        trainer.train_step = timed

    def __call__(self) -> float:
        p = self.trainer.progress
        p.step_in_epoch = 0
        begin = time.perf_counter()
        self.trainer.train_epoch()
        seconds = time.perf_counter() - begin
        p.epoch += 1
        return BATCH * STEPS / seconds


def _loop_images_per_s(loop: Any, batches: list, steps: list[float]) -> float:
    it = itertools.cycle(batches)
    begin = time.perf_counter()
    for _ in range(STEPS):
        t0 = time.perf_counter()
        loop.train_step(it, 0.1)
        steps.append(time.perf_counter() - t0)
    return BATCH * STEPS / (time.perf_counter() - begin)


def _p90_p50(steps: list[float]) -> float:
    from ffdist.bench_timing import percentile

    return percentile(steps, 90) / percentile(steps, 50)


def bench_a(reps: int = 9) -> dict:
    """Trainer.train_epoch (images/s of whole epochs) vs the hand-written loop."""
    one_thread()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, loop, batches = _setup(Path(tmp))
        assert trainer.steps_per_epoch == STEPS
        epoch, loop_steps = EpochTimer(trainer), []
        epoch(), _loop_images_per_s(loop, batches, [])  # warm-up: allocations, oneDNN kernels
        epoch.steps.clear()
        ours, raw, xs, ys = alternate(epoch, lambda: _loop_images_per_s(loop, batches, loop_steps),
                                      reps)
        prec = trainer.resolved.precision
    return result("a. training step", "ffdist Trainer.train_epoch", ours, "hand-written loop", raw,
                  "images/s", ">= 0.97", ours / raw >= 0.97,
                  note=f"small_cnn 3x32x32, batch {BATCH}, {prec}, channels_last, fused SGD, "
                       f"{THREADS} thread, {STEPS} steps x {reps} alternating reps; "
                       f"ffdist {fmt(xs)}, loop {fmt(ys)}; p90/p50 ffdist "
                       f"{_p90_p50(epoch.steps):.3f}, loop {_p90_p50(loop_steps):.3f}")


def bench_e(reps: int = 7) -> dict:
    """bench --synthetic's train_images_per_s vs batch / median Trainer step (train_epoch)."""
    from ffdist import bench

    one_thread()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = _setup(Path(tmp))
        epoch = EpochTimer(trainer)
        epoch()
        epoch.steps.clear()
        args = bench.parse([RECIPE, *OVERRIDES, f"output_dir={tmp}", "--synthetic", "--steps",
                            str(STEPS), "--warmup", "2", "--eval-steps", "0",
                            "--out", f"{tmp}/bench.json"])
        spreads: list[float] = []

        def ffdist_bench() -> float:
            r = bench.run(args)
            spreads.append(r["step_ms_p90"] / r["step_ms_p50"])
            return r["train_images_per_s"]

        def train_median() -> float:
            n = len(epoch.steps)
            epoch()
            return BATCH / statistics.median(epoch.steps[n:])

        ours, train, xs, ys = alternate(ffdist_bench, train_median, reps)
    within = abs(ours / train - 1) <= 0.03
    return result("e. ffdist bench --synthetic", "bench reported", ours,
                  "batch / median train step", train, "images/s", "within 3% (0.97..1.03)",
                  within, note=f"same model/batch as a.; bench {fmt(xs)}, train {fmt(ys)}; "
                               f"p90/p50 bench {fmt(spreads, 3)}, train step "
                               f"{_p90_p50(epoch.steps):.3f}; {load()}")


def fmt(xs: list[float], digits: int = 0) -> str:
    return "[" + ", ".join(f"{x:.{digits}f}" for x in xs) + "]"


if __name__ == "__main__":
    which = sys.argv[1:] or ["a", "e"]
    for w in which:
        {"a": bench_a, "e": bench_e}[w]()
