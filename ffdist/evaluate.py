"""`ffdist eval RUN_DIR [--checkpoint PATH] [--weights raw|ema] [--set KEY=VALUE ...]`:
evaluate a run's weights on its val split and write RUN_DIR/eval/{report.json,
confusion.csv, confusion.png}.

The weights: model.pt (what checkpoint.final_weights named), or --checkpoint PATH; of a
checkpoint, its raw weights or their EMA (--weights raw|ema; default: for best.pt the
weights it was picked by, so that it gives the best value the run reported, and for any
other checkpoint the run's checkpoint.final_weights, so that it and model.pt evaluate the
same kind). The options are ffdist predict's and export's (ffdist.argv.run_options).

Runs under any launcher, like training: `torchrun --nproc_per_node 2 -m ffdist.evaluate
RUN_DIR` (or `-m ffdist.cli eval RUN_DIR`) gives every rank a disjoint shard of the val set
(the source's eval stream: no padding) and sums the counts with one all-reduce, so `n` is
exactly the val set size whatever the world size. The loop is the Trainer's own
(ffdist.engine.evaluate_model), at the precision training resolved (ffdist.assemble).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ffdist import outputs
from ffdist.argv import drop_local_rank, refuse_positional, run_options
from ffdist.errors import guard
from ffdist.metrics import per_class
from ffdist.outputs import Place, check_folder

if TYPE_CHECKING:
    from ffdist.data import Streams
    from ffdist.dist import DistInfo
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffdist eval", parents=[run_options()],
        description="Evaluate a run's weights on its val split and write RUN_DIR/eval/ "
                    "(report.json, confusion.csv, confusion.png); under torchrun every rank "
                    "evaluates its own shard.")
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml, model.pt)")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)  # refused: refuse_positional
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, the deepspeed launcher's --local_rank dropped; a key=value word is
    refused with the option it should have been (--checkpoint, --weights, --set)."""
    args = build_parser().parse_intermixed_args(drop_local_rank(argv))
    refuse_positional("ffdist eval", args.extra)
    return args


def build_report(result: dict[str, Any], confusion: torch.Tensor, classes: list[str],
                 **extra: Any) -> dict[str, Any]:
    stats = per_class(confusion)
    rows = [{"class": name, **{k: v[i] for k, v in stats.items()}}
            for i, name in enumerate(classes)]
    for r in rows:
        r["support"] = int(r["support"])
    return {**result, **extra, "per_class": rows}


OUTPUTS = ("report.json", "confusion.csv", "confusion.png")
PLACE = Place(elsewhere="evaluate a copy of the run folder kept on another disk")
"""RUN_DIR/eval/ is chosen by no option: the way out of a full or read-only disk."""


def check_outputs(run_dir: Path) -> None:
    """RUN_DIR/eval/ takes the report, before the model is even built (ffdist.outputs)."""
    check_folder(run_dir / "eval", "ffdist eval", PLACE, names=OUTPUTS)


def write_confusion_csv(path: Path, confusion: torch.Tensor, classes: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion.tolist()):
            w.writerow([name, *row])


def _trained_step(run_dir: Path) -> int:
    """The step the run ended at (for TensorBoard), 0 if unknown."""
    path = run_dir / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "end":
                step = int(event.get("step", 0))
    return step


def write_outputs(run_dir: Path, report: dict[str, Any], confusion: torch.Tensor,
                  classes: list[str], tensorboard: bool) -> Path:
    from ffdist.visual import confusion_image, to_chw

    out = run_dir / "eval"
    outputs.write_text(out / "report.json", json.dumps(report, indent=2) + "\n", PLACE)
    with outputs.replacing(out / "confusion.csv", place=PLACE) as tmp:
        write_confusion_csv(tmp, confusion, classes)
    picture = confusion_image(confusion, classes, split="val",
                              title=f"{run_dir.name}, {Path(report['weights']).name}")
    with outputs.replacing(out / "confusion.png", place=PLACE) as tmp:
        picture.save(tmp)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # lazy: ~1 s of imports

        step = _trained_step(run_dir)
        with SummaryWriter(str(run_dir / "tb")) as tb:  # a new event file next to training's
            tb.add_image("eval/confusion", to_chw(picture), step)
            for k in ("top1", "top5", "loss"):
                tb.add_scalar(f"eval/{k}", report[k], step)
    return out


