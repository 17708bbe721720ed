"""Datasets by name. Every dataset yields (uint8 CHW image, int label).

In-memory datasets (digits, MNIST, CIFAR, synthetic) are one uint8 tensor: a batch is one
indexing operation (`__getitems__`), with batched augmentation, no per-sample Python.
Folder datasets (imagefolder, filelist) decode JPEG/PNG straight to uint8 tensors with
torchvision.io and augment with transforms v2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ffdist.data import transforms as T
from ffdist.errors import DataError
from ffdist.recipe import DataConfig

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class DataSpec:
    train: Dataset
    val: Dataset
    classes: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_image_size: int | None = None   # folders: the eval crop when it differs (FixRes)
    eval_resize_size: int | None = None  # folders: the short side before that crop

    @property
    def eval_size(self) -> int:
        return self.eval_image_size or self.image_size


Key = "int | tuple[int, int] | tuple[int, int, int]"
"""A sample key: an index (eval), or (epoch, index[, repeat]) from the TrainSampler, which
seeds the sample's augmentation (ffdist.data.transforms.sample_seeds); `repeat` numbers the
copies of an image under repeated augmentation."""


def _split_keys(keys: list) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(epoch, indices, repeat copies) of a batch of keys (all of one epoch)."""
    if keys and isinstance(keys[0], tuple):
        idx = torch.as_tensor([k[1] for k in keys], dtype=torch.long)
        rep = torch.as_tensor([k[2] if len(k) > 2 else 0 for k in keys], dtype=torch.long)
        return keys[0][0], idx, rep
    idx = torch.as_tensor(keys, dtype=torch.long)
    return 0, idx, torch.zeros_like(idx)


class TensorImages(Dataset):
    """Images held in memory as one uint8 NCHW tensor. Crop and flip run batched; the
    per-sample transforms (policy, erasing: torchvision draws one set of parameters per
    call) run image by image, each seeded with its own sample seed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pad: int = 0,
                 flip: bool = False, seed: int = 0, sample_tf: tuple[Callable, ...] = ()):
        assert images.dtype == torch.uint8 and images.dim() == 4
        self.images, self.labels = images, labels.long()
        self.pad, self.flip, self.seed, self.sample_tf = pad, flip, seed, sample_tf

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([key])
        return x[0], int(y[0])

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, idx, rep = _split_keys(keys)
        images = self.images[idx]
        if self.pad or self.flip or self.sample_tf:
            seeds = T.sample_seeds(self.seed, epoch, idx, rep)
            if self.pad or self.flip:
                images = T.batch_crop_flip(images, self.pad, self.flip, seeds)
            if self.sample_tf:
                images = T.per_sample(images, seeds, self.sample_tf)
        return images, self.labels[idx]


class FileImages(Dataset):
    """(path, label) pairs decoded with torchvision.io to uint8 tensors.

    Unreadable files (truncated, corrupt, not an image) follow data.bad_images: `error`
    raises a DataError naming the file; `skip` returns None for the sample (the collate
    drops it, so that batch is smaller), warns once per file (the first 10 files), and
    fails once more than max_bad_fraction of the split has proven unreadable. Files are
    found bad when read, not by a scan up front (that would decode a whole ImageNet before
    step 1); with data.num_workers > 0 each worker process counts its own share.
    """

    WARN_FILES = 10

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, channels: int,
                 seed: int = 0, bad_images: str = "skip", max_bad_fraction: float = 0.01,
                 split: str = "train"):
        self.samples, self.transform, self.channels = samples, transform, channels
        self.seed = seed
        self.bad_images, self.max_bad_fraction, self.split = bad_images, max_bad_fraction, split
        self.bad: dict[str, str] = {}  # path -> why it could not be read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        epoch, idx, rep = _split_keys([key])
        path, label = self.samples[int(idx[0])]
        try:
            image = decode(path, self.channels)
        except (RuntimeError, OSError, ValueError) as e:  # torchvision.io on broken files
            return self._unreadable(path, e)  # type: ignore[return-value]
        # transforms v2 draw from torch's global CPU RNG: seed it per sample, restore it
        # after. default_generator only: torch.manual_seed also seeds every accelerator,
        # ~0.5 ms per image here (about 6% of decode + augment).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(T.sample_seeds(self.seed, epoch, idx, rep)[0]))
            return self.transform(image), label


    def _unreadable(self, path: str, e: Exception) -> None:
        reason = decode_error(e)
        if self.bad_images == "error":
            raise DataError(f"{path}: cannot be decoded as an image ({reason}); replace or "
                            "remove the file, or set data.bad_images=skip to skip such files.")
        if path in self.bad:
            return None
        self.bad[path] = reason
        n, limit = len(self.bad), self.max_bad_fraction * len(self.samples)
        if n > limit:
            raise DataError(f"{n} of {len(self.samples)} {self.split} images cannot be decoded "
                            f"(more than data.max_bad_fraction={self.max_bad_fraction}), e.g. "
                            f"{path} ({reason}); replace or remove them, or raise "
                            "data.max_bad_fraction.")
        if n <= self.WARN_FILES:
            more = "; further ones are skipped silently" if n == self.WARN_FILES else ""
            log.warning("data.bad_images=skip: skipping unreadable %s image %s (%s) [%d so far%s]",
                        self.split, path, reason, n, more)
        return None


def decode(path: str, channels: int = 3) -> torch.Tensor:
    """JPEG/PNG/WebP/GIF file -> uint8 CHW tensor with `channels` channels."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    data = read_file(path)
    webp = bytes(data[:4].tolist()) == b"RIFF" and bytes(data[8:12].tolist()) == b"WEBP"
    # WebP has no grey decoding (torchvision warns on every file): decode RGB, convert below
    mode = ImageReadMode.RGB if channels == 3 or webp else ImageReadMode.GRAY
    return as_uint8_image(decode_image(data, mode=mode), channels)


