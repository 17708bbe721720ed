"""a. ffdist's training loop vs a hand-written PyTorch loop; e. `ffdist bench`'s figure vs
the same hand-written loop. Same model (small_cnn, 3x32x32), batch, precision (auto: bf16
on this CPU), channels_last, data in memory.

    python -m benchmarks.step            # both;  python -m benchmarks.step a   # one
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, alternate, raw_loop, result

BATCH, STEPS, THREADS = 64, 20, 1
# 1,601 synthetic images: 320 val, 1,281 train = 20 steps of 64 per epoch.
OVERRIDES = ["model.name=small_cnn", "model.in_channels=3", "data.name=synthetic",
             "data.image_size=32", "data.synthetic_size=1601", f"data.batch_size={BATCH}",
             "schedule.epochs=1000", "schedule.warmup_epochs=0", "log.tensorboard=false",
             "log.progress=false", "precision=auto", "optim.weight_decay=0"]
RECIPE = str(REPO / "recipes" / "digits.yaml")


def one_thread() -> None:
    """Both sides on one intra-op thread: on a shared 2-core machine, 2-thread OpenMP
    regions stall at their barriers whenever another process holds a core, which adds noise
    unrelated to either loop (torchrun's default for CPU ranks is 1 thread, too)."""
    import torch

    torch.set_num_threads(THREADS)


def _ffdist_trainer(out: Path) -> Any:
    from ffdist import bench, dist, recipe

    rcp = recipe.load(RECIPE, [*OVERRIDES, f"output_dir={out}"])
    return bench.setup(rcp, dist.init())  # ffdist train's assembly, sinks off


def _raw(trainer: Any, state: dict | None = None) -> float:
    from ffdist.models.small import SmallCNN

    ds = trainer.loaders.spec.train
    return raw_loop(lambda: SmallCNN(num_classes=10, in_channels=3), ds.images, ds.labels,
                    BATCH, 0.1, trainer.resolved.precision, True, STEPS, warmup=2, state=state)


def bench_a(reps: int = 7) -> dict:
    """Trainer.train_epoch as `ffdist train` runs it (sampler, loader, prefetcher, lr
    schedule, logging with its once-per-interval sync) vs the raw loop."""
    one_thread()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _ffdist_trainer(Path(tmp))
        assert trainer.steps_per_epoch == STEPS

        def ffdist_epoch() -> float:
            trainer.progress.step_in_epoch = 0
            begin = time.perf_counter()
            trainer.train_epoch()
            seconds = time.perf_counter() - begin
            trainer.progress.epoch += 1
            return BATCH * STEPS / seconds

        # One model per side, trained on across the repetitions (as in a real run).
        raw_state: dict = {}
        ffdist_epoch(), _raw(trainer, raw_state)  # warm-up: allocations, oneDNN kernels
        ours, raw, xs, ys = alternate(ffdist_epoch, lambda: _raw(trainer, raw_state), reps)
    return result("a. training step", "ffdist Trainer", ours, "hand-written loop", raw,
                  "images/s", ">= 0.97", ours / raw >= 0.97,
                  note=f"small_cnn 3x32x32, batch {BATCH}, {trainer.resolved.precision}, channels_last, "
                       f"{THREADS} thread, {STEPS} steps x {reps} alternating reps; "
                       f"ffdist {fmt(xs)}, raw {fmt(ys)}")


def bench_e(reps: int = 7) -> dict:
    """The train_images_per_s `ffdist bench` reports vs the raw loop, same model/batch."""
    from ffdist import bench

    one_thread()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _ffdist_trainer(Path(tmp))  # only for the raw loop's data and precision
        args = bench.parse([RECIPE, *OVERRIDES, f"output_dir={tmp}", "--steps", str(STEPS),
                            "--warmup", "2", "--eval-steps", "0", "--out", f"{tmp}/bench.json"])

        def ffdist_bench() -> float:
            return bench.run(args)["train_images_per_s"]

        ours, raw, xs, ys = alternate(ffdist_bench, lambda: _raw(trainer), reps)
    within = abs(ours / raw - 1) <= 0.03
    return result("e. ffdist bench overhead", "ffdist bench", ours, "hand-written loop", raw,
                  "images/s", "within 3% (0.97..1.03)", within,
                  note=f"same model/batch as a.; bench {fmt(xs)}, raw {fmt(ys)}")


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.0f}" for x in xs) + "]"


if __name__ == "__main__":
    which = sys.argv[1:] or ["a", "e"]
    for w in which:
        {"a": bench_a, "e": bench_e}[w]()
