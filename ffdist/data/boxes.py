"""The box path's crops (data.decode=gpu | boxes): each sample's crop is a BOX in its
source image's pixels, drawn on the host, and one resampling turns a batch of boxes into
S x S images wherever the pixels are (ffdist.data.gpu_decode on the device, the loader
workers for the images only the CPU decodes).

Draws: `TrainBoxes.draw` runs torchvision's own RandomResizedCrop parameter draw and the
flip draw of RandomHorizontalFlip, in that order, from torch's CPU generator seeded with
the sample seed (ffdist.data.transforms.sample_seeds): the same calls, in the same order,
that data.decode=cpu's transform makes (`transforms.folder_train`). So both settings crop
the same box and flip the same images; only the resampling differs. It needs the image
size only, which the header gives (ffdist.data.decode_limits) without decoding.
`EvalBoxes` is torchvision's Resize(short side) + CenterCrop, written as the box of the
source that the centre crop covers.

Resampling (`crop`): `torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)` on a
canvas holding every box's region (one call per canvas; a batch needs one canvas unless
its regions exceed `CANVAS_ELEMENTS`). Output pixel (y, x) of a box (top, left, h, w)
averages ceil(h / S) x ceil(w / S) bilinear samples spread evenly over its cell [top + y *
h/S, top + (y+1) * h/S) (pixel centres at i + 0.5): plain bilinear when enlarging, an
area average when shrinking (antialiased). torchvision's RandomResizedCrop (data.decode=cpu)
filters with a triangle kernel instead: the two settings' pixels differ by a few grey levels
where the image has fine detail, never in geometry.

Each region is its box plus a one-pixel margin (what bilinear sampling reads), cut from the
image and laid at the top-left of its canvas slot; where the box touches the image's bottom
or right edge the last row/column is repeated once, so that sampling clamps at the image's
edge as roi_align on the whole image would. A region is thus resampled exactly as roi_align
over its whole image resamples it (tests/unit/test_boxes.py checks it against that
per-sample reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Box = tuple[float, float, float, float]
"""(top, left, height, width) in the source image's pixels (edges: pixel i covers [i, i+1))."""

CANVAS_ELEMENTS = 1 << 27
"""Largest canvas (elements, float32: 512 MiB) one roi_align call resamples; a batch whose
regions need more is cut into several canvases (largest regions together)."""


class TrainBoxes:
    """Random resized crops (+ horizontal flips) of side `size`, as data.decode=cpu draws
    them (scale 0.08..1, aspect 3/4..4/3: torchvision's defaults, as folder_train's)."""

    def __init__(self, size: int, flip: bool = True):
        from torchvision.transforms import v2

        self.size, self.flip = size, flip
        self._crop = v2.RandomResizedCrop(size)

    def draw(self, seed: int, height: int, width: int) -> tuple[Box, bool]:
        """(box, flip) of a `height` x `width` image for the sample seeded `seed`."""
        shape = torch.empty(()).expand(3, height, width)  # a size, no pixels
        make = getattr(self._crop, "make_params", None) or self._crop._get_params
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            p = make([shape])
            # RandomHorizontalFlip: `torch.rand(1) >= p` leaves the image as it is
            flip = self.flip and bool(torch.rand(1) < 0.5)
        return (float(p["top"]), float(p["left"]), float(p["height"]), float(p["width"])), flip


class EvalBoxes:
    """Resize the short side to `resize`, then a centre crop of `size` (transforms.folder_eval),
    as the box of the source image that crop covers; never flipped."""

    flip = False

    def __init__(self, size: int, resize: int | None = None):
        from ffdist.data.transforms import eval_resize

        self.size, self.resize = size, eval_resize(size, resize)

    def draw(self, seed: int, height: int, width: int) -> tuple[Box, bool]:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)  # torchvision's Resize truncates it
        new_h, new_w = (new_long, self.resize) if width <= height else (self.resize, new_long)
        top = int(round((new_h - self.size) / 2.0))  # CenterCrop's rounding
        left = int(round((new_w - self.size) / 2.0))
        sy, sx = new_h / height, new_w / width
        return (top / sy, left / sx, self.size / sy, self.size / sx), False


BoxSampler = TrainBoxes | EvalBoxes


