"""Mixup and CutMix with timm's semantics, the same for any world size and through resume.

What timm's `Mixup` does (timm/data/mixup.py), and ffdist too: with probability `mix_prob`
an image is mixed with a partner, by mixup (lam ~ Beta(mixup_alpha, mixup_alpha), pixels
lam * x + (1 - lam) * partner) or by cutmix (lam ~ Beta(cutmix_alpha, cutmix_alpha), a box
of area ~(1 - lam) pasted from the partner, lam corrected to the box that fits); with both
on, cutmix is chosen with probability `mix_switch_prob`. The target is lam * smooth(y) +
(1 - lam) * smooth(y_partner), smooth() being label smoothing's on/off values (timm's
`mixup_target`), and the loss is the soft-target cross-entropy. `mix_mode` says how many
images share one draw: batch (a group), pair (both images of a pair), elem (each image).

What differs, and why. timm pairs image i with image N-1-i of each GPU's batch and draws
from the process's global numpy RNG, so the mixed images depend on how the global batch is
split over GPUs and on the RNG history of each process. Here:
- Partners are fixed by the global batch: a train stream built with pairs=True
  (ffdist.data.stream; ffdist.data.mapstyle.TrainSampler) puts each pair next to each other
  in one micro-batch of one rank, whatever the world size.
- Every draw of optimizer step s comes from one numpy generator seeded with (seed, s),
  drawn for every unit of the GLOBAL batch on every rank; a rank uses its own units. A draw
  is a function of (seed, step, position in the global batch) only: 1 or N ranks, any
  micro-batching, and a resumed run mix identically.
- mix_mode=batch: one draw per `mix_group` images of the global batch (default: the whole
  global batch, so all ranks agree on one lam per step). A per-rank draw keyed by (step,
  rank), what timm effectively does on N GPUs, changes with the world size: set
  mix_group to the reference's per-GPU batch instead, which gives the same statistics on
  any number of devices.

Nothing here waits for the device: draws are made on the CPU and travel with one
non-blocking copy of a pinned tensor per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ffdist.recipe import DataConfig

if TYPE_CHECKING:
    from ffdist.recipe import Recipe
    from ffdist.resolved import BatchPlan

STREAM = 0x6D6978  # "mix": this generator's own stream, apart from augmentation seeds


def enabled(cfg: DataConfig) -> bool:
    """Whether the recipe mixes images (and so trains on soft targets)."""
    on = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.cutmix_minmax is not None
    return on and cfg.mix_prob > 0


def soft_targets(cfg: DataConfig) -> bool:
    """Training targets are soft (mixed) label distributions: the top-1 of a training batch
    is then not an accuracy and must not be reported as one."""
    return enabled(cfg)


def for_run(recipe: Recipe, plan: BatchPlan, rank: int) -> Mixer | None:
    """The run's Mixer (None when the recipe does not mix): what the Trainer applies to each
    micro-batch as it comes off the prefetcher."""
    if not enabled(recipe.data):
        return None
    return Mixer(recipe.data, recipe.model.num_classes, recipe.optim.label_smoothing,
                 plan.global_batch, plan.world_size, rank, plan.micro, recipe.seed)


def criterion(recipe: Recipe) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: the soft-target cross-entropy when images are mixed (label
    smoothing is then inside the targets, see `smooth_one_hot`: applying it again in the
    loss would smooth twice), else cross-entropy with label smoothing on class indices."""
    if soft_targets(recipe.data):
        return soft_target_cross_entropy
    return nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c target_c * log_softmax(logits)_c (timm's
    SoftTargetCrossEntropy), in fp32 whatever the autocast dtype."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot rows: on = 1 - s + s/C, off = s/C (timm's mixup_target)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return torch.full((len(y), num_classes), off, device=y.device).scatter_(
        1, y.long().view(-1, 1), on)


