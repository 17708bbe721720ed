"""The map-style datasets the sources build on. Every dataset yields (uint8 CHW image,
int label).

`TensorImages`: images in memory as one uint8 tensor (digits, MNIST, CIFAR, synthetic): a
batch is one indexing operation (`__getitems__`), with batched augmentation, no per-sample
Python. `FileImages`: (path, label) pairs (image folders, file lists) decoded to uint8
tensors (`decode`: the header's pixel count checked first, ffdist.data.decode_limits),
augmented with transforms v2; on the box path (its transform a box sampler of
ffdist.data.boxes: data.decode=gpu | boxes) a sample is its bytes and crop box instead
(ffdist.data.encoded), decoded later on the device.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from ffdist.data import decode_limits
from ffdist.data import transforms as T
from ffdist.data.boxes import EvalBoxes, TrainBoxes
from ffdist.errors import DataError
from ffdist.recipe import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


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

    Unreadable files (truncated, corrupt, not an image, or more pixels than
    data.max_image_pixels) follow data.bad_images: `error` raises a DataError naming the
    file; `skip` returns None for the sample (the collate
    drops it, so that batch is smaller), warns once per file (the first 10 files), and
    fails once more than max_bad_fraction of the split has proven unreadable. Files are
    found bad when read, not by a scan up front (that would decode a whole ImageNet before
    step 1); with data.num_workers > 0 each worker process counts its own share.
    """

    WARN_FILES = 10

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, channels: int,
                 seed: int = 0, bad_images: str = "skip", max_bad_fraction: float = 0.01,
                 split: str = "train", max_pixels: int = MAX_IMAGE_PIXELS,
                 total: int | None = None):
        self.samples, self.transform, self.channels = samples, transform, channels
        self.total = len(samples) if total is None else total  # the split's size
        self.seed, self.max_pixels = seed, max_pixels
        self.bad_images, self.max_bad_fraction, self.split = bad_images, max_bad_fraction, split
        self.bad: dict[str, str] = {}  # path -> why it could not be read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        epoch, idx, rep = _split_keys([key])
        path, label = self.samples[int(idx[0])]
        try:
            data = read_bytes(path)
        except (RuntimeError, OSError, ValueError) as e:  # missing, unreadable, empty
            return self._unreadable(path, e)  # type: ignore[return-value]
        return self.item(key, data, path, label)  # type: ignore[return-value]

    def item(self, key: Key, data: torch.Tensor, name: str,
             label: int) -> tuple[torch.Tensor, int] | None:
        """The encoded image `data` (1-D uint8: a file's bytes, or a tar member's) decoded and
        transformed as sample `key`; None when it cannot be decoded (data.bad_images=skip).
        `name` says which file it was, in messages."""
        epoch, idx, rep = _split_keys([key])
        if isinstance(self.transform, (TrainBoxes, EvalBoxes)):  # the box path
            return self._boxed(int(T.sample_seeds(self.seed, epoch, idx, rep)[0]), data, name,
                               label)
        try:
            image = decode_bytes(data, self.channels, self.max_pixels)
        except (RuntimeError, OSError, ValueError) as e:  # broken, foreign or too large
            return self._unreadable(name, e)
        # transforms v2 draw from torch's global CPU RNG: seed it per sample, restore it
        # after. default_generator only: torch.manual_seed also seeds every accelerator,
        # ~0.5 ms per image here (about 6% of decode + augment).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(T.sample_seeds(self.seed, epoch, idx, rep)[0]))
            return self.transform(image), label

    def _boxed(self, seed: int, data: torch.Tensor, name: str, label: int) -> object:
        """The box path's sample (ffdist.data.encoded): the bytes and the crop box of a JPEG
        a GPU decoder takes, else (PNG, progressive, grey, CMYK, EXIF-rotated) the image
        decoded and cropped here, as data.decode=cpu decodes it. The pixel limit applies
        here, before anything leaves the worker; None when unreadable (data.bad_images)."""
        from ffdist.data import boxes
        from ffdist.data.encoded import BoxSpec, EncodedSample, HostSample

        sampler: TrainBoxes | EvalBoxes = self.transform  # type: ignore[assignment]
        spec = BoxSpec(sampler.size, self.channels, self.bad_images, self.max_bad_fraction,
                       self.total, self.split)
        try:
            header = decode_limits.check(memoryview(data.numpy()), self.max_pixels)
            if not header.host_only:
                box, flip = sampler.draw(seed, header.height, header.width)
                return EncodedSample(data, box, flip, header.height, header.width, label, name,
                                     spec)
            image = decode_bytes(data, self.channels, self.max_pixels)
        except (RuntimeError, OSError, ValueError) as e:  # broken, foreign or too large
            return self._unreadable(name, e)
        box, flip = sampler.draw(seed, image.shape[-2], image.shape[-1])
        return HostSample(boxes.crop_one(image, box, flip, sampler.size), label, name,
                          header.host_only, spec)

    def _unreadable(self, path: str, e: Exception | str) -> None:
        if isinstance(e, decode_limits.TooManyPixels):
            reason = e.describe("data.max_image_pixels")
            if self.bad_images == "error":
                raise DataError(f"{path}: not decoded: {reason}; resize or remove the file, or "
                                "set data.bad_images=skip to skip such files (or raise "
                                "data.max_image_pixels if images this large are expected).")
        else:
            reason = e if isinstance(e, str) else decode_error(e)
        if self.bad_images == "error":
            raise DataError(f"{path}: cannot be decoded as an image ({reason}); replace or "
                            "remove the file, or set data.bad_images=skip to skip such files.")
        if path in self.bad:
            return None
        self.bad[path] = reason
        n, limit = len(self.bad), self.max_bad_fraction * self.total
        if n > limit:
            raise DataError(f"{n} of {self.total} {self.split} images cannot be decoded "
                            f"(more than data.max_bad_fraction={self.max_bad_fraction}), e.g. "
                            f"{path} ({reason}); replace or remove them, or raise "
                            "data.max_bad_fraction.")
        if n <= self.WARN_FILES:
            more = "; further ones are skipped silently" if n == self.WARN_FILES else ""
            log.warning("data.bad_images=skip: skipping unreadable %s image %s (%s) [%d so far%s]",
                        self.split, path, reason, n, more)
        return None


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (what decode_bytes takes)."""
    from torchvision.io import read_file

    return read_file(path)


def decode(path: str, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An image file -> uint8 CHW tensor with `channels` channels (decode_bytes)."""
    return decode_bytes(read_bytes(path), channels, max_pixels)


