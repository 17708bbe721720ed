"""f. The box path against the CPU decode path: the input pipeline alone on one JPEG folder.

Both sides: ffdist's imagefolder stream with the same workers, batch and 224 px crops, then
DevicePrefetcher (normalisation, channels_last), timed over whole epochs from creating the
iterator to the last batch, after one warm-up epoch each, sides alternating.

- decode=cpu: the loader workers decode each JPEG and crop it (transforms v2 on uint8);
- decode=boxes (on the CPU) or decode=gpu (with --device cuda): the workers read bytes and
  draw the crop boxes; the training process decodes the batch and crops every box in one
  roi_align. On the CPU that decode runs in ONE process, so the box path is not meant to be
  faster here: the figure says what it costs where no GPU takes the decode.

Each side's images/s and the CPU cores it kept busy (the training process and its workers,
from /proc), and the ratios box path / cpu. The hardware is named in the output.

    python -m benchmarks.box_path [--device cuda] [--workers N] [--reps N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, alternate, cpu, load, result

CLASSES, PER_CLASS, SIZE, BATCH = 8, 40, 224, 32
STORED = (500, 375)  # ImageNet's typical stored size


def hardware(device: str) -> str:
    import torch

    gpu = f"; GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"CPU {cpu()}{gpu}; torch {torch.__version__}"


def loader(root: Path, decode: str, device: str, workers: int):  # noqa: ANN201
    """One epoch of ffdist's train stream through DevicePrefetcher -> (images, cpu seconds)."""
    import torch

    from ffdist import recipe_load
    from ffdist.assemble import build_data, resolve
    from ffdist.bench_timing import cpu_seconds
    from ffdist.data import DevicePrefetcher

    rcp = recipe_load.load(str(REPO / "recipes" / "digits.yaml"), [
        "data.name=imagefolder", f"data.root={root}", f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}", f"data.num_workers={workers}", "model.in_channels=3",
        f"model.num_classes={CLASSES}", f"data.decode={decode}", f"launch.device={device}"])
    dev = torch.device(device)
    streams = build_data(rcp, resolve(rcp, 1, dev), 0)
    batches = DevicePrefetcher(streams.train, dev, streams.spec.mean, streams.spec.std, True)
    epoch = [0]
    busy: list[float] = []

    def one_epoch() -> float:
        streams.train.set_epoch(epoch[0])
        epoch[0] += 1
        cpu0, begin = cpu_seconds(), time.perf_counter()
        n = sum(len(x) for x, _ in batches)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - begin
        cpu1 = cpu_seconds()
        if cpu0 is not None and cpu1 is not None:
            busy.append((cpu1 - cpu0) / wall)
        return n / wall
    return one_epoch, busy


def bench_f(device: str = "cpu", workers: int = 2, reps: int = 5) -> list[dict[str, Any]]:
    from benchmarks.gpu_check import make_jpegs

    boxes = "gpu" if device == "cuda" else "boxes"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root, CLASSES, PER_CLASS, STORED)
        n = CLASSES * PER_CLASS  # train images (make_jpegs writes a val split too)
        (ours, ours_busy), (base, base_busy) = (loader(root, boxes, device, workers),
                                                loader(root, "cpu", device, workers))
        ours(), base()  # warm-up: worker start, page cache, the decoder
        ours_busy.clear(), base_busy.clear()
        a, b, xs, ys = alternate(ours, base, reps)
    cores_a, cores_b = _median(ours_busy), _median(base_busy)
    note = (f"{hardware(device)}; {n} JPEGs {STORED[0]}x{STORED[1]} -> RandomResizedCrop "
            f"{SIZE} + flip, batch {BATCH}, {workers} workers each, {reps} alternating epochs; "
            f"{boxes} {[round(x) for x in xs]}, cpu {[round(y) for y in ys]}; CPU cores busy "
            f"{boxes} {cores_a:.2f}, cpu {cores_b:.2f}")
    rows = [result(f"f. box path ({device})", f"decode={boxes}", a, "decode=cpu", b, "images/s",
                   "reported" if device == "cpu" else ">= 1", device == "cpu" or a >= b,
                   note=note)]
    if cores_a > 0 and cores_b > 0:
        per_a, per_b = a / cores_a, b / cores_b
        rows.append(result(f"f. box path ({device}) per busy core", f"decode={boxes}", per_a,
                           "decode=cpu", per_b, "images/s per CPU core busy", "reported", True))
    return rows


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else 0.0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="box_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"box path vs cpu decode on {hardware(args.device)}, {load()}", flush=True)
    bench_f(args.device, args.workers, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