@dataclass
class Draws:
    """One step's draws for each unit (group, pair or image) of the global batch."""

    lam: np.ndarray    # float64: the target weight of the image itself (1.0: not mixed)
    cut: np.ndarray    # bool: cutmix (box pasted) rather than mixup (pixels blended)
    box: np.ndarray    # int64 (U, 4): yl, yh, xl, xh of the pasted box (cut units only)


class Mixer:
    """Mixes a rank's micro-batches: `x, target = mixer(x, y, step, micro)`."""

    def __init__(self, cfg: DataConfig, num_classes: int, label_smoothing: float,
                 global_batch: int, world_size: int, rank: int, micro: int, seed: int):
        self.mixup_alpha, self.cutmix_alpha = cfg.mixup_alpha, cfg.cutmix_alpha
        self.minmax = tuple(cfg.cutmix_minmax) if cfg.cutmix_minmax else None
        if self.minmax:
            self.cutmix_alpha = 1.0  # timm: the box comes from minmax, lam from its area
        self.prob, self.switch, self.mode = cfg.mix_prob, cfg.mix_switch_prob, cfg.mix_mode
        self.group = cfg.mix_group or global_batch
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.batch, self.world, self.rank, self.micro, self.seed = (
            global_batch, world_size, rank, micro, seed)
        self._cached: tuple[tuple[int, int, int], Draws] | None = None

    # ------------------------------------------------------------------ draws (host)
    def units(self) -> int:
        return {"batch": self.batch // self.group, "pair": self.batch // 2,
                "elem": self.batch}[self.mode]

    def unit_of(self, positions: np.ndarray) -> np.ndarray:
        """Global-batch position -> index of the unit whose draw it uses."""
        return {"batch": positions // self.group, "pair": positions // 2,
                "elem": positions}[self.mode]

    def draws(self, step: int, height: int, width: int) -> Draws:
        """Every unit's draw for optimizer step `step`: the same on every rank. Always the
        same number of random numbers whatever gets applied, so a draw depends on (seed,
        step, unit) only."""
        key = (step, height, width)
        if self._cached is None or self._cached[0] != key:
            self._cached = key, self._draw(step, height, width)
        return self._cached[1]

    def _draw(self, step: int, h: int, w: int) -> Draws:
        rng = np.random.default_rng((STREAM, self.seed, step))
        n = self.units()
        apply = rng.random(n) < self.prob
        use_cut = rng.random(n) < self.switch
        lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n) if self.cutmix_alpha > 0 \
            else np.ones(n)
        lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, n) if self.mixup_alpha > 0 \
            else np.ones(n)
        if self.mixup_alpha <= 0:
            use_cut[:] = True
        elif self.cutmix_alpha <= 0:
            use_cut[:] = False
        cut = apply & use_cut
        lam = np.where(apply, np.where(use_cut, lam_cut, lam_mix), 1.0)
        box = self._boxes(rng, lam, h, w)
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        lam = np.where(cut, 1.0 - area / float(h * w), lam)  # timm's correct_lam
        return Draws(lam, cut, np.where(cut[:, None], box, 0))

    def _boxes(self, rng: np.random.Generator, lam: np.ndarray, h: int, w: int) -> np.ndarray:
        """timm's rand_bbox (a box of side sqrt(1 - lam) centred at a uniform point, clipped
        to the image) or rand_bbox_minmax, for every unit."""
        u = rng.random((4, len(lam)))
        if self.minmax:
            lo, hi = self.minmax
            cut_h = int(h * lo) + np.floor(u[0] * (int(h * hi) - int(h * lo))).astype(np.int64)
            cut_w = int(w * lo) + np.floor(u[1] * (int(w * hi) - int(w * lo))).astype(np.int64)
            yl = np.floor(u[2] * (h - cut_h + 1)).astype(np.int64)
            xl = np.floor(u[3] * (w - cut_w + 1)).astype(np.int64)
            return np.stack([yl, yl + cut_h, xl, xl + cut_w], axis=1)
        cy, cx = np.floor(u[0] * h).astype(np.int64), np.floor(u[1] * w).astype(np.int64)
        return centred_box(lam, cy, cx, h, w)

    def positions(self, micro: int, size: int | None = None) -> np.ndarray:
        """Global-batch positions of this rank's micro-batch `micro` (a train stream with
        pairs=True: rank r holds pairs r, r + world, ...)."""
        q = micro * self.micro + np.arange(size or self.micro)
        return 2 * (self.rank + self.world * (q // 2)) + q % 2

    def params(self, step: int, micro: int, size: int, h: int, w: int) -> np.ndarray:
        """(size, 6) float64 rows of lam, cut, yl, yh, xl, xh for the images of a micro-batch.
        An odd last image (a batch that lost an unreadable file) stays unmixed."""
        d = self.draws(step, h, w)
        u = self.unit_of(self.positions(micro, size))
        rows = np.concatenate([d.lam[u, None], d.cut[u, None], d.box[u]], axis=1)
        if size % 2:
            rows[-1] = (1.0, 0, 0, 0, 0, 0)
        return rows

    # ------------------------------------------------------------------ mixing (device)
    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets for micro-batch `micro` of optimizer step `step`
        (0-based global step); x is the normalized float NCHW batch on the device."""
        n, _, h, w = x.shape
        rows = self.params(step, micro, n, h, w)
        return mix(x, y, rows, self.num_classes, self.smoothing)


def centred_box(lam: np.ndarray, cy: np.ndarray, cx: np.ndarray, h: int, w: int) -> np.ndarray:
    """timm's rand_bbox for a centre (cy, cx): sides int(h * sqrt(1 - lam)), int(w * ...),
    clipped to the image; (n, 4) rows of yl, yh, xl, xh."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
    return np.stack([np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h),
                     np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)],
                    axis=1)