def decode_bytes(data: torch.Tensor, channels: int = 3,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An encoded image (1-D uint8 tensor: a file's bytes or a tar shard member's) -> uint8
    CHW tensor with `channels` channels. Every training, eval and predict decode of an
    encoded image comes through here: image folders, file lists and tar shards. Its header
    is read first (ffdist.data.decode_limits): more than `max_pixels` pixels, or no header
    of a format ffdist reads, raise a ValueError before any decoder allocates. JPEG and WebP
    are decoded by torchvision.io; PNG, GIF (first frame), BMP and TIFF (first page) by
    Pillow (ffdist.data.decode_limits says why)."""
    from torchvision.io import ImageReadMode, decode_image

    header = decode_limits.check(memoryview(data.numpy()), max_pixels)
    if not header.by_torchvision:
        return as_uint8_image(_pillow_decode(memoryview(data.numpy()), channels), channels)
    # WebP has no grey decoding (torchvision warns on every file): decode RGB, convert below
    mode = ImageReadMode.GRAY if channels == 1 and header.format != "WEBP" else ImageReadMode.RGB
    return as_uint8_image(decode_image(data, mode=mode), channels)


def _pillow_decode(data: memoryview, channels: int) -> torch.Tensor:
    """The first frame (page) of an image through Pillow, as uint8 CHW."""
    import io

    import numpy as np
    from PIL import Image

    with io.BytesIO(data) as fp:
        image = decode_limits.open_lazy(fp)  # the header again: no pixel threshold of Pillow's
        if image.mode.startswith("I"):  # 16-bit grey: 65535 -> 255, as for torchvision's
            arr = (np.asarray(image).astype(np.int64).clip(0, 65535) // 257).astype(np.uint8)
            image = Image.fromarray(arr)
        mode = "L" if channels == 1 else "RGB"
        arr = np.array(image if image.mode == mode else image.convert(mode))  # one copy
    x = torch.from_numpy(arr)
    # HWC in memory, a CHW view: as torchvision.io decodes (torch's uint8 antialiased resize
    # fails an internal assert on some plain-contiguous tiny images, e.g. 3x2x2 -> 1x1)
    return x[None] if x.dim() == 2 else x.permute(2, 0, 1)


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
        return f"not a {decode_limits.KINDS} image"
    if text.startswith("Expected a non empty file"):
        return "the file is empty"
    return shorten(text, 160)


def collate(batch: object) -> object:
    """Batches from `__getitems__` arrive already stacked; per-sample lists get stacked.
    None when every image of the batch was skipped as unreadable: the stream decides
    (ffdist.data.mapstyle: eval runs an empty batch, training stops)."""
    if isinstance(batch, tuple):
        return batch
    from torch.utils.data import default_collate

    from ffdist.data import encoded

    kept = [b for b in batch if b is not None]  # None: an unreadable file skipped
    if kept and isinstance(kept[0], (encoded.EncodedSample, encoded.HostSample)):
        return encoded.collate(kept)  # the box path: bytes and boxes (ffdist.data.encoded)
    return default_collate(kept) if kept else None
