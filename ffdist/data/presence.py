"""Is a recipe's dataset there at all? File-system checks only (no torch, no dataset built),
run by `python -m ffdist.train` right after the recipe is read: before the process group
and the run directory, so that absent data is one sentence, printed once, and leaves no
empty run directory behind. What the data holds (classes, images, labels) is checked
later, when ffdist.data.datasets builds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ffdist.errors import DataError
from ffdist.recipe import DataConfig

SMOKE = "or smoke-test the recipe without it: data.name=synthetic"

# The files torchvision's dataset classes look for (torchvision/datasets/mnist.py, cifar.py):
# the folder under data.root and the file names in it.
_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")
TORCHVISION_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("MNIST/raw", _IDX),
    "fashion_mnist": ("FashionMNIST/raw", _IDX),
    "cifar10": ("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)),
                                        "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}


class DataMissing(DataError):
    """The dataset a recipe names is not on disk. Every rank of a node looks at the same
    files, so the first rank of each node prints it (nodes may hold their own copies)."""

    same_on_all_ranks = True
    per_node = True


def torchvision_root(cfg: DataConfig) -> str:
    """Where mnist/fashion_mnist/cifar live (data.root, default data/<name>)."""
    return cfg.root or f"data/{cfg.name}"


def _where(path: str | Path) -> str:
    """The path as the recipe gives it, and absolute when it is relative (to the folder the
    command ran in, which is what it is relative to)."""
    return str(path) if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"


def check_present(cfg: DataConfig, recipe_path: str | None = None) -> None:
    """Raise DataMissing when the files data.name needs are absent; nothing else."""
    of = f"{recipe_path}: " if recipe_path else ""
    if cfg.name in TORCHVISION_FILES and not cfg.download:
        _check_torchvision(cfg, of)
    elif cfg.name == "imagefolder":
        _check_imagefolder(cfg, of)
    elif cfg.name == "filelist":
        _check_lists(cfg, of)


def _check_torchvision(cfg: DataConfig, of: str) -> None:
    root = torchvision_root(cfg)
    sub, files = TORCHVISION_FILES[cfg.name]
    folder = Path(root) / sub
    absent = [f for f in files if not (folder / f).is_file()]
    if not absent:
        return
    raise DataMissing(f"{of}no {cfg.name} files in data.root={_where(root)} (looked for "
                      f"{Path(sub) / absent[0]} there); add data.download=true to let torchvision "
                      "download them (needs a network), or set data.root to the folder that "
                      f"holds them, {SMOKE}.")


def _check_imagefolder(cfg: DataConfig, of: str) -> None:
    layout = ("an imagefolder root holds train/ and val/, each with one sub-folder of images "
              "per class (the ImageNet layout: train/n01440764/*.JPEG, val/n01440764/*.JPEG)")
    if not cfg.root:
        raise DataMissing(f"{of}data.name=imagefolder needs data.root, the folder of the "
                          f"dataset: {layout}; set data.root=PATH, {SMOKE}.")
    root = Path(cfg.root)
    absent = [s for s in ("train", "val") if not (root / s).is_dir()]
    if not absent:
        return
    what = "does not exist" if not root.is_dir() else f"has no {' or '.join(absent)}/ folder"
    raise DataMissing(f"{of}data.root={_where(cfg.root)} {what}; {layout}: put or link the "
                      f"dataset there or set data.root=PATH, {SMOKE}.")


def _check_lists(cfg: DataConfig, of: str) -> None:
    for key in ("train_list", "val_list"):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            raise DataMissing(f"{of}data.{key}={_where(value)} does not exist; give a text file "
                              f"of 'relative/path{cfg.list_sep}label' lines (images under data.root), "
                              f"{SMOKE}.")
