"""`ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--reps N] [--eval-steps N]
[--synthetic] [--reference] [--precision P[,P...]] [--out PATH]`

Throughput of a recipe as it trains: the Trainer assembled by the same function as
`ffdist train`'s (ffdist.assemble.build_trainer: same loaders, model with model.freeze
applied, strategy, resolved batch plan and precision) and timed through its own optimizer
step (`Trainer.train_step`), on one device or under any launcher (`torchrun
--nproc_per_node 2 -m ffdist.bench RECIPE ...`). Writes bench.json (rank 0; default in the
run directory) with the global figures and each rank's.

What feeds the step:
- the recipe's data (default): its loaders and device prefetcher across epoch ends, as fit()
  feeds them; `data wait` is the share of the step the host spent waiting for batches;
- `--synthetic`: a fixed set of batches made on the device and cycled (no DataLoader, no
  copy): the model step alone, at the recipe's image size, channels and classes.

`--reference` also times a hand-written loop of the same model, batch, precision, memory
format, optimizer and compile setting (ffdist.reference) on device batches, in the same
process, in alternating repetitions (A B, B A, ...: load from other processes hits both
alike), and prints the ratio of median steps. `--precision bf16,fp16` times each precision's
Trainer (and reference) the same way and prints them side by side.

Step times: on CUDA, events recorded between steps and read once per repetition, so no host
sync is added inside a repetition (training has none either); on the CPU, the wall clock.
Achieved TFLOP/s: the FLOPs of one step (ffdist.flops, FlopCounterMode, forward + backward)
over the median step; MFU: that over the GPU's dense bf16/fp16 (TF32 for fp32) peak, for
GPUs in ffdist.flops.PEAKS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffdist.errors import EXIT_USER_ERROR, RecipeError, guard

if TYPE_CHECKING:
    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

Batch = tuple[torch.Tensor, torch.Tensor]
USAGE = ("ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--reps N] "
         "[--eval-steps N] [--synthetic] [--reference] [--precision P[,P...]] [--out PATH]")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SYNTHETIC_BATCHES = 4  # distinct device batches cycled by --synthetic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist bench", usage=USAGE,
                                description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per repetition (30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, per side (5)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions, alternating the sides (1; 3 with --reference or several "
                        "precisions)")
    p.add_argument("--eval-steps", type=int, default=10, help="timed eval batches (10)")
    p.add_argument("--synthetic", action="store_true",
                   help="batches made on the device (recipe's size/channels/classes), no loader")
    p.add_argument("--reference", action="store_true",
                   help="also time a hand-written loop of the same run and print the ratio")
    p.add_argument("--precision", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="comma-separated precisions to compare, e.g. bf16,fp16")
    p.add_argument("--out", help="bench.json path (default: RUN_DIR/bench.json)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    from ffdist.argv import split_argv

    p = build_parser()
    recipe, rest = split_argv(argv)  # also drops the deepspeed launcher's --local_rank
    args = p.parse_intermixed_args(([recipe] if recipe else []) + rest)
    for name in ("steps", "warmup", "eval_steps", "reps"):
        low = 1 if name in ("steps", "reps") else 0
        value = getattr(args, name)
        if value is not None and value < low:
            raise RecipeError(f"--{name.replace('_', '-')}={value} is too small; "
                              f"use {low} or more.")
    for value in args.precision or []:
        if value not in PRECISIONS:
            raise RecipeError(f"--precision={','.join(args.precision)}: {value!r} is not a "
                              f"precision; use a comma-separated list of {', '.join(PRECISIONS)}.")
    if args.reps is None:
        args.reps = 3 if args.reference or len(args.precision or []) > 1 else 1
    return args


def synthetic_overrides(recipe_path: str, overrides: list[str]) -> list[str]:
    """data.name=synthetic (a small in-memory set: the loaders are built, as train builds
    them, but --synthetic never iterates them), keeping the recipe's image size and classes."""
    from ffdist import recipe_load
    from ffdist.assemble import image_size

    rcp = recipe_load.load(recipe_path, overrides)
    # the size the recipe's own data would have (folders: the default crop)
    extra = ["data.name=synthetic", f"data.image_size={image_size(rcp.data)}"]
    need = int(rcp.data.batch_size / max(1e-6, 1 - rcp.data.val_fraction)) + 1
    if rcp.data.synthetic_size < need:
        extra.append(f"data.synthetic_size={need}")
    return [*overrides, *extra]


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


def _epochs(trainer: Trainer) -> Iterator[Batch]:
    """Training batches across epoch ends, as fit() would feed them."""
    epoch = 0
    while True:
        trainer.loaders.train_sampler.set_epoch(epoch)
        yield from trainer.train_batches
        epoch += 1


# ------------------------------------------------------------------ timing

