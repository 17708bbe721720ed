"""Tar shards vs image files: images/s per loader core at 224-px training transforms.

The same generated ImageNet-sized JPEGs (500x375, quality 90: crops of scikit-learn's two
sample photos, flipped and shifted so that no two files are alike) are read four ways, each
by ffdist's own train stream (decode with torchvision.io, RandomResizedCrop 224 + flip on
uint8, batches of 32), one loader process (data.num_workers=0, one torch thread: the
figure is per core):
  files         data.name=imagefolder over the JPEG folder (the baseline)
  shards        data.name=shards over `ffdist shard` of that folder (the same bytes)
  pre-resized   `ffdist shard --max-size 256`: the longest side capped, re-encoded JPEG
  http          the shards of `shards`, served by `python -m http.server` on 127.0.0.1
                (another process, started and stopped here), streamed
Epochs alternate between the inputs (round robin, the order rotating each round) and the
median of each is reported, with its ratio to `files` measured in the same run, the
storage of each, and the machine.

    python -m benchmarks.shards_throughput                 # 2,000 images, 3 rounds
    python -m benchmarks.shards_throughput --images 200 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import REPO, cpu, load

CLASSES, WIDTH, HEIGHT, SIZE, BATCH = 10, 500, 375, 224, 32


def write_jpegs(root: Path, n: int) -> None:
    """n JPEGs of WIDTH x HEIGHT in root/train/<class>/ (and a few in val/)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 photos
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", CLASSES)):
        for i in range(count):
            folder = root / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            photo = photos[i % len(photos)]
            h, w = rng.integers(280, 427), rng.integers(380, 640)
            y, x = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
            image = Image.fromarray(photo[y:y + h, x:x + w]).resize((WIDTH, HEIGHT))
            if i % 2:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.save(folder / f"{i:06d}.jpg", quality=90)


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def epoch_of(overrides: list[str]) -> Callable[[], float]:
    """One epoch of the train stream a recipe with `overrides` builds -> images/s."""
    import torch

    from ffdist import recipe_load
    from ffdist.assemble import build_data, resolve

    rcp = recipe_load.load(str(REPO / "recipes" / "digits.yaml"), [
        f"data.image_size={SIZE}", f"data.batch_size={BATCH}", "data.num_workers=0",
        "model.in_channels=3", f"model.num_classes={CLASSES}", *overrides])
    streams = build_data(rcp, resolve(rcp, 1, torch.device("cpu")), 0)
    epoch = [0]

    def run() -> float:
        streams.train.set_epoch(epoch[0])
        epoch[0] += 1
        begin = time.perf_counter()
        n = sum(len(x) for x, _ in streams.train)
        return n / (time.perf_counter() - begin)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):  # until it answers
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return server, url
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("python -m http.server did not start")


def shard(source: Path, out: Path, *options: str) -> float:
    from ffdist.cli import main as cli

    begin = time.perf_counter()
    assert cli(["shard", str(source), "--out", str(out), "--shard-size", "32MB", *options]) == 0
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-size", type=int, default=256, help="pre-resize cap (default 256)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"shards throughput on {cpu()}; {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root / "jpegs", args.images)
        jpegs = root / "jpegs"
        t_plain = shard(jpegs, root / "shards", "--workers", "1")
        t_small = shard(jpegs, root / "small", "--workers", "1", "--max-size",
                        str(args.max_size))
        server, url = serve(root / "shards")
        try:
            names = sorted(p.name for p in (root / "shards").glob("train-*.tar"))
            sides = {
                "files": epoch_of(["data.name=imagefolder", f"data.root={jpegs}"]),
                "shards": epoch_of(["data.name=shards", f"data.train_shards={root / 'shards'}"]),
                f"pre-resized {args.max_size}": epoch_of([
                    "data.name=shards", f"data.train_shards={root / 'small'}"]),
                "http": epoch_of(["data.name=shards", "data.train_shards=" + "::".join(
                    f"{url}/{n}" for n in names), f"data.val_shards={root / 'shards'}"]),
            }
            for run in sides.values():  # warm-up: page cache, first decodes
                run()
            rates: dict[str, list[float]] = {k: [] for k in sides}
            for r in range(args.rounds):
                keys = list(sides)
                for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                    rates[k].append(sides[k]())
        finally:
            server.kill()
            server.wait()
        storage = {"files": folder_bytes(jpegs / "train", "*.jpg"),
                   "shards": folder_bytes(root / "shards", "train-*.tar"),
                   f"pre-resized {args.max_size}": folder_bytes(root / "small", "train-*.tar")}
    storage["http"] = storage["shards"]
    base = statistics.median(rates["files"])
    print(f"{args.images} JPEGs {WIDTH}x{HEIGHT} q90 -> RandomResizedCrop {SIZE} + flip, batch "
          f"{BATCH}, 1 loader core, {args.rounds} rounds (median; all: "
          f"{ {k: [round(x) for x in v] for k, v in rates.items()} })")
    for k, v in rates.items():
        m = statistics.median(v)
        print(f"  {k:<18} {m:7.1f} images/s per core   x{m / base:5.2f} vs files   storage "
              f"{storage[k] / 1e6:7.1f} MB (x{storage[k] / storage['files']:.2f})")
    print(f"  writing: shards {t_plain:.1f} s, pre-resized {t_small:.1f} s (1 writer process); "
          f"{load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
