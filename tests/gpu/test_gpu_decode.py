"""data.decode=gpu on CUDA: the device's decode + batched crop agrees with the same path
decoded on the CPU (data.decode=boxes) within a stated tolerance; the steady-state steps fed
by it make no host sync of torch's; memory does not grow over 1,000 steps. Marked `gpu`
("no GPU" skips them elsewhere); written after the PyTorch, torchvision and TorchCodec
documentation on a machine without a GPU: benchmarks/gpu_check.py runs them where there is
one.

Tolerance of the agreement: nvjpeg and libjpeg-turbo compute the inverse DCT and the chroma
upsampling differently (libjpeg-turbo's "fancy" upsampling), so the decoded pixels differ by
a few grey levels at colour edges; the crop averages them. Stated: mean absolute difference
<= 1.0 grey level (of 255) and 99th percentile <= 8 over natural photographs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import RECIPES

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _photos(root: Path, classes: int = 2, per_class: int = 32, split_val: int = 4) -> Path:
    """An imagefolder of JPEG crops (quality 90, 4:2:0) of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos, rng = load_sample_images().images, np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", split_val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                photo = photos[(c + i) % 2]
                h, w = int(rng.integers(120, 400)), int(rng.integers(120, 600))
                y, x = int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w))
                Image.fromarray(photo[y:y + h, x:x + w]).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_gpu_decode_agrees_with_the_cpu_decode_of_the_same_boxes(tmp_path: Path,
                                                                 split: str) -> None:
    from ffdist.data import boxes as B
    from ffdist.data.datasets import FileImages, collate
    from ffdist.data.gpu_decode import BoxDecoder

    root = _photos(tmp_path)
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.jpg"))][:32]
    sampler = B.TrainBoxes(96) if split == "train" else B.EvalBoxes(96)
    ds = FileImages(samples, sampler, 3, seed=5, split=split)
    keys = [(1, i) for i in range(len(samples))] if split == "train" else list(range(32))
    batch = collate([ds[k] for k in keys])
    assert len(batch.index) == len(samples)  # every one a baseline JPEG: the device's
    on_cpu, _ = BoxDecoder(torch.device("cpu"))(batch)
    gpu = BoxDecoder(CUDA)
    on_gpu, labels = gpu(batch.pin_memory())
    assert "nvjpeg" in gpu.decoder.name and labels.device.type == "cuda"
    diff = (on_gpu.cpu() - on_cpu).abs()
    assert diff.mean() <= 1.0 and torch.quantile(diff.flatten()[::7], 0.99) <= 8, \
        (float(diff.mean()), float(diff.max()))


def _trainer(tmp_path: Path, root: Path, *overrides: str):
    from ffdist import bench, dist, recipe_load

    rcp = recipe_load.load(RECIPES / "digits.yaml", [
        "launch.device=cuda", "data.name=imagefolder", f"data.root={root}",
        "model.in_channels=3", "model.num_classes=2", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=2", "data.decode=gpu", "precision=bf16",
        "model.channels_last=true", "log.every_steps=100000", f"output_dir={tmp_path / 'run'}",
        *overrides])
    return bench.setup(rcp, dist.init(rcp.launch))


def test_steady_state_steps_on_gpu_decoded_batches_never_sync_the_host(tmp_path: Path) -> None:
    """set_sync_debug_mode("error") raises at every synchronisation and blocking copy made
    through torch: none in ffdist's input path (pinned batches, host-known boxes and sizes,
    flips by torch.where) nor in the step. (TorchCodec's own cudaStreamSynchronize of the
    prefetcher's side stream is made by its C++ code, not through torch: docs/performance.md.)"""
    from ffdist.bench_timing import epochs

    trainer = _trainer(tmp_path, _photos(tmp_path / "jpegs"))
    batches = epochs(trainer)
    for i in range(4):
        trainer.train_step(batches, trainer.lr_at(i))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(10):
            trainer.train_step(batches, trainer.lr_at(4 + i))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.settle_flags()
    counts = trainer.train_batches.box_decoder.counts
    assert counts["device"] >= 14 * 8 and counts["host"] == 0


def test_memory_does_not_grow_over_a_thousand_steps(tmp_path: Path) -> None:
    import psutil

    from ffdist.bench_timing import epochs

    trainer = _trainer(tmp_path, _photos(tmp_path / "jpegs"))
    batches = epochs(trainer)
    steps = iter(itertools.count())

    def run(n: int) -> None:
        for _ in range(n):
            i = next(steps)
            trainer.train_step(batches, trainer.lr_at(i))
            trainer.progress.step += 1
        trainer.settle_flags()
        torch.cuda.synchronize()

    run(100)  # caches filled: cuDNN, the allocator's blocks, pinned host blocks
    allocated, rss = torch.cuda.memory_allocated(), psutil.Process().memory_info().rss
    torch.cuda.reset_peak_memory_stats()
    run(100)
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(800)
    assert torch.cuda.memory_allocated() - allocated <= 1 << 20
    assert torch.cuda.max_memory_allocated() <= peak + (4 << 20)
    assert psutil.Process().memory_info().rss - rss <= 256 << 20
    assert trainer.train_batches.box_decoder.counts["device"] >= 1000 * 8
