"""What the user-error suite's files share: the digits recipe, commands to refuse, and small
image folders to break. The contract itself is tests.helpers.refused."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


# ------------------------------------------------------------------ decompression bombs

def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 1-bit palette PNG of width x height black pixels: about 109 KB on disk for
    30000x30000, 2.7 GB as the RGB a decoder makes of it. Written by hand, row by row, so
    that making it takes no memory (Pillow would allocate the whole image first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then width bits of palette index 0
    pack = zlib.compressobj(9)
    idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # 1 bit, palette
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def bomb_jpeg(path: Path, side: int = 65000) -> Path:
    """A real 8x8 baseline JPEG whose frame header (SOF0) claims side x side pixels: a few
    hundred bytes that would make a decoder allocate side^2 x 3 bytes (12.7 GB for 65000)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 30)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # FFC0, length, precision, H, W
    path.write_bytes(bytes(data))
    return path