class Side:
    """One thing bench times: `step(i)` runs optimizer step i and returns the host's data
    wait; `finish()` settles what a step left pending (the Trainer's flags)."""

    def __init__(self, label: str, device: torch.device,
                 build: Callable[[], tuple[Callable[[int], float], Callable[[], None]]]):
        self.label, self.device, self._build = label, device, build
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
        self.step, self.finish = self._build()
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
    side = trainer_side("ffdist", trainer, _epochs(trainer) if batches is None else batches)
    alternate([side], steps, 1, warmup)
    return {"elapsed_s": side.elapsed_s, "step_s": side.step_s, "wait_s": side.wait_s,
            "gpu": side.gpu, "peak_mem": side.peak_mem}


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


# ------------------------------------------------------------------ figures

def rank_figures(side: Side, eval_images: int, eval_s: float, per_rank_batch: int) -> dict[str, Any]:
    steps, total = len(side.step_s), sum(side.step_s)
    return {"train_images_per_s": per_rank_batch * steps / side.elapsed_s,
            "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
            "eval_images": eval_images, "eval_s": eval_s,
            "data_wait_fraction": min(sum(side.wait_s) / total, 1.0) if total else 0.0,
            "step_ms_p50": 1000 * percentile(side.step_s, 50),
            "step_ms_p90": 1000 * percentile(side.step_s, 90),
            "elapsed_s": side.elapsed_s, "peak_mem_bytes": side.peak_mem,
            "step_ms": [round(1000 * s, 3) for s in side.step_s], "gpu": side.gpu}


