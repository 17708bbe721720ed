"""What an image file claims to be, read from its header before any decoder runs, and the
pixel limit every decode path enforces (data.max_image_pixels, `ffdist predict
--max-image-pixels`).

A decoder allocates what the header says: a 109 KB palette PNG that claims 30000x30000
pixels takes 2.7 GB as RGB (4.8 GB at peak) and 20 s before anything can object, and a
JPEG header can claim 65000x65000 in a few hundred bytes. `read_header` parses only the
header (Pillow's format plugins, without their pixel data) and `check` refuses more pixels
than the limit; both take the file's bytes or its path and import no torch, so the
training loaders, eval, predict and a GPU-decode pipeline all call the same function.

The formats ffdist reads, and who decodes them (ffdist.data.datasets.decode): JPEG and WebP
by torchvision.io (libjpeg-turbo, libwebp); PNG (torchvision 0.29's PNG decoder dies of
SIGSEGV on corrupt image data), GIF (its first frame only: torchvision decodes every frame
of an animated GIF, each at full size), BMP and TIFF (its first page) by Pillow. Other
files are not images to ffdist.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

TORCHVISION_FORMATS = ("JPEG", "MPO", "WEBP")
"""Pillow's names of the formats torchvision.io decodes (MPO: a camera JPEG with a preview)."""
PIL_FORMATS = ("PNG", "GIF", "BMP", "TIFF")
"""Decoded by Pillow: the first frame or page only."""
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
"""File names `ffdist predict` looks for in a folder (lower-cased)."""
KINDS = "JPEG, PNG, WebP, GIF, BMP or TIFF"


class NotAnImage(ValueError):
    """No header of a format ffdist reads: not an image, or a truncated or corrupt one."""


class TooManyPixels(ValueError):
    """The header claims more pixels than the limit. `describe(key)` words it for the
    command's own key (data.max_image_pixels, --max-image-pixels)."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} pixels, more than the limit of {limit:,}")
        self.width, self.height, self.limit = width, height, limit

    def describe(self, key: str) -> str:
        return f"{self.width}x{self.height} = {self.width * self.height:,} pixels, more than " \
               f"{key}={self.limit}"


@dataclass(frozen=True)
class Header:
    format: str  # Pillow's name: JPEG, PNG, WEBP, GIF, BMP, TIFF (MPO: a JPEG)
    width: int
    height: int
    host_only: str = field(default="", compare=False)
    """Why a GPU JPEG decoder must not take this file ('' when it may: a baseline JPEG of
    three YCbCr components without an EXIF rotation, which nvjpeg decodes as libjpeg-turbo
    does): not a JPEG, progressive, grey, CMYK/Adobe RGB, or EXIF-rotated (TorchCodec
    applies the rotation, ffdist's CPU decode does not: the crop boxes would not match)."""

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def by_torchvision(self) -> bool:
        return self.format in TORCHVISION_FORMATS


def read_header(data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Header:
    """The format and size a file's header declares (NotAnImage when it has none ffdist
    reads). Reads the header only: no pixel is decoded, whatever the size claimed."""
    with _opened(data) as fp:
        image = open_lazy(fp)
        return Header(image.format or "", *image.size, host_only=_host_only(image))


def _host_only(image: Any) -> str:
    """Header.host_only of an opened (not decoded) Pillow image."""
    if image.format != "JPEG":
        return f"{'a camera JPEG (MPO)' if image.format == 'MPO' else image.format}"
    info = image.info
    if info.get("progressive") or info.get("progression"):
        return "a progressive JPEG"
    if image.mode != "RGB" or info.get("adobe_transform") == 0:
        return {"L": "a grey JPEG", "CMYK": "a CMYK JPEG"}.get(image.mode, "an RGB-coded JPEG")
    if "exif" in info and image.getexif().get(0x0112, 1) not in (0, 1):  # Orientation
        return "an EXIF-rotated JPEG"
    return ""


def check(data: bytes | bytearray | memoryview | str | os.PathLike[str],
          max_pixels: int) -> Header:
    """`read_header`, refusing more than `max_pixels` (TooManyPixels) before any decoder
    allocates them."""
    header = read_header(data)
    if header.pixels > max_pixels:
        raise TooManyPixels(header.width, header.height, max_pixels)
    return header


def open_lazy(fp: BinaryIO) -> Any:
    """A Pillow image of `fp` with its header parsed and nothing decoded, of one of the
    formats ffdist reads. Pillow's `Image.open` is not used: it warns, then raises, at its
    own global pixel threshold (Image.MAX_IMAGE_PIXELS), which would override ours."""
    from PIL import (  # noqa: F401 (importing a plugin registers its format in Image.OPEN)
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    prefix = fp.read(16)
    for name in (*TORCHVISION_FORMATS, *PIL_FORMATS):
        if name not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[name]
        said = accept(prefix) if accept is not None else True
        if isinstance(said, str) or not said:  # a str: Pillow lacks that codec here
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except Exception:  # a stranger's header: any parse failure means unreadable
            kind = "JPEG" if name == "MPO" else name
            raise NotAnImage(f"a truncated or corrupt {kind} file (its header cannot be "
                             "read)") from None
    raise NotAnImage(f"not a {KINDS} image")


class _opened:
    """A binary file object over the bytes, or the file at the path; closed on exit."""

    def __init__(self, data: bytes | bytearray | memoryview | str | os.PathLike[str]):
        self.data = data

    def __enter__(self) -> BinaryIO:
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            self.fp: BinaryIO = io.BytesIO(self.data)
        else:
            self.fp = open(Path(self.data), "rb")  # noqa: SIM115 (closed in __exit__)
        return self.fp

    def __exit__(self, *exc: object) -> None:
        self.fp.close()