def as_uint8_image(x: torch.Tensor, channels: int) -> torch.Tensor:
    """decode_image's mode is a request, not a promise: 16-bit PNGs come back as uint16
    (0..65535, which the 0..255 normalization would turn into nonsense), GIF and WebP ignore
    GRAY, and an animated GIF gives its frames (N, C, H, W). Make it uint8 CHW, `channels`."""
    from torchvision.transforms.v2 import functional as F

    if x.dim() == 4:
        x = x[0]  # the first frame
    if x.dtype == torch.uint16:
        x = (x.to(torch.int32) // 257).to(torch.uint8)  # 65535 -> 255 exactly
    elif x.dtype != torch.uint8:
        raise ValueError(f"decoded to {x.dtype}, not 8 or 16 bits per channel")
    if x.shape[0] in (2, 4):
        x = x[: x.shape[0] - 1]  # drop alpha
    if x.shape[0] == 3 and channels == 1:
        x = F.rgb_to_grayscale(x)
    elif x.shape[0] == 1 and channels == 3:
        x = x.expand(3, -1, -1).contiguous()
    return x


def decode_error(e: Exception) -> str:
    """Why a file could not be decoded, in whole words: torchvision's message without the
    C++ source location it starts with, nor its advice about AVIF/HEIC."""
    from ffdist.errors import shorten

    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)
    if text.startswith("Unsupported image file"):
        return "not a JPEG, PNG, WebP or GIF image"
    if text.startswith("Expected a non empty file"):
        return "the file is empty"
    return shorten(text, 160)


def collate(batch: object) -> object:
    """Batches from `__getitems__` arrive already stacked; per-sample lists get stacked."""
    if isinstance(batch, tuple):
        return batch
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]  # None: an unreadable file skipped
    if not kept:
        raise DataError(f"all {len(batch)} images of a batch are unreadable; check the dataset "
                        "files (data.bad_images=skip skipped them).")
    return default_collate(kept)


# ------------------------------------------------------------------------------ builders

def _digits(cfg: DataConfig, seed: int) -> DataSpec:
    from ffdist.data import digits

    pixels, target = digits.load()
    images = torch.from_numpy(pixels)[:, None]
    labels = torch.from_numpy(target)
    # A fixed split (not the training seed): every run and every rank sees the same val set.
    tr, va = (torch.tensor(ix) for ix in digits.split(target, cfg.val_fraction))
    mean, std = T.normalization("digits", 1)
    # Shifts of up to one pixel; never flips (a mirrored 2 is not a 2).
    train = TensorImages(images[tr], labels[tr], pad=1 if cfg.augment else 0, seed=seed,
                         sample_tf=T.sample_transforms(cfg, mean, std))
    return DataSpec(train, TensorImages(images[va], labels[va]),
                    [str(c) for c in range(10)], 1, 8, mean, std)