def combine(ranks: list[dict[str, Any]], global_batch: int, steps: int) -> dict[str, Any]:
    """Global figures from every rank's: a step ends when the slowest rank's ends."""
    slowest = max(r["elapsed_s"] for r in ranks)
    per_step = [max(r["step_ms"][i] for r in ranks) for i in range(steps)]
    eval_s = max(r["eval_s"] for r in ranks)
    eval_images = sum(r["eval_images"] for r in ranks)
    p50 = percentile(per_step, 50)
    out = {"train_images_per_s": global_batch * steps / slowest,
           "train_images_per_s_p50": global_batch / (p50 / 1000) if p50 > 0 else 0.0,
           "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
           "data_wait_fraction": sum(r["data_wait_fraction"] for r in ranks) / len(ranks),
           "step_ms_p50": p50, "step_ms_p90": percentile(per_step, 90),
           "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks)}
    gpus = [r["gpu"] for r in ranks if r["gpu"]]
    if gpus and all("gpu_util_percent" in g for g in gpus):
        out["gpu_util_percent"] = sum(g["gpu_util_percent"] for g in gpus) / len(gpus)
        out["gpu_mem_used_bytes"] = max(g["gpu_mem_used_bytes"] for g in gpus)
    return out


def flop_figures(flops_per_rank_step: int, step_ms: float, device: torch.device,
                 precision: str) -> dict[str, Any]:
    """Achieved TFLOP/s per device at the median step, and MFU on a known GPU."""
    from ffdist.flops import peak_tflops

    achieved = flops_per_rank_step / (step_ms / 1000) / 1e12 if step_ms > 0 else 0.0
    out: dict[str, Any] = {"flops_per_step": flops_per_rank_step, "tflops_per_device": achieved,
                           "peak_tflops": None, "mfu": None, "peak_of": None}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["gpu_name"] = name
        peak = peak_tflops(name, precision)
        if peak is not None:
            out["peak_of"], out["peak_tflops"] = f"{peak[0]} {precision} dense", peak[1]
            out["mfu"] = achieved / peak[1]
    return out


# ------------------------------------------------------------------ the command

def setup(rcp: Recipe, info: DistInfo) -> Trainer:
    """The Trainer bench times: ffdist train's assembly, with its sinks off and a checkpoint
    manager that never writes (bench leaves nothing behind but bench.json)."""
    from ffdist import assemble

    return assemble.build_trainer(rcp, info, assemble.resolve_for(rcp, info))


class Run:
    """One precision's Trainer side (and its reference side), built when first timed."""

    def __init__(self, args: argparse.Namespace, rcp: Recipe, info: DistInfo,
                 train_batches: list[Batch] | None, ref_batches: list[Batch] | None):
        from ffdist import assemble

        self.rcp, self.info = rcp, info
        self.resolved = assemble.resolve_for(rcp, info)
        self.trainer: Trainer | None = None
        label = self.resolved.precision

        def build() -> tuple[Callable[[int], float], Callable[[], None]]:
            self.trainer = trainer = setup(rcp, info)
            batches = _epochs(trainer) if train_batches is None else itertools.cycle(train_batches)
            return trainer_side(label, trainer, batches)._build()

        self.ffdist = Side(f"ffdist {label}", info.device, build)
        self.reference = None
        if args.reference:
            from ffdist.reference import refuse

            refuse(self.resolved)
            assert ref_batches is not None
            self.reference = reference_side(f"loop {label}", rcp, self.resolved, info,
                                            itertools.cycle(ref_batches), self.lr_at)

    def lr_at(self, step: int) -> float:
        assert self.trainer is not None
        return self.trainer.lr_at(step)

    def sides(self) -> list[Side]:
        return [self.ffdist] + ([self.reference] if self.reference else [])


def _flops(rcp: Recipe, resolved: Resolved) -> int | str:
    """FLOPs per optimizer step on one rank, or why they could not be counted."""
    from ffdist.flops import step_flops

    try:
        return step_flops(rcp, resolved.plan.micro, resolved.plan.accum, resolved.image_size)
    except Exception as e:  # an op without a meta kernel (some timm models): say so
        return f"{type(e).__name__}: {e}"[:200]


def measure(args: argparse.Namespace, rcp: Recipe, overrides: list[str],
            info: DistInfo) -> dict[str, Any]:
    """Build, alternate, evaluate and combine every side; the bench.json dict (all ranks)."""
    from ffdist import assemble, recipe_load

    recipes = [rcp] if not args.precision else [
        recipe_load.load(args.recipe, [*overrides, f"precision={p}"]) for p in args.precision]
    res0 = assemble.resolve_for(recipes[0], info)  # batch and image size: alike for all
    made = None  # device batches: --synthetic feeds them to every side, --reference to its loop
    if args.synthetic or args.reference:
        made = device_batches(rcp, info, res0.plan.micro, res0.image_size)
    runs = [Run(args, r, info, made if args.synthetic else None, made) for r in recipes]
    flops = _flops(recipes[0], res0)
    alternate([s for run in runs for s in run.sides()], args.steps, args.reps, args.warmup)
    mine = []
    for run in runs:
        assert run.trainer is not None
        evals = None
        if args.synthetic:
            per_rank = max(1, (run.rcp.data.eval_batch_size or run.rcp.data.batch_size)
                           // info.world_size)
            evals = device_batches(run.rcp, info, per_rank, run.resolved.eval_image_size, n=1)
        eval_images, eval_s = time_eval(run.trainer, args.eval_steps, evals)
        per_rank_batch = run.resolved.plan.per_rank
        mine.append([rank_figures(s, eval_images if s is run.ffdist else 0,
                                  eval_s if s is run.ffdist else 0.0, per_rank_batch)
                     for s in run.sides()])
    ranks = [mine]
    if info.distributed:
        import torch.distributed as tdist

        ranks = [None] * info.world_size
        tdist.all_gather_object(ranks, mine)  # sync point: once, after timing
    return assemble_result(args, runs, ranks, flops)


def assemble_result(args: argparse.Namespace, runs: list[Run], ranks: list,
                    flops: int | str) -> dict[str, Any]:
    steps = args.steps * args.reps
    out = []
    for i, run in enumerate(runs):
        plan, device = run.resolved.plan, run.info.device
        fig = {"precision": run.resolved.precision,
               **combine([r[i][0] for r in ranks], plan.global_batch, steps)}
        if isinstance(flops, int):
            fig.update(flop_figures(flops, fig["step_ms_p50"], device, run.resolved.precision))
        else:
            fig["flops_error"] = flops
        if run.reference is not None:
            ref = combine([r[i][1] for r in ranks], plan.global_batch, steps)
            fig["reference"] = {k: ref[k] for k in ("train_images_per_s", "train_images_per_s_p50",
                                                    "step_ms_p50", "step_ms_p90", "peak_mem_bytes")}
            fig["reference"]["step_ms"] = ranks[0][i][1]["step_ms"]
            fig["ratio_vs_reference"] = ref["step_ms_p50"] / fig["step_ms_p50"]
        out.append(fig)
    trainer = runs[0].trainer
    assert trainer is not None
    result = {**out[0], **describe(trainer, args),
              "ranks": [{"rank": k, **r[0][0]} for k, r in enumerate(ranks)]}
    if len(out) > 1:
        result["runs"] = out
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ffdist import checkpoint, dist, recipe_load
    from ffdist.monitor import setup_logging

    overrides = list(args.overrides)
    if args.synthetic:
        overrides = synthetic_overrides(args.recipe, overrides)
    rcp = recipe_load.load(args.recipe, overrides)
    info = dist.init(rcp.launch)
    try:
        setup_logging(info.is_primary)
        result = measure(args, rcp, overrides, info)
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
    from ffdist.summary import regularization

    rcp, res, p = trainer.recipe, trainer.resolved, trainer.plan
    params, trainable = param_counts(trainer.strategy.unwrap())
    return {"world_size": trainer.info.world_size, "model": rcp.model.name,
            "params": params, "trainable_params": trainable, "freeze": list(rcp.model.freeze),
            "batch_size": p.global_batch, "per_rank_batch": p.per_rank,
            "micro_batch_size": p.micro, "accum": p.accum, "precision": res.precision,
            "channels_last": rcp.model.channels_last, "compile": rcp.model.compile,
            "optimizer": f"{rcp.optim.name} ({_impl(trainer.strategy.optimizer)})",
            "strategy": res.strategy, "data": rcp.data.name,
            "synthetic": bool(getattr(args, "synthetic", False)),
            "image_size": res.image_size, "device": trainer.info.device.type,
            "steps": args.steps, "warmup": args.warmup, "reps": getattr(args, "reps", 1),
            "num_workers": rcp.data.num_workers,
            # timed inside the step: the mixing of every micro-batch, the EMA update
            "mixup": trainer.mixer is not None, "ema": trainer.ema is not None,
            "ema_every_steps": rcp.optim.ema_every_steps if trainer.ema is not None else None,
            "regularization": regularization(rcp, res.image_size),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _impl(opt: Any) -> str:
    defaults = getattr(opt, "defaults", {})
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "deepspeed"


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures of one precision's run, as table rows."""
    mib = 1 / 2**20
    rows = [("train images/s", f"{r['train_images_per_s']:.1f} (at the median step "
                               f"{r['train_images_per_s_p50']:.1f})"),
            ("eval images/s", f"{r['eval_images_per_s']:.1f}"),
            ("data wait", f"{100 * r['data_wait_fraction']:.1f}% of step time"),
            ("step ms p50 / p90", f"{r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f} "
                                  f"(p90/p50 {r['step_ms_p90'] / r['step_ms_p50']:.3f})"),
            ("peak memory", f"{r['peak_mem_bytes'] * mib:.0f} MiB")]
    if "tflops_per_device" in r:
        mfu = (f", MFU {100 * r['mfu']:.1f}% of {r['peak_of']} {r['peak_tflops']:g}"
               if r.get("mfu") is not None else ", MFU: no peak known for this device")
        rows.append(("TFLOP/s per device", f"{r['tflops_per_device']:.2f} "
                                           f"({r['flops_per_step'] / 1e9:,.1f} GFLOP/step{mfu})"))
    if "reference" in r:
        ref = r["reference"]
        rows.append(("hand-written loop", f"{ref['train_images_per_s']:.1f} images/s, step "
                                          f"p50 {ref['step_ms_p50']:.1f} ms"))
        rows.append(("ffdist / loop", f"{r['ratio_vs_reference']:.3f} (median steps)"))
    if "gpu_util_percent" in r:
        rows.append(("GPU util / memory", f"{r['gpu_util_percent']:.0f}% / "
                                          f"{r['gpu_mem_used_bytes'] * mib:.0f} MiB"))
    return rows


def table(r: dict[str, Any]) -> str:
    head = [("model", f"{r['model']} ({r['strategy']}, "
                      f"{'channels_last' if r['channels_last'] else 'NCHW'}"
                      f"{', compiled' if r['compile'] else ''}, {r['optimizer']})"),
            ("data", f"{'device-made batches' if r['synthetic'] else r['data']} "
                     f"{r['image_size']}px, workers {r['num_workers']}"),
            ("regularize", r["regularization"] + (" (mixing and EMA update timed in the step)"
                                                  if r["mixup"] or r["ema"] else "")),
            ("parameters", f"{r['params']:,} ({r['trainable_params']:,} trainable"
                           f"{', freeze ' + str(r['freeze']) if r['freeze'] else ''})"),
            ("world size x device", f"{r['world_size']} x {r['device']}"
                                    f"{' (' + r['gpu_name'] + ')' if r.get('gpu_name') else ''}"),
            ("batch (global)", f"{r['batch_size']} = {r['per_rank_batch']}/rank "
                               f"({r['micro_batch_size']} x {r['accum']} accum)"),
            ("timed", f"{r['steps']} steps x {r['reps']} repetitions, {r['warmup']} warm-up"),
            ("memory", "CUDA allocated" if r["device"] == "cuda" else "peak RSS")]
    runs = r.get("runs", [r])
    names = [k for k, _ in _rows(runs[0])]
    cols = [dict(_rows(x)) for x in runs]
    if len(runs) == 1:
        body = [("precision", r["precision"]), *_rows(r)]
    else:
        body = [("precision", " | ".join(x["precision"] for x in runs))]
        body += [(k, " | ".join(c.get(k, "-") for c in cols)) for k in names]
    rows = head + body
    if r["world_size"] > 1:
        rows.append(("per-rank images/s",
                     ", ".join(f"{x['train_images_per_s']:.1f}" for x in r["ranks"])))
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
    sys.exit(guard(main))  # the one error printer, as under `ffdist bench`
