"""b. ffdist's input pipeline vs the tutorial one on the same JPEG folder and worker count.

ffdist: torchvision.io decode to uint8, transforms v2 on uint8 (RandomResizedCrop + flip),
uint8 batches through the DataLoader (persistent workers), normalization + channels_last
once per batch in DevicePrefetcher. Tutorial: ImageFolder + PIL + RandomResizedCrop + flip
+ ToTensor + Normalize per sample. Both end with a normalized float batch; an epoch is
timed from creating the iterator to the last batch, after one warm-up epoch each. Both
deliver NCHW float32 batches (model.channels_last=false for ffdist here).

    python -m benchmarks.pipeline
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, alternate, result

CLASSES, PER_CLASS, SOURCE, SIZE, BATCH, WORKERS = 10, 32, 320, 224, 32, 2


def write_jpegs(root: Path) -> int:
    """Crops of scikit-learn's two sample photos (427x640), SOURCE px square, as JPEGs in
    train/<class>/ and val/<class>/ (the imagefolder layout)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    n = 0
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                photo = photos[(c + i) % len(photos)]
                y = rng.integers(0, photo.shape[0] - SOURCE)
                x = rng.integers(0, photo.shape[1] - SOURCE)
                Image.fromarray(photo[y:y + SOURCE, x:x + SOURCE]).save(
                    folder / f"{i}.jpg", quality=90)
                n += split == "train"
    return n


def ffdist_loader(root: Path):  # noqa: ANN201 - an iterable of batches
    import torch

    from ffdist import recipe_load
    from ffdist.assemble import build_data, resolve
    from ffdist.data import DevicePrefetcher

    rcp = recipe_load.load(str(REPO / "recipes" / "digits.yaml"), [
        "data.name=imagefolder", f"data.root={root}", f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}", "model.in_channels=3",
        # NCHW like the tutorial's batches: both sides deliver the same tensor (with
        # channels_last the layout change moves from the model's first conv to here).
        "model.channels_last=false"])
    cpu = torch.device("cpu")
    streams = build_data(rcp, resolve(rcp, 1, cpu), 0)
    spec = streams.spec
    batches = DevicePrefetcher(streams.train, torch.device("cpu"), spec.mean, spec.std,
                               rcp.model.channels_last)
    epoch = [0]

    def one_epoch() -> int:
        streams.train.set_epoch(epoch[0])
        epoch[0] += 1
        return sum(len(x) for x, _ in batches)
    return one_epoch


def tutorial_loader(root: Path):  # noqa: ANN201
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                         num_workers=WORKERS, drop_last=True)

    def one_epoch() -> int:
        return sum(len(x) for x, _ in loader)
    return one_epoch


def timed(epoch_fn):  # noqa: ANN001, ANN201
    def run() -> float:
        begin = time.perf_counter()
        n = epoch_fn()
        return n / (time.perf_counter() - begin)
    return run


def bench_b(reps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = write_jpegs(root)
        ours, tut = ffdist_loader(root), tutorial_loader(root)
        ours(), tut()  # warm-up: worker start, page cache
        a, b, xs, ys = alternate(timed(ours), timed(tut), reps)
    return result("b. input pipeline", "ffdist (uint8, torchvision.io, v2)", a,
                  "tutorial (ImageFolder+PIL+ToTensor+Normalize)", b, "images/s", ">= 1.5",
                  a / b >= 1.5,
                  note=f"{n} JPEGs {SOURCE}x{SOURCE} -> RandomResizedCrop {SIZE} + flip, batch "
                       f"{BATCH}, {WORKERS} workers each, {reps} alternating epochs; ffdist "
                       f"{[round(x) for x in xs]}, tutorial {[round(y) for y in ys]}")


if __name__ == "__main__":
    bench_b()
