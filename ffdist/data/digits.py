"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), read without importing
scikit-learn, and ffdist's fixed stratified split of them.

Why not `sklearn.datasets.load_digits` + `train_test_split`: importing scikit-learn
pulls in SciPy, about 1 s of a digits run that trains in a few seconds. The images are a
CSV file inside the scikit-learn package (found without running its `__init__`), and the
split below reproduces `train_test_split(range(n), test_size=f, stratify=labels,
random_state=0)` exactly (StratifiedShuffleSplit; a test compares the two), so the val set
is the one every sklearn tutorial uses, and it stays the same if a later scikit-learn
changes its algorithm.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

from ffdist.errors import DataError


def csv_path() -> Path:
    spec = importlib.util.find_spec("sklearn")  # locates the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=digits needs scikit-learn (its digits ship inside it); "
                        "pip install scikit-learn.")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 on 0..255, labels int64 N), as load_digits' images * 255/16."""
    with gzip.open(csv_path(), "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    images = (data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    return images, data[:, -1].astype(np.int64)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
                      ) -> np.ndarray:
    """Samples per class for `n_draws` draws: the floor of each class's share, then one more
    for the largest remainders, ties broken at random (sklearn.utils.extmath)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def split(labels: np.ndarray, val_fraction: float, random_state: int = 0
          ) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices: a stratified split with ceil(val_fraction * n) images in
    val, the same as scikit-learn's StratifiedShuffleSplit(1, val_fraction, random_state)."""
    n = len(labels)
    n_val = math.ceil(val_fraction * n)
    n_train = n - n_val
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_val) < len(counts):
        raise DataError(f"data.val_fraction={val_fraction} leaves a class without images in "
                        "train or val; use a fraction between 0.05 and 0.5.")
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(random_state)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_val, rng)
    train: list[int] = []
    val: list[int] = []
    for i, members in enumerate(by_class):
        shuffled = members.take(rng.permutation(counts[i]), mode="clip")
        train += shuffled[:n_i[i]].tolist()
        val += shuffled[n_i[i]:n_i[i] + t_i[i]].tolist()
    return sorted(train), sorted(val)
