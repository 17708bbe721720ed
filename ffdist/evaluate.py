"""`ffdist eval RUN_DIR [key=value ...] [checkpoint=PATH]`: evaluate a run's weights on its
val split and write RUN_DIR/eval/{report.json, confusion.csv, confusion.png}.

Runs under any launcher, like training: `torchrun --nproc_per_node 2 -m ffdist.evaluate
RUN_DIR` (or `-m ffdist.cli eval RUN_DIR`) gives every rank a disjoint shard of the val set
(ffdist.data's ShardSampler, no padding) and sums the counts with one all-reduce, so `n` is
exactly the val set size whatever the world size.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffdist.errors import EXIT_USER_ERROR, FfdistError
from ffdist.metrics import EvalCounts, per_class

USAGE = "usage: ffdist eval RUN_DIR [key=value ...] [checkpoint=PATH]"


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Any, num_classes: int, device: torch.device,
                   precision: str = "fp32") -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics over every rank's shard (one all-reduce) and the global confusion matrix."""
    from ffdist.precision import autocast

    criterion = nn.CrossEntropyLoss(reduction="sum")
    counts = EvalCounts(num_classes, device)
    model.eval()
    for x, y in batches:
        with autocast(precision, device):
            logits = model(x)
        counts.update(logits.float(), y, criterion(logits.float(), y))
    return counts.reduce(), counts.confusion.cpu()


def build_report(result: dict[str, Any], confusion: torch.Tensor, classes: list[str],
                 **extra: Any) -> dict[str, Any]:
    stats = per_class(confusion)
    rows = [{"class": name, **{k: v[i] for k, v in stats.items()}}
            for i, name in enumerate(classes)]
    for r in rows:
        r["support"] = int(r["support"])
    return {**result, **extra, "per_class": rows}


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
    from ffdist.checkpoint import save_text
    from ffdist.visual import confusion_image, to_chw

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_confusion_csv(out / "confusion.csv", confusion, classes)
    picture = confusion_image(confusion, classes, split="val",
                              title=f"{run_dir.name}, {Path(report['weights']).name}")
    picture.save(out / "confusion.png")
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # lazy: ~1 s of imports

        step = _trained_step(run_dir)
        with SummaryWriter(str(run_dir / "tb")) as tb:  # a new event file next to training's
            tb.add_image("eval/confusion", to_chw(picture), step)
            for k in ("top1", "top5", "loss"):
                tb.add_scalar(f"eval/{k}", report[k], step)
    return out


def run(run_dir: str | Path, overrides: list[str]) -> dict[str, Any]:
    from ffdist import data, dist, precision
    from ffdist.data import DevicePrefetcher
    from ffdist.loading import load_run, split_checkpoint_arg

    run_dir = Path(run_dir)
    checkpoint, overrides = split_checkpoint_arg(overrides)
    loaded = load_run(run_dir, overrides, checkpoint)
    rcp = loaded.recipe
    info = dist.init(rcp.launch.pg_timeout)
    try:
        loaders = data.build(rcp, info.rank, info.world_size, info.device)
        fmt = torch.channels_last if rcp.model.channels_last else torch.contiguous_format
        model = loaded.model.to(device=info.device, memory_format=fmt)
        batches = DevicePrefetcher(loaders.val, info.device, loaders.spec.mean, loaders.spec.std,
                                   rcp.model.channels_last)
        prec = precision.resolve(rcp.precision, info.device)
        result, confusion = evaluate_model(model, batches, rcp.model.num_classes, info.device, prec)
        report = build_report(result, confusion, loaded.classes, world_size=info.world_size,
                              weights=str(loaded.weights), precision=prec)
        if info.is_primary:
            out = write_outputs(run_dir, report, confusion, loaded.classes, rcp.log.tensorboard)
            print(f"{loaded.weights}: top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  "
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
    from ffdist.train import split_argv

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[0])
        return 0
    run_dir, overrides = split_argv(argv)
    if run_dir is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        run(run_dir, overrides)
    except FfdistError as e:
        print(f"ffdist: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