def crop(images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int,
         budget: int = CANVAS_ELEMENTS) -> torch.Tensor:
    """float32 (N, C, size, size), 0..255: box i of uint8 CHW image i resampled (module
    docstring). The images may be on any one device; the result is there too. No host
    sync: region sizes come from the host's boxes and shapes."""
    from torchvision.ops import roi_align

    device = images[0].device
    regions = [_region(img.shape[-2], img.shape[-1], b) for img, b in zip(images, boxes)]
    channels = images[0].shape[0]
    out = None
    # each slot one row and column larger than its region: the repeated edge (`_place`)
    groups = _groups([(r[1] - r[0] + 1, r[3] - r[2] + 1) for r in regions], channels, budget)
    for group in groups:
        hc = max(regions[i][1] - regions[i][0] for i in group) + 1
        wc = max(regions[i][3] - regions[i][2] for i in group) + 1
        canvas = torch.zeros(len(group), channels, hc, wc, dtype=torch.float32, device=device)
        rois = []
        for k, i in enumerate(group):
            (y0, y1, x0, x1), img = regions[i], images[i]
            _place(canvas[k], img, y0, y1, x0, x1)
            top, left, h, w = boxes[i]
            rois.append((k, left - x0, top - y0, left + w - x0, top + h - y0))
        rois_t = _to(torch.tensor(rois, dtype=torch.float32), device)
        part = roi_align(canvas, rois_t, output_size=(size, size), spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)
        if len(groups) == 1:
            return part
        if out is None:
            out = torch.empty(len(images), channels, size, size, dtype=torch.float32,
                              device=device)
        out.index_copy_(0, _to(torch.tensor(group, dtype=torch.long), device), part)
    assert out is not None
    return out


def flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images of a batch mirrored left-right where `flips` (bool, N, on x's device) says so
    (torch.where: no host sync, whatever the flags are)."""
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)


def crop_one(image: torch.Tensor, box: Box, flipped: bool, size: int) -> torch.Tensor:
    """uint8 (C, size, size): one image's box, resampled by `crop` (the same arithmetic as
    a batch's), flipped, rounded: a sample that the loader worker decodes on the CPU."""
    x = crop([image], [box], size)[0]
    if flipped:
        x = x.flip(-1)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _region(height: int, width: int, box: Box) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the rows and columns bilinear sampling of `box` reads (the box and a
    one-pixel margin), inside the image."""
    top, left, h, w = box
    return (max(math.floor(top) - 1, 0), min(math.ceil(top + h) + 1, height),
            max(math.floor(left) - 1, 0), min(math.ceil(left + w) + 1, width))


def _place(slot: torch.Tensor, image: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> None:
    """The region into the top-left of its canvas slot (uint8 -> float in the copy); the
    last row / column repeated once where the region ends at the image's edge (roi_align
    reads one past it there and must see the edge pixel, as it does on the whole image)."""
    h, w = y1 - y0, x1 - x0
    slot[:, :h, :w].copy_(image[:, y0:y1, x0:x1])
    if y1 == image.shape[-2] and h < slot.shape[-2]:
        slot[:, h, :w].copy_(slot[:, h - 1, :w])
    if x1 == image.shape[-1] and w < slot.shape[-1]:
        slot[:, :h + 1, w].copy_(slot[:, :h + 1, w - 1])


def _groups(shapes: list[tuple[int, int]], channels: int, budget: int) -> list[list[int]]:
    """Indices per canvas of slots of `shapes`: all in one, in order, when the padded
    canvas fits `budget` elements; else the largest slots first, greedily, each canvas
    within the budget (a slot larger than the budget gets a canvas of its own)."""
    def size(idx: list[int]) -> int:
        return len(idx) * channels * max(shapes[i][0] for i in idx) * \
            max(shapes[i][1] for i in idx)

    everything = list(range(len(shapes)))
    if not shapes or size(everything) <= budget:
        return [everything]
    groups: list[list[int]] = [[]]
    for i in sorted(everything, key=lambda i: -shapes[i][0] * shapes[i][1]):
        if groups[-1] and size([*groups[-1], i]) > budget:
            groups.append([])
        groups[-1].append(i)
    return groups


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without a host sync: through pinned memory on CUDA
    (a copy from pageable memory would block the host)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