def _torchvision(cfg: DataConfig, seed: int) -> DataSpec:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[cfg.name]
    from ffdist.data.presence import torchvision_root

    root = torchvision_root(cfg)
    try:
        train = cls(root, train=True, download=cfg.download)
        val = cls(root, train=False, download=cfg.download)
    except RuntimeError as e:
        if cfg.download:
            raise DataError(f"data.name={cfg.name}: download into {root} failed ({e}); check "
                            "the network, or put the files there by hand.") from None
        raise DataError(f"data.root={root}: no {cfg.name} files there; set data.download=true "
                        f"(needs a network) or data.root to the folder that holds them.") from None

    def as_tensor(ds: object) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(ds.data)  # type: ignore[attr-defined]
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # NHWC (CIFAR) -> NCHW
        return x.contiguous().to(torch.uint8), torch.as_tensor(ds.targets)  # type: ignore[attr-defined]

    (xt, yt), (xv, yv) = as_tensor(train), as_tensor(val)
    cifar = cfg.name.startswith("cifar")
    aug = cfg.augment and cifar  # MNIST-like digits must not be flipped
    mean, std = T.normalization(cfg.name, xt.shape[1])
    return DataSpec(TensorImages(xt, yt, pad=4 if aug else 0, flip=aug, seed=seed,
                                 sample_tf=T.sample_transforms(cfg, mean, std)),
                    TensorImages(xv, yv),
                    list(train.classes), xt.shape[1], xt.shape[-1], mean, std)


def _synthetic(cfg: DataConfig, seed: int, num_classes: int, channels: int) -> DataSpec:
    size = cfg.image_size or 32
    g = torch.Generator().manual_seed(seed)
    # 256 distinct images cycled: enough for throughput, little memory at 224x224.
    distinct = torch.randint(0, 256, (min(256, cfg.synthetic_size), channels, size, size),
                             dtype=torch.uint8, generator=g)
    images = distinct.repeat(-(-cfg.synthetic_size // len(distinct)), 1, 1, 1)
    images = images[: cfg.synthetic_size]
    labels = torch.randint(0, num_classes, (cfg.synthetic_size,), generator=g)
    n_val = max(1, int(cfg.synthetic_size * cfg.val_fraction))
    mean, std = T.normalization("synthetic", channels)
    val = images[:n_val]
    if cfg.eval_image_size and cfg.eval_image_size != size:  # a recipe evaluating larger
        val = torch.randint(0, 256, (n_val, channels, cfg.eval_image_size, cfg.eval_image_size),
                            dtype=torch.uint8, generator=g)
    return DataSpec(TensorImages(images[n_val:], labels[n_val:]), TensorImages(val, labels[:n_val]),
                    [str(c) for c in range(num_classes)], channels, size, mean, std,
                    eval_image_size=cfg.eval_image_size)


def _scan_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; an imagefolder root holds train/ "
                        "and val/, each with one sub-folder per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data.root: {root} has no class folders; put each class's images in "
                        f"{root}/<class name>/.")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"data.root: class folder {root / name} holds no .jpg/.png images; "
                            "add images or remove the folder.")
        samples += [(f, label) for f in files]
    return samples, classes


def _imagefolder(cfg: DataConfig, channels: int, seed: int) -> DataSpec:
    if not cfg.root:
        raise DataError("data.root is not set; imagefolder needs a folder with train/ and val/.")
    root = Path(cfg.root)
    train, classes = _scan_folder(root / "train")
    val, val_classes = _scan_folder(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        diff = "; ".join(f"only in {root / split}: {', '.join(names[:5])}"
                         + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                         for split, names in (("train", only_train), ("val", only_val)) if names)
        raise DataError(f"data.root: {root / 'train'} and {root / 'val'} must hold the same "
                        f"class folders ({diff}); add or remove folders so that they match.")
    return _files_spec(cfg, train, val, classes, channels, seed)


def _read_list(path: Path, root: Path, sep: str) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DataError(f"data.train_list/val_list: {path} does not exist; give a text file of "
                        f"'relative/path{sep}label' lines.")
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, _, label = line.rpartition(sep)
        if not rel or not label.strip().lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: {line!r} is not 'relative/path{sep}label' "
                            f"(data.list_sep={sep!r}); fix the line or the separator.")
        samples.append((str(root / rel.strip()), int(label)))
    return samples


