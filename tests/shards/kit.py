"""Shared pieces of the tar-shard tests: shards whose images carry their own sample id,
a loopback HTTP server, the id probe's records, and one small training schedule.

Sample i of a split is a 16x16 image of one colour: red + 256 * green = i, blue = 40 + 50 *
label (label = i % 4, so that a small CNN learns it). A constant image stays constant under
resized crops, flips and resizes, so the id can be read back from any augmented batch
(`ids_of`): tests count which samples a run saw without anything in ffdist's path.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import CPU

CLASSES = 4
SIZE = 16
# Shard sizes: 7 train shards (a count that 1, 2 and 3 ranks, and 2 workers, do not divide),
# of unequal sizes; 250 samples, batch 24 -> 10 steps an epoch, 10 samples left out of each.
TRAIN_COUNTS = (37, 41, 29, 45, 33, 39, 26)
VAL_COUNTS = (17, 13, 19, 12)  # 61 val samples in 4 shards: 3 ranks get 20, 20, 21
BATCH = 24


def png(i: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (i % 256, i // 256, 40 + 50 * (i % CLASSES))).save(out, "PNG")
    return out.getvalue()


def write_tar(path: Path, first: int, count: int, label_field: str = "cls") -> None:
    """Samples first..first+count-1 as key.png + key.cls (or key.json {"label": ...})."""
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            label = str(i % CLASSES) if label_field == "cls" else json.dumps({"label": i % CLASSES})
            for name, data in ((f"s{i:06d}.png", png(i)), (f"s{i:06d}.{label_field}",
                                                            label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_split(folder: Path, split: str, counts: tuple[int, ...],
                label_field: str = "cls") -> list[str]:
    first, names = 0, []
    for n, count in enumerate(counts):
        names.append(f"{split}-{n:06d}.tar")
        write_tar(folder / names[-1], first, count, label_field)
        first += count
    return names


def make_shards(folder: Path, indexed: bool = True, label_field: str = "cls") -> Path:
    """The train and val shards in `folder`, with an index.json (ffdist's own code scans
    them to make it) unless `indexed` is false (foreign shards)."""
    from ffdist.data import shard_index

    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS)):
        names = write_split(folder, split, counts, label_field)
        splits[split] = [shard_index.scan_shard(str(folder / n)) for n in names]
    if indexed:
        shard_index.write(folder / shard_index.INDEX, splits, [f"c{c}" for c in range(CLASSES)])
    return folder


def pattern(split: str) -> str:
    counts = TRAIN_COUNTS if split == "train" else VAL_COUNTS
    return f"{split}-{{000000..{len(counts) - 1:06d}}}.tar"


def ids_of(images) -> list[int]:
    """The sample ids of a uint8 N x 3 x H x W batch (see the module docstring)."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """`folder` served on 127.0.0.1 (a free port) by the standard library's http.server in a
    thread; yields the base URL; stopped on exit."""
    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# -- one small training schedule over the id shards -----------------------------------------

def args(train: str, val: str, out: Path, *extra: str, name: str = "shards") -> list[str]:
    """Overrides of recipes/digits.yaml: the shards, a small CNN on 16x16 RGB, 2 epochs of
    10 steps, checkpoints every 4 steps (mid-epoch: 4, 8, 12 (epoch 1 step 2), ...), one loss
    per step, fp32 CPU ranks (bit-exact reruns)."""
    return [CPU, "precision=fp32", f"data.name={name}", f"data.train_shards={train}",
            f"data.val_shards={val}",
            f"model.num_classes={CLASSES}", "model.in_channels=3", f"data.image_size={SIZE}",
            f"data.batch_size={BATCH}", "data.eval_batch_size=8", "data.shuffle_buffer=40",
            "schedule.epochs=2", "checkpoint.every_steps=4", "checkpoint.keep_last=10",
            "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
            f"output_dir={out}", *extra]


def records(probe: Path) -> list[dict]:
    """Every micro-batch the probe recorded (tests/shards/probe.py), of every rank."""
    return [json.loads(line) for f in sorted(probe.glob("rank*.jsonl"))
            for line in f.read_text().splitlines()]


def seen(recs: list[dict], epoch: int) -> dict[int, int]:
    """sample id -> how many times the records of `epoch` hold it."""
    counts: dict[int, int] = {}
    for r in recs:
        if r["epoch"] == epoch:
            for i in r["ids"]:
                counts[i] = counts.get(i, 0) + 1
    return counts
