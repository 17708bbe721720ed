"""ffdist.data.decode_limits and the decode path built on it: an image's size is read from
its header, from bytes or a path, and more pixels than the limit are refused before any
decoder runs (in milliseconds, whatever the header claims); Pillow's own global threshold
does not override the recipe's limit; files that are not images ffdist reads, or whose
header is broken, are refused in words. The commands' side (training, eval, predict, with
peak memory measured in real processes): tests/fault/user_errors/test_bombs.py.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ffdist.data import decode_limits
from ffdist.data.datasets import decode
from ffdist.recipe import MAX_IMAGE_PIXELS
from tests.fault.user_errors.common import bomb_jpeg, bomb_png
from tests.helpers import env


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    box = tmp_path_factory.mktemp("bombs")
    return {"png": bomb_png(box / "bomb.png"), "jpeg": bomb_jpeg(box / "bomb.jpg")}


def encoded(fmt: str, size: tuple[int, int] = (5, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_header_gives_format_and_size_from_bytes_and_from_a_path(fmt, tmp_path):
    data = encoded(fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, memoryview(data), path, str(path)):
        assert decode_limits.read_header(source) == decode_limits.Header(fmt, 5, 7)
    assert decode_limits.check(data, 35).pixels == 35
    with pytest.raises(decode_limits.TooManyPixels, match="5x7 pixels, more than the limit of 34"):
        decode_limits.check(data, 34)


@pytest.mark.parametrize("kind,side", [("png", 30000), ("jpeg", 65000)])
def test_a_bomb_is_refused_from_its_header_in_milliseconds(bombs, kind, side, tmp_path):
    (tmp_path / "ok.png").write_bytes(encoded("PNG"))
    decode(str(tmp_path / "ok.png"))  # torchvision imported (seconds on a busy machine)
    started = time.perf_counter()
    with pytest.raises(decode_limits.TooManyPixels) as e:
        decode_limits.check(bombs[kind], MAX_IMAGE_PIXELS)
    with pytest.raises(decode_limits.TooManyPixels):
        decode(str(bombs[kind]), 3, MAX_IMAGE_PIXELS)  # the loaders' decode: the same refusal
    assert time.perf_counter() - started < 5.0
    assert (e.value.width, e.value.height) == (side, side)
    assert e.value.describe("data.max_image_pixels") == (
        f"{side}x{side} = {side * side:,} pixels, more than data.max_image_pixels=89478485")


def test_the_limit_is_ours_not_pillows(tmp_path):
    """Image.open raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS whatever
    the recipe allows: the header is read without it, and the recipe's limit decides."""
    big = bomb_png(tmp_path / "big.png", 20000, 10000)  # 200 M pixels > Pillow's 179 M
    with pytest.raises(Image.DecompressionBombError):
        Image.open(big)
    assert decode_limits.check(big, 200_000_000).pixels == 200_000_000
    with pytest.raises(decode_limits.TooManyPixels):
        decode_limits.check(big, 199_999_999)


@pytest.mark.parametrize("data,reason", [
    (b"hello, not an image", "not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
    (b"", "not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
    (b"\xff\xd8\xff\xe0" + bytes(20), "a truncated or corrupt JPEG file (its header cannot be read)"),
    (encoded("PNG")[:20], "a truncated or corrupt PNG file (its header cannot be read)"),
], ids=["text", "empty", "jpeg-header-cut", "png-header-cut"])
def test_what_is_not_an_image_is_said_in_words(data, reason):
    with pytest.raises(decode_limits.NotAnImage) as e:
        decode_limits.read_header(data)
    assert str(e.value) == reason


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "PNG"])
def test_formats_beyond_torchvisions_decode_with_the_runs_channels(fmt, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encoded(fmt, (6, 4)))
    for channels in (1, 3):
        x = decode(str(path), channels)
        assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, 4, 6)
    assert decode(str(path), 3)[:, 0, 0].tolist() == pytest.approx([10, 200, 30], abs=3)


def test_only_the_first_frame_of_an_animated_gif_is_decoded(tmp_path):
    frames = [Image.new("RGB", (6, 4), (255 * (i % 2), 0, 0)) for i in range(50)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    x = decode(str(path), 3)
    assert tuple(x.shape) == (3, 4, 6) and int(x[0, 0, 0]) == 0  # frame 0: black


def test_a_png_with_corrupt_image_data_is_an_error_not_a_crash(tmp_path):
    """torchvision 0.29's PNG decoder dies of SIGSEGV on corrupt IDAT data (no `except`
    can catch that; a loader worker would take the run down): ffdist decodes PNG through
    Pillow, which raises. In a child process, so that a regression fails this test only."""
    data = bytearray(encoded("PNG", (64, 64)))
    at = data.index(b"IDAT")
    data[at + 6:at + 20] = bytes(14)
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    code = ("import sys\nfrom ffdist.data.datasets import decode, decode_error\n"
            "try:\n    decode(sys.argv[1], 3)\nexcept Exception as e:\n"
            "    print('refused:', decode_error(e))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: "), proc.stdout + proc.stderr[-2000:]
