"""`ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--synthetic] [--out PATH]`

Throughput of a recipe as it trains: the Trainer assembled by the same function as
`ffdist train`'s (ffdist.assemble.build_trainer: same loaders, model with model.freeze
applied, strategy, resolved batch plan and precision) and timed through its own optimizer
step (`Trainer.train_step`), on one device or under any launcher (`torchrun
--nproc_per_node 2 -m ffdist.bench RECIPE ...`). Writes bench.json (rank 0; default in the
run directory) with the global figures and each rank's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffdist.errors import EXIT_USER_ERROR, RecipeError

if TYPE_CHECKING:
    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.recipe import Recipe

USAGE = ("ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--eval-steps N] "
         "[--synthetic] [--out PATH]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist bench", usage=USAGE,
                                description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    p.add_argument("--eval-steps", type=int, default=10, help="timed eval batches (10)")
    p.add_argument("--synthetic", action="store_true",
                   help="random images of the recipe's size/channels/classes instead of its data")
    p.add_argument("--out", help="bench.json path (default: RUN_DIR/bench.json)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    from ffdist.train import split_argv

    p = build_parser()
    recipe, rest = split_argv(argv)  # also drops the deepspeed launcher's --local_rank
    args = p.parse_intermixed_args(([recipe] if recipe else []) + rest)
    for name in ("steps", "warmup", "eval_steps"):
        low = 1 if name == "steps" else 0
        if getattr(args, name) < low:
            raise RecipeError(f"--{name.replace('_', '-')}={getattr(args, name)} is too small; "
                              f"use {low} or more.")
    return args


def synthetic_overrides(recipe_path: str, overrides: list[str]) -> list[str]:
    """data.name=synthetic, keeping the recipe's image size (default 32) and classes."""
    from ffdist import recipe as recipe_mod
    from ffdist.assemble import image_size

    rcp = recipe_mod.load(recipe_path, overrides)
    # the size the recipe's own data would have (folders: the default crop)
    extra = ["data.name=synthetic", f"data.image_size={image_size(rcp.data)}"]
    # Enough images for a few global batches per epoch (bench cycles epochs anyway).
    need = int(4 * rcp.data.batch_size / max(1e-6, 1 - rcp.data.val_fraction)) + 1
    if rcp.data.synthetic_size < need:
        extra.append(f"data.synthetic_size={need}")
    return [*overrides, *extra]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # sync point: bench times finished work, once per step
        torch.cuda.synchronize(device)


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


