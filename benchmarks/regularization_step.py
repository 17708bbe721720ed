"""Cost of mixup/cutmix and of the EMA update inside the Trainer's optimizer step.

    PYTHONPATH=. python -m benchmarks.regularization_step                  # digits, CPU
    PYTHONPATH=. python -m benchmarks.regularization_step recipes/resnet50_tv_v2.yaml \\
        data.name=synthetic data.batch_size=256 data.mix_group=128 launch.device=cuda

Builds the recipe's Trainer four times through ffdist.assemble.build_trainer (what `ffdist
train` and `ffdist bench` run): without both, with mixing only, with the EMA only (updated
every step: optim.ema_every_steps=1, the most it can cost), with both. Each times
Trainer.train_step on the same few batches already on the device (so data loading is not
part of it, the host-side mixing draws are), interleaved in blocks so that load from other
processes hits all alike. Prints median ms/step and the ratio to the step without them.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time

import torch

from benchmarks.common import REPO, load

OFF_MIX = ("data.mixup_alpha=0", "data.cutmix_alpha=0", "data.cutmix_minmax=null")
OFF_EMA = ("optim.ema_decay=0", "checkpoint.best_weights=raw", "checkpoint.final_weights=raw")
VARIANTS = {"neither": (*OFF_MIX, *OFF_EMA), "mixup/cutmix": OFF_EMA,
            "EMA every step": (*OFF_MIX, "optim.ema_every_steps=1"),
            "both": ("optim.ema_every_steps=1",)}
STEPS, BLOCKS, WARMUP = 10, 8, 3


def trainer_for(recipe_path: str, overrides: list[str]):
    from ffdist import assemble, dist, recipe_load

    rcp = recipe_load.load(recipe_path, [*overrides, "log.tensorboard=false", "log.progress=false",
                                    "output_dir=/tmp/ffdist_bench_regularization"])
    info = dist.init(rcp.launch)
    return assemble.build_trainer(rcp, info, assemble.resolve_for(rcp, info))


def main(argv: list[str]) -> None:
    recipe_path = argv[0] if argv else str(REPO / "recipes" / "digits_regularized.yaml")
    overrides = argv[1:] or ["launch.device=cpu", "precision=fp32"]
    trainers = {name: trainer_for(recipe_path, [*overrides, *extra])
                for name, extra in VARIANTS.items()}
    first = next(iter(trainers.values()))
    device = first.info.device
    first.data.train.set_epoch(0)
    batches = list(itertools.islice(iter(first.train_batches), 4 * first.plan.accum))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def block(trainer) -> float:
        feed = itertools.cycle(batches)
        sync()
        t0 = time.perf_counter()
        for _ in range(STEPS):
            trainer.train_step(feed, 0.01)
            trainer.progress.step += 1  # a new mixing draw each step, as in training
        sync()
        return (time.perf_counter() - t0) / STEPS * 1000

    for trainer in trainers.values():
        trainer.strategy.model.train()
        for _ in range(WARMUP):
            block(trainer)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(BLOCKS):
        order = list(trainers) if i % 2 == 0 else list(trainers)[::-1]
        for name in order:
            times[name].append(block(trainers[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    p = first.plan
    print(f"{first.recipe.model.name}, {device.type}, {first.resolved.precision}, batch "
          f"{p.global_batch} ({p.micro} x {p.accum}), {torch.get_num_threads()} thread(s); "
          f"median ms/step of {BLOCKS} blocks x {STEPS} steps; {load()}")
    for name, ms in med.items():
        print(f"  {name:<16} {ms:8.2f} ms  ratio {ms / med['neither']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
