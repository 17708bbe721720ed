"""Augmentation presets. Images stay uint8 until the device: the DataLoader moves 4x fewer
bytes than float32 through shared memory and pinned buffers, and normalization happens once
per batch on the device (ffdist.data.prefetch.DevicePrefetcher), as in timm's PrefetchLoader.

Every random draw is keyed by the sample (`sample_seeds`): policies (RandAugment,
TrivialAugmentWide, AugMix, AutoAugment) and random erasing are torchvision's own v2
transforms, run with torch's CPU generator seeded per sample (`per_sample`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ffdist.recipe import DataConfig


def interpolation(name: str):
    """data.interpolation -> torchvision's InterpolationMode."""
    from torchvision.transforms import v2

    return {"nearest": v2.InterpolationMode.NEAREST, "bilinear": v2.InterpolationMode.BILINEAR,
            "bicubic": v2.InterpolationMode.BICUBIC}[name]


def folder_train(size: int, interp: str = "bilinear",
                 extra: tuple[Callable, ...] = ()) -> Callable[[torch.Tensor], torch.Tensor]:
    """ImageNet-style: random resized crop + horizontal flip (+ `extra`: the policy and
    random erasing), on uint8 CHW tensors."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, interpolation=interpolation(interp),
                                            antialias=True), v2.RandomHorizontalFlip(), *extra])


def eval_resize(size: int, resize: int | None = None) -> int:
    """The short side before the eval center crop: `resize`, else size/0.875 (256 for 224)."""
    return resize or int(round(size / 0.875))


def folder_eval(size: int, resize: int | None = None,
                interp: str = "bilinear") -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize the short side to `eval_resize(size, resize)`, then a center crop of size."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(eval_resize(size, resize), interpolation=interpolation(interp),
                                 antialias=True), v2.CenterCrop(size)])


def policy(cfg: DataConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """data.auto_augment as a torchvision.transforms.v2 policy (uint8 in, uint8 out), or
    None. v2 policies draw from torch's global CPU generator: callers seed it per sample.
    Their rotations/shears on tensors support nearest and bilinear only: bicubic recipes
    get bilinear here (bicubic stays for the resized crops)."""
    name = cfg.auto_augment
    if name is None:  # before the import: torchvision costs ~1 s of start-up (torch._dynamo)
        return None
    from torchvision.transforms import v2

    interp = interpolation("nearest" if cfg.interpolation == "nearest" else "bilinear")
    if name == "ra":
        return v2.RandAugment(cfg.ra_num_ops, cfg.ra_magnitude, interpolation=interp)
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=interp)
    if name == "augmix":
        return v2.AugMix(cfg.augmix_severity, interpolation=interp)
    return v2.AutoAugment(v2.AutoAugmentPolicy(name), interpolation=interp)


def _erasing_class() -> type:
    from torchvision.transforms import v2

    class RandomErasing(v2.RandomErasing):
        """torchvision's RandomErasing (same draws: probability, area, aspect, place) on
        uint8 images, before normalization. mode=mean fills with the rounded dataset mean,
        which normalizes to ~0 (torchvision's reference erases normalized images with 0);
        mode=pixel fills with per-pixel N(mean, std) noise in pixel units, clipped to
        0..255 (timm's 'pixel' mode: N(0, 1) after normalization)."""

        def __init__(self, p: float, mean: tuple[float, ...], std: tuple[float, ...],
                     mode: str = "mean"):
            value = "random" if mode == "pixel" else [float(round(m)) for m in mean]
            super().__init__(p=p, value=value)
            self.mode = mode
            self.pixel_mean = torch.tensor(mean)[:, None, None]
            self.pixel_std = torch.tensor(std)[:, None, None]

        def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
            if self.mode == "pixel" and params["v"] is not None:
                v = (self.pixel_mean + self.pixel_std * params["v"]).round_().clamp_(0, 255)
                params = {**params, "v": v.to(torch.uint8)}
            return super().transform(inpt, params)

    return RandomErasing


def erasing(cfg: DataConfig, mean: tuple[float, ...],
            std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """data.random_erase as a uint8 transform, or None when off."""
    if cfg.random_erase <= 0:
        return None
    return _erasing_class()(cfg.random_erase, mean, std, cfg.random_erase_mode)


def sample_transforms(cfg: DataConfig, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> tuple[Callable, ...]:
    """The per-sample training transforms after crop/flip: the policy, then erasing."""
    return tuple(t for t in (policy(cfg), erasing(cfg, mean, std)) if t is not None)


def per_sample(images: torch.Tensor, seeds: torch.Tensor,
               transforms: tuple[Callable, ...]) -> torch.Tensor:
    """Apply `transforms` to each uint8 CHW image of a batch, each drawing from torch's CPU
    generator seeded with its own seed (torchvision's transforms use the global generator),
    which is restored afterwards. Only the CPU generator is seeded: torch.manual_seed also
    seeds every accelerator (~0.5 ms per call)."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for image, s in zip(images, seeds.tolist()):
            torch.default_generator.manual_seed(s)
            for t in transforms:
                image = t(image)
            out.append(image)
    return torch.stack(out) if out else images


def sample_seeds(seed: int, epoch: int, index: torch.Tensor,
                 repeat: torch.Tensor | int = 0) -> torch.Tensor:
    """A 62-bit hash of (seed, epoch, sample index, repeat copy) per sample (splitmix64-style
    mixing).

    Augmentation draws come from these, not from a global RNG: the same image gets the same
    crop in epoch e whichever rank, worker or resumed process loads it, so 1 and N ranks
    (and a resumed run) see identical batches. `repeat` tells apart the copies of an image
    that repeated augmentation puts in one epoch (0 for the first: the hash is unchanged)."""
    m = (1 << 62) - 1
    if isinstance(repeat, torch.Tensor):
        repeat = repeat.long()
    z = (index.long() * 0x9E3779B1 + epoch * 0x85EBCA77 + seed * 0xC2B2AE3D
         + repeat * 0x165667B1 + 0x27D4EB2F) & m
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