def _filelist(cfg: DataConfig, channels: int, num_classes: int, seed: int) -> DataSpec:
    if not (cfg.train_list and cfg.val_list):
        raise DataError("data.train_list and data.val_list must both be set for "
                        "data.name=filelist.")
    root = Path(cfg.root or ".")
    train = _read_list(Path(cfg.train_list), root, cfg.list_sep)
    val = _read_list(Path(cfg.val_list), root, cfg.list_sep)
    classes = list(cfg.classes) or [str(i) for i in range(num_classes)]
    for name, samples in (("data.train_list", train), ("data.val_list", val)):
        bad = [lab for _, lab in samples if not 0 <= lab < len(classes)]
        if bad:
            raise DataError(f"{name}: label {bad[0]} is out of range for {len(classes)} classes; "
                            "labels run from 0 to num_classes-1 (model.num_classes, "
                            "data.classes).")
    return _files_spec(cfg, train, val, classes, channels, seed)


def _files_spec(cfg: DataConfig, train: list, val: list, classes: list[str],
                channels: int, seed: int) -> DataSpec:
    size = cfg.image_size or 224
    eval_size = cfg.eval_image_size or size
    mean, std = T.normalization("imagenet", channels)
    interp = cfg.interpolation
    train_tf = T.folder_train(size, interp, T.sample_transforms(cfg, mean, std)) if cfg.augment \
        else T.folder_eval(size, interp=interp)
    val_tf = T.folder_eval(eval_size, cfg.eval_resize_size, interp)
    bad = {"bad_images": cfg.bad_images, "max_bad_fraction": cfg.max_bad_fraction}
    return DataSpec(FileImages(train, train_tf, channels, seed, split="train", **bad),
                    FileImages(val, val_tf, channels, split="val", **bad),
                    classes, channels, size, mean, std, cfg.eval_image_size, cfg.eval_resize_size)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder",
            "filelist", "synthetic")


IN_MEMORY = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")


def _check_sizes(cfg: DataConfig) -> None:
    """In-memory datasets train and evaluate at their native size: an eval size would be a
    silent no-op there."""
    if cfg.name not in IN_MEMORY:
        return
    for key in ("eval_image_size", "eval_resize_size"):
        if getattr(cfg, key) is not None:
            raise DataError(f"data.{key}={getattr(cfg, key)} applies to folder datasets "
                            f"(imagefolder, filelist); data.name={cfg.name} is evaluated at its "
                            "native size. Remove the key.")


def build_datasets(cfg: DataConfig, seed: int, num_classes: int, channels: int) -> DataSpec:
    """The train/val datasets a recipe names, checked against the model's classes/channels."""
    _check_sizes(cfg)
    if cfg.name == "digits":
        spec = _digits(cfg, seed)
    elif cfg.name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        spec = _torchvision(cfg, seed)
    elif cfg.name == "synthetic":
        spec = _synthetic(cfg, seed, num_classes, channels)
    elif cfg.name == "imagefolder":
        spec = _imagefolder(cfg, channels, seed)
    elif cfg.name == "filelist":
        spec = _filelist(cfg, channels, num_classes, seed)
    else:
        import difflib

        close = difflib.get_close_matches(cfg.name, DATASETS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(DATASETS)}."
        raise DataError(f"data.name={cfg.name!r} is not a dataset; {hint}")
    if len(spec.classes) != num_classes:
        raise DataError(f"model.num_classes={num_classes} but data.name={cfg.name} has "
                        f"{len(spec.classes)} classes; set model.num_classes={len(spec.classes)}.")
    if spec.channels != channels:
        raise DataError(f"model.in_channels={channels} but data.name={cfg.name} images have "
                        f"{spec.channels} channel(s); set model.in_channels={spec.channels}.")
    return spec
