"""Pictures for people: image grids, a confusion matrix, titled thumbnails.

Drawn with Pillow (a dependency already, for image decoding) rather than matplotlib: a
few rectangles and labels do not justify a plotting stack in every training process.
Every function returns a PIL image; `to_chw` turns one into what TensorBoard takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable bundled font
    except TypeError:
        return ImageFont.load_default()


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


def titled_grid(images: Sequence[torch.Tensor], titles: Sequence[str],
                flags: Sequence[bool] = (), ncol: int = 6, cell: int = 112) -> Image.Image:
    """Thumbnails with a caption each (visualize_model of the PyTorch tutorials); a flagged
    caption (an uncertain prediction) is drawn in red."""
    n = len(images)
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    head = 18
    font = _font(11)
    grid = Image.new("RGB", (ncol * (cell + 6), nrow * (cell + head + 6)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, title) in enumerate(zip(images, titles)):
        x0 = (i % ncol) * (cell + 6) + 3
        y0 = (i // ncol) * (cell + head + 6) + 3
        flagged = bool(flags[i]) if i < len(flags) else False
        draw.text((x0, y0 + 2), title[:22], fill=(200, 0, 0) if flagged else (0, 0, 0), font=font)
        grid.paste(to_pil(img).resize((cell, cell), Image.NEAREST), (x0, y0 + head))
    return grid


def confusion_image(confusion: torch.Tensor, classes: Sequence[str], max_classes: int = 40
                    ) -> Image.Image:
    """A heat map of the confusion matrix (rows: true class, columns: predicted), each row
    shaded by its own recall so that small classes stay readable; counts in the cells."""
    cm = confusion.detach().cpu().long()
    n = min(cm.shape[0], max_classes)  # beyond ~40 classes the labels are unreadable
    cm = cm[:n, :n]
    names = [str(c)[:12] for c in classes[:n]]
    cell = 28 if n <= 20 else 16
    font = _font(10 if n <= 20 else 8)
    label_w = 8 + 7 * max(len(s) for s in names)
    top = 30 + label_w
    w, h = label_w + 24 + n * cell + 10, top + n * cell + 10
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w + 24, 4), "predicted ->", fill="black", font=font)
    draw.text((4, top - 16), "true", fill="black", font=font)
    rows = cm.sum(1, keepdim=True).clamp(min=1).double()
    frac = (cm.double() / rows).tolist()
    x0, y0 = label_w + 24, top
    for i in range(n):
        draw.text((4, y0 + i * cell + cell // 3), names[i], fill="black", font=font)
        col_label = Image.new("RGB", (label_w, cell), "white")
        ImageDraw.Draw(col_label).text((4, cell // 3), names[i], fill="black", font=font)
        img.paste(col_label.rotate(90, expand=True), (x0 + i * cell, 24))
        for j in range(n):
            v = frac[i][j]
            shade = int(255 * (1 - v))
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            draw.rectangle(box, fill=color, outline=(220, 220, 220))
            if cm[i, j] and n <= 20:
                draw.text((box[0] + 3, box[1] + cell // 3), str(int(cm[i, j])),
                          fill="white" if v > 0.6 else "black", font=font)
    return img
