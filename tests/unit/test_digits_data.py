"""ffdist.data.digits: the digits read without importing scikit-learn are sklearn's, and
the split is exactly sklearn's train_test_split(..., stratify=y, random_state=0)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ffdist.data import digits
from ffdist.errors import DataError
from tests import helpers


def test_images_and_labels_match_load_digits() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = digits.load()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert np.array_equal(images, (d.images * (255.0 / 16.0)).round().astype(np.uint8))
    assert np.array_equal(labels, d.target)


@pytest.mark.parametrize("fraction", [0.2, 0.1, 0.25, 0.333, 0.5])
def test_split_is_sklearns_stratified_split(fraction: float) -> None:
    from sklearn.model_selection import train_test_split

    _, labels = digits.load()
    tr, va = train_test_split(range(len(labels)), test_size=fraction, stratify=labels,
                              random_state=0)
    assert digits.split(labels, fraction) == (sorted(tr), sorted(va))


@pytest.mark.parametrize("seed", range(4))
def test_split_breaks_ties_like_sklearn(seed: int) -> None:
    """Equal class sizes make equal remainders: the tie-break draws must match too."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(7), 13)  # 7 classes x 13, in a shuffled order
    labels = labels[rng.permutation(len(labels))]
    for fraction in (0.2, 0.3):
        tr, va = train_test_split(range(len(labels)), test_size=fraction, stratify=labels,
                                  random_state=0)
        assert digits.split(labels, fraction) == (sorted(tr), sorted(va))


def test_split_refuses_a_class_left_empty() -> None:
    with pytest.raises(DataError, match="val_fraction"):
        digits.split(np.array([0, 0, 1, 1, 2, 2]), 0.2)


def test_building_digits_imports_neither_sklearn_nor_torchvision() -> None:
    """Every training process starts by building its data: scikit-learn and torchvision
    (which brings torch._dynamo and torchvision.ops) would add about a second to each
    start, and digits needs neither (no auto-augment policy: no torchvision transform)."""
    code = ("import sys; from ffdist import recipe_load; from ffdist.data import sources; "
            "r = recipe_load.load('recipes/digits.yaml', []); "
            "s = sources.get('digits').datasets(r.data, 0, 10, 1); "
            "print(len(s.train), len(s.val), 'sklearn' in sys.modules, "
            "'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=helpers.env(),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1437", "360", "False", "False"]
