"""What the user-error suite's files share: the digits recipe, commands to refuse, and small
image folders to break. The contract itself is tests.helpers.refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import RECIPES, Action, in_process

DIGITS = str(RECIPES / "digits.yaml")
R50 = str(RECIPES / "resnet50.yaml")

# A 2-class imagefolder of 8x8 images (imagefolder below), trained for one short epoch.
FOLDER = ("data.name=imagefolder", "model.num_classes=2", "model.in_channels=3",
          "data.image_size=8", "data.batch_size=8", "schedule.epochs=1", "log.tensorboard=false",
          "log.progress=false", "precision=fp32")


def train_cmd(recipe: str, *overrides: str) -> list[str]:
    """`python -m ffdist.train RECIPE OVERRIDES...`, as a real process."""
    return [sys.executable, "-m", "ffdist.train", recipe, *overrides]


def train_main(capfd: pytest.CaptureFixture, *args: str) -> Action:
    """ffdist.train.main on the digits recipe, in this process."""
    from ffdist import train

    return in_process(capfd, train.main, DIGITS, *args)


def imagefolder(root: Path, per_class: int = 12) -> Path:
    """A 2-class imagefolder of 8x8 JPEGs made from the digits data."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, n in (("train", per_class), ("val", 4)):
        for label in (0, 1):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            images = d.images[d.target == label][:n] if split == "train" else \
                d.images[d.target == label][-n:]
            for i, img in enumerate(images):
                arr = (img * 255 / 16).astype(np.uint8)
                Image.fromarray(arr).convert("RGB").save(folder / f"{i}.jpg", quality=95)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])
