"""Pictures for people: image grids, a confusion matrix, captioned prediction thumbnails.

Drawn with Pillow (a dependency already, for image decoding) rather than matplotlib: a
few rectangles and labels do not justify a plotting stack in every training process.
Text uses Pillow's bundled scalable font (Aileron, Pillow >= 10.1 with FreeType, which
its wheels include), so pictures look the same on every machine; it has no arrows or
check marks, hence ASCII captions. Every function returns a PIL image; `to_chw` turns
one into what TensorBoard takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

INK, GREY, RED = (20, 20, 20), (110, 110, 110), (200, 30, 30)
GRID = (215, 215, 215)
# Two hues, one for each kind of cell (light -> dark): right answers in blue, mistakes in
# orange-red, so an error never reads as a pale "almost correct" cell of the same colour.
CORRECT_RAMP = ((222, 235, 247), (8, 48, 107))
ERROR_RAMP = ((253, 212, 158), (165, 15, 21))
FLAG = (230, 120, 0)  # frame of an uncertain prediction


@lru_cache(maxsize=32)
def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable bundled font
    except TypeError:
        return ImageFont.load_default()


def _width(text: str, font: ImageFont.ImageFont) -> float:
    return font.getlength(text)


def _size(font: ImageFont.ImageFont) -> int:
    return getattr(font, "size", 11)  # the bitmap fallback (no FreeType) has no size


def shorten(text: str, font: ImageFont.ImageFont, width: float, keep_end: bool = False) -> str:
    """`text` cut to fit `width` pixels with an ellipsis: at the end, or in the middle when
    the end matters (a file name's number and suffix)."""
    if _width(text, font) <= width:
        return text
    for n in range(len(text) - 1, 0, -1):
        cut = (text[:n - n // 2] + "…" + text[len(text) - n // 2:]) if keep_end else text[:n] + "…"
        if _width(cut, font) <= width:
            return cut
    return "…"


def to_chw(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 CHW tensor (TensorBoard's add_image default layout)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def to_pil(chw: torch.Tensor) -> Image.Image:
    """uint8 CHW tensor (1 or 3 channels) -> RGB PIL image."""
    x = chw.detach().cpu()
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized float NCHW (mean/std on the 0..255 scale) -> uint8 NCHW for display."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 255).round().to(torch.uint8).cpu()


def thumbnail(chw: torch.Tensor, cell: int) -> Image.Image:
    """Fit an image into a cell x cell square, keeping its aspect: nearest-neighbour when
    enlarging (8x8 digits stay crisp), Lanczos when shrinking (photos stay smooth)."""
    img = to_pil(chw)
    scale = cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def image_grid(images: torch.Tensor, ncol: int = 8, cell: int = 64) -> Image.Image:
    """uint8 NCHW -> one picture, each image scaled up (nearest: 8x8 digits stay crisp)."""
    n = len(images)
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = Image.new("RGB", (ncol * (cell + 2) + 2, nrow * (cell + 2) + 2), "white")
    for i in range(n):
        tile = to_pil(images[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (2 + (i % ncol) * (cell + 2), 2 + (i // ncol) * (cell + 2)))
    return grid


# ------------------------------------------------------------------ captioned thumbnails

def _draw_lines(draw: ImageDraw.ImageDraw, x: int, y: int, lines: Sequence[tuple[str, int, tuple]]
                ) -> int:
    """(text, size, colour) lines from (x, y) down; returns the y below the last one."""
    for text, size, colour in lines:
        draw.text((x, y), text, fill=colour, font=_font(size))
        y += round(size * 1.3)
    return y


def _lines_height(lines: Sequence[tuple[str, int, tuple]]) -> int:
    return sum(round(size * 1.3) for _, size, _ in lines)


def titled_grid(images: Sequence[torch.Tensor], captions: Sequence[str],
                flags: Sequence[bool] = (), title: Sequence[str] = (),
                footer: Sequence[str] = (), ncol: int = 6, cell: int = 128) -> Image.Image:
    """Thumbnails with a caption each (visualize_model of the PyTorch tutorials).

    A caption's first line is drawn large (the prediction), further lines ("\\n") small and
    grey (the file name); each is cut to the tile's width. A flagged tile (an uncertain
    prediction) gets an orange frame and a red caption. `title` lines go above the grid,
    `footer` lines below it (e.g. the files that could not be read): nothing is left out
    without a word."""
    n = len(images)
    ncol = max(1, min(ncol, n)) if n else 1
    nrow = -(-n // ncol)
    big, small, pad = _font(14), _font(11), 8
    tile_w, tile_h = cell + pad, cell + 6 + 18 + 15 + pad
    head = [(t, 16 if i == 0 else 12, INK if i == 0 else GREY) for i, t in enumerate(title)]
    foot = [(t, 12, RED if i == 0 else INK) for i, t in enumerate(footer)]
    width = max([ncol * tile_w + pad] + [round(_width(t, _font(s))) + 2 * pad for t, s, _ in head + foot])
    top = pad + _lines_height(head) + (pad if head else 0)
    height = top + nrow * tile_h + (_lines_height(foot) + pad if foot else 0) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    _draw_lines(draw, pad, pad, head)
    for i, (img, caption) in enumerate(zip(images, captions)):
        x0, y0 = pad + (i % ncol) * tile_w, top + (i // ncol) * tile_h
        flagged = bool(flags[i]) if i < len(flags) else False
        thumb = thumbnail(img, cell)
        grid.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
        if flagged:
            draw.rectangle((x0 - 3, y0 - 3, x0 + cell + 2, y0 + cell + 2), outline=FLAG, width=3)
        first, *rest = caption.split("\n")
        draw.text((x0, y0 + cell + 6), shorten(first, big, cell), font=big,
                  fill=RED if flagged else INK)
        if rest:
            draw.text((x0, y0 + cell + 6 + 18), shorten(rest[0], small, cell, keep_end=True),
                      font=small, fill=GREY)
    _draw_lines(draw, pad, top + nrow * tile_h, foot)
    # where the parts are, for tests and tools (PNG files do not store it)
    grid.info.update(tiles_top=top, tile=(tile_w, tile_h), footer_top=top + nrow * tile_h)
    return grid


# ------------------------------------------------------------------ confusion matrix

def _mix(ramp: tuple[tuple[int, ...], tuple[int, ...]], t: float) -> tuple[int, ...]:
    a, b = ramp
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def cell_colour(fraction: float, correct: bool) -> tuple[int, ...]:
    """Colour of a confusion cell holding `fraction` of its row (its true class). The
    square root spreads the small shares where errors live (1/36 of a row is t = 0.17,
    clearly tinted); an empty error cell stays white."""
    if not correct and fraction <= 0:
        return (255, 255, 255)
    return _mix(CORRECT_RAMP if correct else ERROR_RAMP, math.sqrt(min(max(fraction, 0.0), 1.0)))


def _dark(colour: tuple[int, ...]) -> bool:
    r, g, b = colour[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b < 140


def pick_classes(cm: torch.Tensor, max_classes: int) -> list[int]:
    """All classes when they fit. Else the classes of the most frequent confusions (the
    largest off-diagonal cells: true class, then its prediction), each pair kept side by
    side so that the shown block holds the big mistakes; any room left goes to the
    classes with the most errors overall."""
    k = cm.shape[0]
    if k <= max_classes:
        return list(range(k))
    errors = cm.clone()
    errors.fill_diagonal_(0)
    picked: dict[int, None] = {}  # insertion-ordered set
    counts, cells = errors.flatten().sort(descending=True, stable=True)
    for count, cell in zip(counts.tolist(), cells.tolist()):
        if count == 0 or len(picked) >= max_classes:
            break
        for c in divmod(cell, k):
            if len(picked) < max_classes:
                picked.setdefault(c)
    score = (errors.sum(0) + errors.sum(1)).tolist()
    for c in sorted(range(k), key=lambda i: (-score[i], i)):  # ties keep the lower index
        if len(picked) >= max_classes:
            break
        picked.setdefault(c)
    return list(picked)


@dataclass
class _Matrix:
    """What the confusion picture shows, worked out before drawing."""
    counts: list[list[int]]    # shown rows x shown columns (+ "other" when capped)
    fractions: list[list[float]]
    rows: list[str]            # class names of the shown rows/columns
    recall: list[float]
    support: list[int]
    other: bool                # last column = predictions of classes not shown
    index: list[int]           # class index of each shown row


def _matrix(cm: torch.Tensor, classes: Sequence[str], max_classes: int) -> _Matrix:
    keep = pick_classes(cm, max_classes)
    other = len(keep) < cm.shape[0]
    sub = cm[keep][:, keep]
    support = cm[keep].sum(1)
    if other:
        sub = torch.cat([sub, (support - sub.sum(1))[:, None]], 1)
    frac = sub.double() / support.clamp(min=1)[:, None].double()
    names = [str(classes[i]) if i < len(classes) else str(i) for i in keep]
    recall = [float(frac[r, r]) for r in range(len(keep))]
    return _Matrix(sub.tolist(), frac.tolist(), names, recall, support.tolist(), other, keep)


def _cell_size(n: int) -> int:
    return 76 if n <= 3 else 52 if n <= 10 else 36 if n <= 20 else 28 if n <= 30 else 22


def _count_font(max_count: int, cell: int) -> ImageFont.ImageFont | None:
    """The largest font (<= 16) in which every count fits its cell; None if even 8 does not."""
    text = str(max_count)
    for size in range(min(16, cell // 2), 7, -1):
        font = _font(size)
        if _width(text, font) <= cell - 4:
            return font
    return None


def _title_lines(cm: torch.Tensor, m: _Matrix, title: str, split: str
                 ) -> list[tuple[str, int, tuple]]:
    n, right, k = int(cm.sum()), int(cm.diagonal().sum()), cm.shape[0]
    acc = right / n if n else 0.0
    on = f" on {split}" if split else ""
    lines = [(title or "confusion matrix", 18, INK),
             (f"top-1 {acc:.4f}{on}   ({right:,} of {n:,} right, {n - right:,} wrong)   "
              f"{k} classes", 14, INK)]
    if m.other:
        lines.append((f"showing {len(m.rows)} of {k} classes: those of the most frequent mistakes; "
                      f"'other' = predicted as one of the {k - len(m.rows)} not shown", 12, RED))
    return lines


@dataclass
class _Layout:
    """Where the parts of the confusion picture go (pixels)."""
    cell: int
    font: ImageFont.ImageFont
    names: list[str]       # row labels, shortened to fit
    col_names: list[str]   # column labels (+ "other")
    upright: bool          # column labels horizontal (short names) or rotated
    col_h: int             # height of the column labels
    x0: int                # left edge of the cells
    y0: int                # top edge of the cells
    gap: int               # space before the "other" column
    ncol: int

    def col_x(self, j: int) -> int:
        return self.x0 + j * self.cell + (self.gap if j == len(self.names) else 0)

    @property
    def right(self) -> int:
        return self.col_x(self.ncol - 1) + self.cell


def _layout(m: _Matrix, head_h: int, pad: int) -> _Layout:
    n = len(m.rows)
    cell = _cell_size(n)
    font = _font(14 if n <= 20 else 12 if n <= 30 else 11)
    names = [shorten(s, font, 150) for s in m.rows]
    col_names = names + (["other"] if m.other else [])
    label_w = max(round(_width(s, font)) for s in col_names) + 4
    upright = label_w <= cell  # short names (digits) sit above their column unrotated
    col_h = (_size(font) + 6) if upright else label_w + 4
    x0 = pad + AXIS + 8 + label_w + 6
    y0 = pad + head_h + 6 + AXIS + 8 + col_h
    return _Layout(cell, font, names, col_names, upright, col_h, x0, y0,
                   cell // 3 if m.other else 0, len(col_names))


AXIS = 13  # font size of the axis names


def confusion_image(confusion: torch.Tensor, classes: Sequence[str], title: str = "",
                    split: str = "", max_classes: int = 40) -> Image.Image:
    """The confusion matrix as people read it (rows: true class, columns: predicted).

    Above: `title` (the run, the step or weights), then top-1 on `split` and n, worked
    out from the matrix itself.
    Each cell is coloured by its share of the row, so a small class reads like a big one;
    right answers (the diagonal) in blue, mistakes in orange-red, empty cells white, and
    the counts written in the cells. Right of each row: its recall (red when below the
    overall top-1) and support. Below: the colour scales. Beyond `max_classes` (ImageNet's
    1,000) the classes of the most frequent mistakes are shown and an 'other' column
    collects the rest of each row."""
    cm = confusion.detach().cpu().long()
    m = _matrix(cm, classes, max_classes)
    pad, head = 10, _title_lines(cm, m, title, split)
    g = _layout(m, _lines_height(head), pad)
    stats_w = round(_width("100%  n=00000", g.font)) + 2 * pad
    w = max([g.right + stats_w, _legend().width + 2 * pad]
            + [round(_width(t, _font(s))) + 2 * pad for t, s, _ in head])
    img = Image.new("RGB", (w, g.y0 + len(m.rows) * g.cell + 74), "white")
    draw = ImageDraw.Draw(img)
    _draw_lines(draw, pad, pad, head)
    axis = _font(AXIS)
    draw.text((g.x0, g.y0 - g.col_h - AXIS - 6), "predicted class", fill=GREY, font=axis)
    _vertical_text(img, "true class", axis, (pad, g.y0), GREY)
    _draw_labels(img, draw, m, g, overall=int(cm.diagonal().sum()) / max(1, int(cm.sum())))
    _draw_cells(draw, m, g)
    _draw_legend(img, pad, g.y0 + len(m.rows) * g.cell + 14)
    # where the cells are, for tests and tools (PNG files do not store it)
    img.info.update(cells=(g.x0, g.y0, g.cell), columns=[g.col_x(j) for j in range(g.ncol)],
                    shown=m.index)
    return img


def _draw_labels(img: Image.Image, draw: ImageDraw.ImageDraw, m: _Matrix, g: _Layout,
                 overall: float) -> None:
    font, size = g.font, _size(g.font)
    for j, name in enumerate(g.col_names):
        cx = g.col_x(j)
        if g.upright:
            draw.text((cx + (g.cell - _width(name, font)) / 2, g.y0 - g.col_h), name, fill=INK,
                      font=font)
        else:
            _vertical_text(img, name, font, (cx + (g.cell - size) // 2 - 2, g.y0 - 4), INK,
                           bottom=True)
    sx = g.right + 8
    draw.text((sx, g.y0 - size - 6), "recall", fill=GREY, font=font)
    for i, name in enumerate(g.names):
        cy = g.y0 + i * g.cell + (g.cell - size) / 2 - 1
        draw.text((g.x0 - 6 - _width(name, font), cy), name, fill=INK, font=font)
        weak = m.recall[i] < overall - 1e-9  # the classes that pull top-1 down
        draw.text((sx, cy), f"{m.recall[i]:.0%}  n={m.support[i]}", fill=RED if weak else GREY,
                  font=font)


def _vertical_text(img: Image.Image, text: str, font: ImageFont.ImageFont, at: tuple[int, int],
                   colour: tuple, bottom: bool = False) -> None:
    """Text rotated to read bottom-up; `at` is its top-left corner, or with `bottom` its
    bottom-left corner (a column label ending just above its column)."""
    w = round(_width(text, font)) + 2
    strip = Image.new("RGB", (w, _size(font) + 4), "white")
    ImageDraw.Draw(strip).text((1, 0), text, fill=colour, font=font)
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (at[0], at[1] - strip.height if bottom else at[1]))


def _draw_cells(draw: ImageDraw.ImageDraw, m: _Matrix, g: _Layout) -> None:
    cell = g.cell
    font = _count_font(max(max(row) for row in m.counts), cell)
    for i, (counts, fracs) in enumerate(zip(m.counts, m.fractions)):
        for j, (count, frac) in enumerate(zip(counts, fracs)):
            colour = cell_colour(frac, correct=i == j)
            x, y = g.col_x(j), g.y0 + i * cell
            draw.rectangle((x, y, x + cell, y + cell), fill=colour, outline=GRID)
            if font is not None and (count or i == j):  # a diagonal 0: a class never right
                text = str(count)
                draw.text((x + (cell - _width(text, font)) / 2, y + (cell - _size(font)) / 2 - 1),
                          text, fill="white" if _dark(colour) else INK, font=font)


def _draw_legend(img: Image.Image, x: int, y: int) -> None:
    img.paste(_legend(), (x, y))


@lru_cache(maxsize=1)
def _legend(bar: int = 200) -> Image.Image:
    """Both colour scales, share of the row from 0 to 100%, on the square-root axis the
    cells use (ticks at 1%, 10%, 50%, 100%). Drawn once per process: every evaluation's
    picture pastes the same one."""
    font = _font(11)
    labels = ("right (diagonal): share of the true class",
              "wrong (off the diagonal): share of the true class")
    step = max(bar, round(_width(labels[0], font))) + 40
    img = Image.new("RGB", (step + max(bar, round(_width(labels[1], font))) + 12, 52), "white")
    draw = ImageDraw.Draw(img)
    for k, (label, correct) in enumerate(zip(labels, (True, False))):
        bx = k * step
        draw.text((bx, 0), label, fill=GREY, font=font)
        for p in range(bar):
            share = ((p + 0.5) / bar) ** 2
            draw.line((bx + p, 16, bx + p, 30), fill=cell_colour(share, correct))
        for share, text in ((0.01, "1%"), (0.1, "10%"), (0.5, "50%"), (1.0, "100%")):
            px = bx + round(math.sqrt(share) * (bar - 1))
            draw.line((px, 30, px, 34), fill=GREY)
            draw.text((px - _width(text, font) / 2, 35), text, fill=GREY, font=font)
    return img