def _epochs(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches across epoch ends, as fit() would feed them."""
    epoch = 0
    while True:
        trainer.loaders.train_sampler.set_epoch(epoch)
        yield from trainer.train_batches
        epoch += 1


def time_train(trainer: Trainer, steps: int, warmup: int,
               batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> dict[str, Any]:
    """Per-step wall time and data wait of the Trainer's own optimizer step, on the
    recipe's batches (or `batches`)."""
    device = trainer.info.device
    trainer.strategy.model.train()
    batches = _epochs(trainer) if batches is None else batches
    step_s, wait_s, gpu = [], [], []
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            begin = time.perf_counter()
        t0 = time.perf_counter()
        stats = trainer.train_step(batches, trainer.lr_at(i))
        _sync(device)
        if i >= warmup:
            step_s.append(time.perf_counter() - t0)
            wait_s.append(stats.data_wait)
            if device.type == "cuda" and (i - warmup) % 5 == 4:
                gpu.append(gpu_stats(device))
    elapsed = time.perf_counter() - begin
    return {"elapsed_s": elapsed, "step_s": step_s, "wait_s": wait_s, "gpu": gpu,
            "loss": float(stats.loss)}


@torch.no_grad()
def time_eval(trainer: Trainer, batches_max: int) -> tuple[int, float]:
    """(images, seconds) of up to `batches_max` eval batches after one untimed batch."""
    from ffdist.engine import forward

    if batches_max == 0:
        return 0, 0.0
    device, model, strategy = trainer.info.device, trainer.strategy.model, trainer.strategy
    model.eval()
    images, begin = 0, None
    for i, (x, _) in enumerate(trainer.val_batches):
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
    return images, time.perf_counter() - begin


def rank_figures(train: dict[str, Any], eval_images: int, eval_s: float, per_rank_batch: int,
                 device: torch.device) -> dict[str, Any]:
    steps = len(train["step_s"])
    total = sum(train["step_s"])
    return {"train_images_per_s": per_rank_batch * steps / train["elapsed_s"],
            "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
            "eval_images": eval_images, "eval_s": eval_s,
            "data_wait_fraction": sum(train["wait_s"]) / total,
            "step_ms_p50": 1000 * percentile(train["step_s"], 50),
            "step_ms_p90": 1000 * percentile(train["step_s"], 90),
            "elapsed_s": train["elapsed_s"], "peak_mem_bytes": peak_memory(device),
            "step_ms": [round(1000 * s, 3) for s in train["step_s"]],
            "last_loss": train["loss"], "gpu": train["gpu"][-1] if train["gpu"] else {}}


def combine(ranks: list[dict[str, Any]], global_batch: int, steps: int) -> dict[str, Any]:
    """Global figures from every rank's: a step ends when the slowest rank's ends."""
    slowest = max(r["elapsed_s"] for r in ranks)
    per_step = [max(r["step_ms"][i] for r in ranks) for i in range(steps)]
    eval_s = max(r["eval_s"] for r in ranks)
    eval_images = sum(r["eval_images"] for r in ranks)
    out = {"train_images_per_s": global_batch * steps / slowest,
           "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
           "data_wait_fraction": sum(r["data_wait_fraction"] for r in ranks) / len(ranks),
           "step_ms_p50": percentile(per_step, 50), "step_ms_p90": percentile(per_step, 90),
           "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks)}
    gpus = [r["gpu"] for r in ranks if r["gpu"]]
    if gpus and all("gpu_util_percent" in g for g in gpus):
        out["gpu_util_percent"] = sum(g["gpu_util_percent"] for g in gpus) / len(gpus)
        out["gpu_mem_used_bytes"] = max(g["gpu_mem_used_bytes"] for g in gpus)
    return out


def setup(rcp: Recipe, info: DistInfo) -> Trainer:
    """The Trainer bench times: ffdist train's assembly, with its sinks off and a checkpoint
    manager that never writes (bench leaves nothing behind but bench.json)."""
    from ffdist import assemble

    return assemble.build_trainer(rcp, info, assemble.resolve_for(rcp, info))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ffdist import checkpoint, dist, recipe
    from ffdist.monitor import setup_logging

    overrides = list(args.overrides)
    if args.synthetic:
        overrides = synthetic_overrides(args.recipe, overrides)
    rcp = recipe.load(args.recipe, overrides)
    info = dist.init(rcp.launch)
    try:
        setup_logging(info.is_primary)
        trainer = setup(rcp, info)
        train = time_train(trainer, args.steps, args.warmup)
        eval_images, eval_s = time_eval(trainer, args.eval_steps)
        mine = rank_figures(train, eval_images, eval_s, trainer.plan.per_rank, info.device)
        ranks = [mine]
        if info.distributed:
            import torch.distributed as tdist

            ranks = [None] * info.world_size
            tdist.all_gather_object(ranks, mine)  # sync point: once, after timing
        result = {**combine(ranks, trainer.plan.global_batch, args.steps),
                  **describe(trainer, args), "ranks": [{"rank": i, **r} for i, r in enumerate(ranks)]}
        if info.is_primary:
            out = Path(args.out) if args.out else rcp.run_dir / "bench.json"
            checkpoint.save_text(out, json.dumps(result, indent=1) + "\n")
            print(table(result))
            print(f"wrote {out}")
        return result
    finally:
        dist.shutdown()


def describe(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """What was timed: the resolved run and the model (bench.json's non-figures)."""
    from ffdist.assemble import param_counts

    rcp, res, p = trainer.recipe, trainer.resolved, trainer.plan
    params, trainable = param_counts(trainer.strategy.unwrap())
    return {"world_size": trainer.info.world_size, "model": rcp.model.name,
            "params": params, "trainable_params": trainable, "freeze": list(rcp.model.freeze),
            "batch_size": p.global_batch, "per_rank_batch": p.per_rank,
            "micro_batch_size": p.micro, "accum": p.accum, "precision": res.precision,
            "channels_last": rcp.model.channels_last, "compile": rcp.model.compile,
            "strategy": res.strategy, "data": rcp.data.name,
            "image_size": res.image_size, "device": trainer.info.device.type,
            "steps": args.steps, "warmup": args.warmup, "num_workers": rcp.data.num_workers,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(r: dict[str, Any]) -> str:
    mib = 1 / 2**20
    rows = [("model", f"{r['model']} ({r['strategy']}, {r['precision']}, "
                      f"{'channels_last' if r['channels_last'] else 'NCHW'}"
                      f"{', compiled' if r['compile'] else ''})"),
            ("data", f"{r['data']} {r['image_size']}px, workers {r['num_workers']}"),
            ("parameters", f"{r['params']:,} ({r['trainable_params']:,} trainable"
                           f"{', freeze ' + str(r['freeze']) if r['freeze'] else ''})"),
            ("world size x device", f"{r['world_size']} x {r['device']}"),
            ("batch (global)", f"{r['batch_size']} = {r['per_rank_batch']}/rank "
                               f"({r['micro_batch_size']} x {r['accum']} accum)"),
            ("train images/s", f"{r['train_images_per_s']:.1f}"),
            ("eval images/s", f"{r['eval_images_per_s']:.1f}"),
            ("data wait", f"{100 * r['data_wait_fraction']:.1f}% of step time"),
            ("step ms p50 / p90", f"{r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f}"),
            ("peak memory", f"{r['peak_mem_bytes'] * mib:.0f} MiB "
                            f"({'CUDA allocated' if r['device'] == 'cuda' else 'peak RSS'})")]
    if "gpu_util_percent" in r:
        rows.append(("GPU util / memory", f"{r['gpu_util_percent']:.0f}% / "
                                          f"{r['gpu_mem_used_bytes'] * mib:.0f} MiB"))
    if r["world_size"] > 1:
        per = ", ".join(f"{x['train_images_per_s']:.1f}" for x in r["ranks"])
        rows.append(("per-rank images/s", per))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"usage: {USAGE}", file=sys.stderr)
        return EXIT_USER_ERROR
    if argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    run(parse(argv))
    return 0


if __name__ == "__main__":
    from ffdist.cli import main as cli_main  # errors: ffdist.errors.guard

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
