"""Pictures people read: facts about the pixels of the confusion matrix and the
prediction grid, not their bytes: a title above, hues that tell errors from right answers,
many classes cut down with a note, file names and unreadable files in the grid."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from ffdist import visual


def _hsv(img: Image.Image, xy: tuple[int, int]) -> tuple[float, float, float]:
    r, g, b = img.getpixel(xy)[:3]
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    return h * 360, s, v


def _cell_corner(img: Image.Image, i: int, j: int) -> tuple[int, int]:
    """A pixel inside cell (row i, column j), away from the count written in its middle."""
    _, y0, cell = img.info["cells"]
    return img.info["columns"][j] + 3, y0 + i * cell + 3


def _ink_bands(img: Image.Image, top: int, bottom: int, x1: int | None = None) -> int:
    """Lines of text between two heights: runs of rows holding dark-ish pixels."""
    a = np.asarray(img.convert("L"))[top:bottom, :x1]
    rows = (a < 160).any(axis=1)
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def _digits_confusion() -> torch.Tensor:
    cm = torch.diag(torch.full((10,), 36))
    for (i, j), n in {(3, 8): 1, (8, 1): 3, (9, 4): 2, (0, 6): 36}.items():
        cm[i, i] -= n
        cm[i, j] += n
    return cm


def test_confusion_title_names_top1_and_sits_above_the_cells():
    cm = _digits_confusion()
    img = visual.confusion_image(cm, [str(i) for i in range(10)], title="digits, step 440",
                                 split="val")
    x0, y0, cell = img.info["cells"]
    assert img.width >= x0 + 10 * cell and img.height >= y0 + 10 * cell
    assert cell >= 40  # ten classes get big cells: counts and labels in a readable size
    # Two lines of text (title, then top-1 and n) above the column labels, in ink, no colour.
    assert _ink_bands(img, 0, 50) == 2
    head = np.asarray(img)[:50].astype(int)
    assert (np.abs(head - head.mean(axis=2, keepdims=True)) < 40).all()
    # A longer title widens the picture rather than being cut.
    long = visual.confusion_image(cm, [str(i) for i in range(10)], title="x" * 200)
    assert long.width > img.width and long.width >= visual._width("x" * 200, visual._font(18))


def test_errors_differ_in_hue_from_right_answers():
    cm = _digits_confusion()
    img = visual.confusion_image(cm, [str(i) for i in range(10)])
    for i in range(10):
        for j in range(10):
            h, s, v = _hsv(img, _cell_corner(img, i, j))
            if i == j:
                assert 190 <= h <= 240 and s > (0.4 if cm[i, i] else 0.05), (i, j, h, s)  # blue
            elif cm[i, j]:
                assert (h <= 45 or h >= 345) and s > 0.3, (i, j, h, s)  # orange-red
            else:
                assert s < 0.05 and v > 0.95, (i, j)  # empty: white
    # One error in 36 is as visible (saturated) as a big one, only lighter.
    _, s_small, v_small = _hsv(img, _cell_corner(img, 3, 8))
    _, s_big, v_big = _hsv(img, _cell_corner(img, 0, 6))
    assert s_small > 0.3 and v_small > v_big
    # A class never predicted right: its diagonal cell is the pale end of blue, not white.
    h, s, _ = _hsv(img, _cell_corner(img, 0, 0))
    assert 190 <= h <= 240 and 0.05 < s < 0.2


def test_two_classes():
    img = visual.confusion_image(torch.tensor([[95, 5], [12, 88]]), ["ants", "bees"], "hymenoptera")
    _, _, cell = img.info["cells"]
    assert cell >= 70 and img.width >= 500  # big cells, room for the legend
    assert 190 <= _hsv(img, _cell_corner(img, 1, 1))[0] <= 240
    assert _hsv(img, _cell_corner(img, 1, 0))[0] <= 45


@pytest.mark.parametrize("k", [100, 1000])
def test_many_classes_show_the_most_confused_with_a_note(k: int):
    g = torch.Generator().manual_seed(0)
    cm = torch.diag(torch.full((k,), 50))
    cm += torch.randint(0, 2, (k, k), generator=g) * (torch.rand(k, k, generator=g) < 0.002)
    cm[17, 17], cm[17, k - 3] = 20, 30  # the worst confusion: 17 taken for k-3
    names = [f"class number {i}" for i in range(k)]
    img = visual.confusion_image(cm, names, "big", max_classes=40)
    shown = img.info["shown"]
    assert len(shown) == 40 and shown[:2] == [17, k - 3]  # the biggest mistake first, paired
    assert len(img.info["columns"]) == 41  # + "other": the rest of each row
    assert img.width < 1400 and img.height < 1400
    # Three lines above the cells: the title, top-1, and the red note on what is shown.
    assert _ink_bands(img, 0, 68) == 3
    note = np.asarray(img)[45:68].astype(int)
    assert ((note[..., 0] > 150) & (note[..., 1] < 90)).sum() > 50  # red text
    h, _, _ = _hsv(img, _cell_corner(img, 0, 1))
    assert h <= 45  # the 30-of-50 error cell


def test_pick_classes_keeps_all_when_they_fit():
    assert visual.pick_classes(torch.eye(12, dtype=torch.long), 40) == list(range(12))
    assert visual.pick_classes(torch.eye(50, dtype=torch.long) * 3, 40) == list(range(40))


def _tiles(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8) for _ in range(n)]


def test_grid_lists_what_it_could_not_show():
    caps = [f"{i % 10}  0.9{i}\nfile_{i}.png" for i in range(8)]
    footer = ["2 unreadable, not predicted:", "broken.png: not a JPEG/PNG image",
              "cut.jpg: truncated"]
    img = visual.titled_grid(_tiles(8), caps, footer=footer)
    bare = visual.titled_grid(_tiles(8), caps)
    assert img.height > bare.height
    assert _ink_bands(img, img.info["footer_top"], img.height) == 3  # one line per file + head
    assert _ink_bands(bare, bare.info["footer_top"], bare.height) == 0
    # Each tile: a caption line (prediction) and a grey one (the file name) under the image.
    w, h = img.info["tile"]
    top = img.info["tiles_top"]
    assert _ink_bands(img, top + 128, top + h, x1=w) == 2


def test_grid_frames_uncertain_tiles():
    def frame_pixels(img: Image.Image) -> int:
        a = np.asarray(img).astype(int)
        return int((np.abs(a - np.array(visual.FLAG)).sum(axis=2) < 30).sum())

    caps = ["3  0.41  ?\na.png", "7  0.99\nb.png"]
    flagged = visual.titled_grid(_tiles(2), caps, flags=[True, False])
    plain = visual.titled_grid(_tiles(2), caps, flags=[False, False])
    assert frame_pixels(flagged) > 4 * 128 * 2 and frame_pixels(plain) == 0


def test_shorten_keeps_the_end_of_file_names():
    font = visual._font(11)
    name = "a_very_long_folder_name_of_photos_0123_label7.png"
    cut = visual.shorten(name, font, 100, keep_end=True)
    assert cut.endswith(".png") and "…" in cut and visual._width(cut, font) <= 100
    assert visual.shorten("short", font, 100) == "short"


def test_thumbnails_keep_aspect_and_shrink_smoothly():
    photo = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    assert visual.thumbnail(photo, 120).size == (120, 80)
    assert visual.thumbnail(torch.zeros(1, 8, 8, dtype=torch.uint8), 128).size == (128, 128)
