"""Augmentation presets. Images stay uint8 until the device: the DataLoader moves 4x fewer
bytes than float32 through shared memory and pinned buffers, and normalization happens once
per batch on the device (ffdist.data.loader.DevicePrefetcher), as in timm's PrefetchLoader.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Per-channel mean/std on the 0..255 scale of uint8 images.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053 * 255,), (0.3760 * 255,)),
    "mnist": ((0.1307 * 255,), (0.3081 * 255,)),
    "fashion_mnist": ((0.2860 * 255,), (0.3530 * 255,)),
    "cifar10": ((0.4914 * 255, 0.4822 * 255, 0.4465 * 255), (0.2470 * 255, 0.2435 * 255,
                                                             0.2616 * 255)),
    "cifar100": ((0.5071 * 255, 0.4865 * 255, 0.4409 * 255), (0.2673 * 255, 0.2564 * 255,
                                                              0.2762 * 255)),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": ((127.5,), (73.9,)),
}


def normalization(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = NORMALIZATION.get(name, NORMALIZATION["imagenet"])
    if len(mean) != channels:  # e.g. grey folders: average the RGB statistics
        mean = (sum(mean) / len(mean),) * channels
        std = (sum(std) / len(std),) * channels
    return mean, std


def folder_train(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ImageNet-style: random resized crop + horizontal flip, on uint8 CHW tensors."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def folder_eval(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize the short side to size/0.875 (256 for 224), then a center crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)])


def sample_seeds(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """A 62-bit hash of (seed, epoch, sample index) per sample (splitmix64-style mixing).

    Augmentation draws come from these, not from a global RNG: the same image gets the same
    crop in epoch e whichever rank, worker or resumed process loads it, so 1 and N ranks
    (and a resumed run) see identical batches."""
    m = (1 << 62) - 1
    z = (index.long() * 0x9E3779B1 + epoch * 0x85EBCA77 + seed * 0xC2B2AE3D + 0x27D4EB2F) & m
    z = ((z ^ (z >> 29)) * 0xBF58476D) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB) & m
    return z ^ (z >> 31)


def batch_crop_flip(images: torch.Tensor, pad: int, flip: bool,
                    seeds: torch.Tensor) -> torch.Tensor:
    """CIFAR-style random crop with zero padding and random horizontal flip, for a whole
    uint8 NCHW batch at once (no per-sample Python); draws from per-sample `seeds`."""
    n, _, h, w = images.shape
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        oy = seeds % (2 * pad + 1)
        ox = (seeds >> 8) % (2 * pad + 1)
        iy = (oy[:, None] + torch.arange(h))[:, :, None]  # n, h, 1
        ix = (ox[:, None] + torch.arange(w))[:, None, :]  # n, 1, w
        images = padded[torch.arange(n)[:, None, None], :, iy, ix].permute(0, 3, 1, 2)
    if flip:
        mask = ((seeds >> 16) & 1).bool()
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images.contiguous()