def _to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(rows)
    if device.type == "cuda":  # pinned + non_blocking: no wait for the device
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def partner_index(n: int, device: torch.device) -> torch.Tensor:
    """0<->1, 2<->3, ...; an odd last image is its own partner."""
    idx = torch.arange(n, device=device)
    pairs = n - n % 2
    idx[:pairs] = idx[:pairs].view(-1, 2).flip(1).reshape(-1)
    return idx


def mix(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, num_classes: int,
        smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply per-image draws `rows` (lam, cut, yl, yh, xl, xh) to a batch: timm's pixel
    arithmetic (x * lam + partner * (1 - lam); box pasted from the partner) and target
    (lam * smooth(y) + (1 - lam) * smooth(y_partner)), batched on the device."""
    n, _, h, w = x.shape
    p = _to_device(rows, x.device)
    lam, cut = p[:, 0], p[:, 1] > 0
    partner = partner_index(n, x.device)
    out = x
    # What to compute is decided from the host copy of the draws: no device read.
    if ((rows[:, 1] == 0) & (rows[:, 0] < 1)).any():
        blend = ~cut & (lam < 1)
        # complements in float64, then cast: timm's arithmetic for a float lam
        a = torch.where(blend, lam, 1.0).to(x.dtype).view(-1, 1, 1, 1)
        b = torch.where(blend, 1.0 - lam, 0.0).to(x.dtype).view(-1, 1, 1, 1)
        out = x * a + x[partner] * b
    if rows[:, 1].any():
        iy = torch.arange(h, device=x.device).view(1, -1, 1)
        ix = torch.arange(w, device=x.device).view(1, 1, -1)
        yl, yh, xl, xh = (p[:, k].long().view(-1, 1, 1) for k in range(2, 6))
        box = cut.view(-1, 1, 1) & (iy >= yl) & (iy < yh) & (ix >= xl) & (ix < xh)
        out = torch.where(box[:, None], x[partner], out)
    if x.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(
            memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    y1 = smooth_one_hot(y, num_classes, smoothing)
    t, u = lam.to(y1.dtype).view(-1, 1), (1.0 - lam).to(y1.dtype).view(-1, 1)
    return out, y1 * t + y1[partner] * u