@dataclass
class EvalSetup:
    resolved: Resolved
    data: Streams
    model: nn.Module          # the recipe's architecture (ffdist.assemble.build_model)


def setup(rcp: Recipe, info: DistInfo) -> EvalSetup:
    """What ffdist eval runs: the run's resolved batch plan and precision (as training
    resolved them, `accelerate launch --mixed_precision` included), its data, its model."""
    from ffdist import assemble, preflight

    resolved = assemble.resolve_for(rcp, info, trains=False)
    data = assemble.build_data(rcp, resolved, info.rank)
    model = assemble.build_model(rcp, load_weights=False)
    preflight.check_sizes(model, rcp, resolved, training=False)  # data.image_size=... given
    return EvalSetup(resolved, data, model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ffdist import dist, loading, sinks
    from ffdist.data import DevicePrefetcher
    from ffdist.engine import evaluate_model
    from ffdist.precision import Autocast

    run_dir = Path(args.run_dir)
    rcp = loading.load_recipe(run_dir, args.overrides)
    weights = loading.weights_path(run_dir, args.checkpoint)
    state, kind = loading.run_weights(rcp, weights, args.weights)
    info = dist.init(rcp.launch)
    try:
        # (the primary is the only rank that writes; all ranks stop alike)
        dist.primary_check(info, lambda: check_outputs(run_dir), "eval-out", "the output check")
        s = setup(rcp, info)
        loading.load_into(s.model, state, weights)
        fmt = torch.channels_last if rcp.model.channels_last else torch.contiguous_format
        model = s.model.to(device=info.device, memory_format=fmt)
        spec, prec = s.data.spec, s.resolved.precision
        batches = DevicePrefetcher(s.data.eval, info.device, spec.mean, spec.std,
                                   rcp.model.channels_last)
        result, confusion = evaluate_model(model, batches, rcp.model.num_classes, info.device,
                                           Autocast(prec, info.device))
        classes = list(spec.classes)
        report = build_report(result, confusion, classes, world_size=info.world_size,
                              weights=str(weights), weights_kind=kind, precision=prec)
        if info.is_primary:
            out = write_outputs(run_dir, report, confusion, classes,
                                "tensorboard" in sinks.selected(rcp.log))
            print(f"{weights} ({kind}): top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  "
                  f"loss {result['loss']:.4f}  n={result['n']}  ({info.world_size} process(es))")
            _print_per_class(report)
            print(f"wrote {out}/report.json, confusion.csv, confusion.png")
        return report
    finally:
        dist.shutdown()


def _print_per_class(report: dict[str, Any], limit: int = 20) -> None:
    rows = report["per_class"]
    if len(rows) > limit:  # ImageNet-size: the weakest classes; report.json has them all
        rows = sorted(rows, key=lambda r: r["f1"])[:10]
        print(f"the 10 classes with the lowest F1 of {len(report['per_class'])}:")
    print(f"{'class':>12} {'acc':>6} {'prec':>6} {'recall':>6} {'f1':>6} {'support':>7}")
    for r in rows:
        print(f"{r['class'][:12]:>12} {r['accuracy']:6.3f} {r['precision']:6.3f} "
              f"{r['recall']:6.3f} {r['f1']:6.3f} {r['support']:7d}")


def main(argv: list[str] | None = None) -> int:
    """`ffdist eval` and `python -m ffdist.evaluate` (each rank under a launcher)."""
    argv = sys.argv[1:] if argv is None else argv
    return guard(lambda: run(parse(argv)) and 0)


if __name__ == "__main__":
    sys.exit(main())
