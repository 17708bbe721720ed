"""`ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--reps N] [--eval-steps N]
[--synthetic] [--reference] [--precision P[,P...]] [--profile] [--out PATH]`

Throughput of a recipe as it trains: the Trainer assembled by the same function as
`ffdist train`'s (ffdist.assemble.build_trainer: same data streams, model with model.freeze
applied, strategy, resolved batch plan and precision) and timed through its own optimizer
step (`Trainer.train_step`), on one device or under any launcher (`torchrun
--nproc_per_node 2 -m ffdist.bench RECIPE ...`). Writes bench.json (rank 0; default in the
run directory) with the global figures and each rank's.

What feeds the step:
- the recipe's data (default): its train stream and device prefetcher across epoch ends, as fit()
  feeds them; `data wait` is the share of the step the host spent waiting for batches;
- `--synthetic`: a fixed set of batches made on the device and cycled (no DataLoader, no
  copy): the model step alone, at the recipe's image size, channels and classes.

On the recipe's data, after the timed steps: the step alone on a few of its batches, the
input pipeline alone (images/s, CPU cores busy), which of the two bounds the run, and, for
encoded images, the other data.decode setting's pipeline alone on a second stream (cpu
against the box path), so that both are measured in one run (`_pipeline`).

`--profile` runs `--steps` more steps of the Trainer after the timed ones under
torch.profiler (ffdist.profiling): rank 0's trace goes to profile/ beside bench.json, and
the operators that took the most time are printed.

`--reference` also times a hand-written loop of the same model, batch, precision, memory
format, optimizer and compile setting (ffdist.reference) on device batches, in the same
process, in alternating repetitions (A B, B A, ...: load from other processes hits both
alike), and prints the ratio of median steps. `--precision bf16,fp16` times each precision's
Trainer (and reference) the same way and prints them side by side.

The timing harness is ffdist.bench_timing (step times: CUDA events, or the CPU clock),
the figures and the table ffdist.bench_report (achieved TFLOP/s and MFU included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist import bench_report, bench_timing
from ffdist.bench_timing import Batch, Side
from ffdist.errors import EXIT_USER_ERROR, FfdistError, RecipeError, guard
from ffdist.outputs import Place

if TYPE_CHECKING:
    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

USAGE = ("ffdist bench RECIPE [key=value ...] [--steps N] [--warmup N] [--reps N] "
         "[--eval-steps N] [--synthetic] [--reference] [--precision P[,P...]] [--profile] "
         "[--out PATH]")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


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
    p.add_argument("--profile", action="store_true",
                   help="then --steps more steps under torch.profiler: a trace in profile/ "
                        "beside bench.json, and the top operators by self time")
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


def settled_overrides(recipe_path: str, overrides: list[str]) -> list[str]:
    """The model keys the recipe leaves to the data (auto), as the overrides that fix them
    (ffdist.assemble.settle, from the recipe's own data: before --synthetic replaces it)."""
    from ffdist import assemble, recipe_load

    rcp = recipe_load.load(recipe_path, overrides)
    done = assemble.settle(rcp)
    return [f"model.{k}={getattr(done.model, k)}" for k in ("num_classes", "cifar_stem")
            if getattr(done.model, k) != getattr(rcp.model, k)]


def synthetic_overrides(recipe_path: str, overrides: list[str]) -> list[str]:
    """data.name=synthetic (a small in-memory set: the streams are built, as train builds
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


# ------------------------------------------------------------------ the command

def setup(rcp: Recipe, info: DistInfo) -> Trainer:
    """The Trainer bench times: ffdist train's assembly, with its sinks off and a checkpoint
    manager that never writes (bench leaves nothing behind but bench.json)."""
    from ffdist import assemble, preflight

    resolved = assemble.resolve_for(rcp, info)
    model = assemble.build_model(rcp, load_weights=False)
    preflight.check_sizes(model, rcp, resolved)  # one sentence, not a traceback mid-timing
    return assemble.build_trainer(rcp, info, resolved, model=model)


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
            batches = bench_timing.epochs(trainer) if train_batches is None \
                else itertools.cycle(train_batches)
            return bench_timing.trainer_side(label, trainer, batches).build()

        self.ffdist = Side(f"ffdist {label}", info.device, build)
        self.reference = None
        if args.reference:
            from ffdist.reference import refuse

            refuse(self.resolved)
            assert ref_batches is not None
            self.reference = bench_timing.reference_side(f"loop {label}", rcp, self.resolved, info,
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
        made = bench_timing.device_batches(rcp, info, res0.plan.micro, res0.image_size)
    runs = [Run(args, r, info, made if args.synthetic else None, made) for r in recipes]
    flops = _flops(recipes[0], res0)
    bench_timing.alternate([s for run in runs for s in run.sides()], args.steps, args.reps, args.warmup)
    trace = _profile(args, runs[0], info) if args.profile else None
    mine = [_rank_figures(run, args, info) for run in runs]
    if not args.synthetic:  # the input pipeline alone and the step alone, side by side
        mine[0][0]["pipeline"] = _pipeline(runs[0], args)
    ranks = [mine]
    if info.distributed:
        import torch.distributed as tdist

        ranks = [None] * info.world_size
        tdist.all_gather_object(ranks, mine)  # sync point: once, after timing
    result = assemble_result(args, runs, ranks, flops)
    if trace is not None:
        result["profile_trace"] = str(trace)
    return result


def _profile(args: argparse.Namespace, run: Run, info: DistInfo) -> Path | None:
    """--profile: --steps more steps of the Trainer (after the timed ones: the profiler's
    overhead stays out of the figures) on every rank, recorded on rank 0 (its trace path)."""
    from ffdist import profiling

    recording = None
    if info.is_primary:
        folder = out_path(args, run.rcp).parent / profiling.FOLDER
        recording = profiling.Recording(folder, "bench-rank0", info.device)
    found = bench_timing.profile(run.ffdist, args.steps, recording)
    if found is None:
        return None
    profiling.report(f"{args.steps} bench steps", *found)
    return found[0]


def _pipeline(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """This rank's step alone on a few batches of its stream (images/s at the median step),
    then its input pipeline alone (images/s, CPU cores busy), after the timed steps. The
    step goes first: the loader workers sit on full prefetch queues then, instead of
    refilling them on the cores the step alone runs on."""
    assert run.trainer is not None
    kept = bench_timing.draw(run.trainer)
    step = bench_timing.time_step_alone(run.trainer, kept, args.steps, max(1, min(args.warmup, 2)))
    pipe = bench_timing.time_pipeline(run.trainer, args.steps * run.resolved.plan.accum)
    pipe["step_alone_images_per_s"] = run.resolved.plan.per_rank / step if step > 0 else 0.0
    other = _other_pipeline(run, args)
    if other is not None:
        pipe["other"] = other
    return pipe


def _other_pipeline(run: Run, args: argparse.Namespace) -> dict[str, Any] | None:
    """The input pipeline alone with the other data.decode setting, on a second stream of
    the same data: cpu against the box path (gpu on CUDA, boxes on the CPU), so that both
    are measured in one run. None where the source holds decoded images (nothing to
    compare); where the recipe cannot use the other setting here, the sentence saying why."""
    from dataclasses import replace

    from ffdist import assemble
    from ffdist.data import DevicePrefetcher, decoding, sources

    rcp, res = run.rcp, run.resolved
    if not sources.get(rcp.data.name).encoded:
        return None
    want = "cpu" if res.decode != "cpu" else ("gpu" if res.device.type == "cuda" else "boxes")
    try:
        decode, _ = decoding.resolve(replace(rcp.data, decode=want), rcp.model.in_channels,
                                     res.device, True)
    except FfdistError as e:
        return {"decode": want, "refused": str(e)}
    other = replace(rcp, data=replace(rcp.data, decode=want))
    streams = assemble.build_data(other, replace(res, decode=decode), run.info.rank)
    batches = DevicePrefetcher(streams.train, res.device, streams.spec.mean, streams.spec.std,
                               rcp.model.channels_last)
    out = bench_timing.time_input(streams.train, batches, res.device,
                                  args.steps * res.plan.accum)
    return {**out, "decode": decode}


PLACE = Place("--out", file=True)  # (bench.json's default folder is the run's: --out moves it)


def out_path(args: argparse.Namespace, rcp: Recipe) -> Path:
    """Where bench.json goes: --out, else the run directory."""
    return Path(args.out) if args.out else rcp.run_dir / "bench.json"


def _rank_figures(run: Run, args: argparse.Namespace, info: DistInfo) -> list[dict[str, Any]]:
    """This rank's figures of each side of `run`, after timing its eval batches."""
    assert run.trainer is not None
    evals = None
    if args.synthetic:
        per_rank = max(1, (run.rcp.data.eval_batch_size or run.rcp.data.batch_size)
                       // info.world_size)
        evals = bench_timing.device_batches(run.rcp, info, per_rank,
                                            run.resolved.eval_image_size, n=1)
    eval_images, eval_s = bench_timing.time_eval(run.trainer, args.eval_steps, evals)
    per_rank_batch = run.resolved.plan.per_rank
    return [bench_report.rank_figures(s, eval_images if s is run.ffdist else 0,
                                      eval_s if s is run.ffdist else 0.0, per_rank_batch)
            for s in run.sides()]


def assemble_result(args: argparse.Namespace, runs: list[Run], ranks: list,
                    flops: int | str) -> dict[str, Any]:
    steps = args.steps * args.reps
    out = []
    for i, run in enumerate(runs):
        plan, device = run.resolved.plan, run.info.device
        fig = {"precision": run.resolved.precision,
               **bench_report.combine([r[i][0] for r in ranks], plan.global_batch, steps)}
        if isinstance(flops, int):
            fig.update(bench_report.flop_figures(flops, fig["step_ms_p50"], device, run.resolved.precision))
        else:
            fig["flops_error"] = flops
        if run.reference is not None:
            ref = bench_report.combine([r[i][1] for r in ranks], plan.global_batch, steps)
            fig["reference"] = {k: ref[k] for k in ("train_images_per_s", "train_images_per_s_p50",
                                                    "step_ms_p50", "step_ms_p90", "peak_mem_bytes")}
            fig["reference"]["step_ms"] = ranks[0][i][1]["step_ms"]
            fig["ratio_vs_reference"] = ref["step_ms_p50"] / fig["step_ms_p50"]
        out.append(fig)
    trainer = runs[0].trainer
    assert trainer is not None
    result = {**out[0], **bench_report.describe(trainer, args),
              "ranks": [{"rank": k, **r[0][0]} for k, r in enumerate(ranks)]}
    if "pipeline" in ranks[0][0][0]:
        result["pipeline"] = bench_report.pipeline([r[0][0]["pipeline"] for r in ranks],
                                                   trainer.resolved)
    if len(out) > 1:
        result["runs"] = out
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ffdist import dist, outputs, recipe_load
    from ffdist.monitor import setup_logging

    overrides = [*args.overrides, *settled_overrides(args.recipe, list(args.overrides))]
    if args.synthetic:
        overrides = synthetic_overrides(args.recipe, overrides)
    rcp = recipe_load.load(args.recipe, overrides)
    info = dist.init(rcp.launch)
    try:
        out = out_path(args, rcp)
        # minutes of measuring are not spent for a file that cannot be written
        dist.primary_check(info, lambda: outputs.check_folder(
            out.parent, "ffdist bench", PLACE, names=[out.name]), "bench-out", "the output check")
        setup_logging(info.is_primary)
        result = measure(args, rcp, overrides, info)
        if info.is_primary:
            outputs.write_text(out, json.dumps(result, indent=1) + "\n", PLACE)
            print(bench_report.table(result))
            print(f"wrote {out}")
        return result
    finally:
        dist.shutdown()


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
