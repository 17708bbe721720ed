"""Writing a dataset as tar shards in the WebDataset layout, and checking what was written
(`ffdist shard`).

A sample is two members, `KEY.cls` (the label, decimal) and `KEY.jpg` / `.png` / ... (the
image's bytes), KEY its index in the split's written order (8 digits). Files are copied as
they are, unless pre-resizing caps their longest side (then re-encoded as JPEG); images
held in memory (digits, MNIST, CIFAR) are encoded as PNG, losslessly. Member headers carry
no time or owner, so the same input and options write the same bytes.

Shards are planned before anything is written (so that writer processes can each write
whole shards, numbered in order): by sample count, or by size, from the files' sizes or,
for images that get encoded, from the mean size of a few encoded first. Every image is
decoded once while written (`open_image`: Pillow; JPEGs at reduced scale, which still
reads every byte), so that an unreadable one is found here, not mid-training.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffdist.data import decode_limits, tars
from ffdist.data.shard_index import ShardInfo, encode_spans
from ffdist.errors import DataError
from ffdist.recipe import MAX_IMAGE_PIXELS

MEMBER_OVERHEAD = 2048  # two headers, the label's block, padding: bytes a sample adds
FIELDS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}


@dataclass(frozen=True)
class Options:
    shard_bytes: int | None = 256_000_000
    shard_samples: int | None = None
    max_size: int | None = None          # cap on the longest side (pre-resize), pixels
    quality: int = 90                    # JPEG quality of re-encoded images
    workers: int = 1
    skip_bad: bool = False
    seed: int = 0                        # the train split's write-time shuffle


@dataclass
class Split:
    """What one split is written from: files (`paths`), or uint8 C x H x W images held in
    memory (`images`, indexable), and a label for each."""

    name: str
    labels: list[int]
    paths: list[str] | None = None
    images: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"{self.name} image {i}"


@dataclass
class Written:
    """One shard as written: what its index row and its verification need."""

    split: str
    name: str
    starts: list[int]                    # each sample's offset, then the end of the last
    labels: list[int]
    keys: list[str]
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    sha256: str | None = None

    def info(self, folder: Path) -> ShardInfo:
        first, spans = encode_spans(self.starts) if self.labels else (0, None)
        return ShardInfo(str(folder / self.name), len(self.labels), self.bytes, first, spans,
                         self.sha256)


class BadImage(Exception):
    """An image that cannot be read or decoded: the reason."""


# ------------------------------------------------------------------------------ one sample

def open_image(data: bytes, at_least: int = 1) -> Any:
    """Decode an encoded image with Pillow (the one decode `ffdist shard` does). A JPEG is
    decoded at the smallest scale (1/2 .. 1/8) that keeps both sides >= `at_least`, which
    still reads every byte (a truncated file fails); `info["size"]` is its full size."""

    try:  # the header first: a decompression bomb is a bad image, never decoded
        decode_limits.check(memoryview(data), MAX_IMAGE_PIXELS)
    except ValueError as e:
        raise BadImage(e.describe("data.max_image_pixels") if isinstance(
            e, decode_limits.TooManyPixels) else " ".join(str(e).split())) from None
    try:
        image = decode_limits.open_lazy(io.BytesIO(data))
        size = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (at_least, at_least))
        image.load()
        image.info["size"] = size
        return image
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...)
        raise BadImage(" ".join(str(e).split()) or type(e).__name__) from None


def _reencoded(image: Any, opts: Options) -> bytes:
    from PIL import Image

    image.thumbnail((opts.max_size, opts.max_size), Image.Resampling.BICUBIC)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=opts.quality)
    return out.getvalue()


def encode(split: Split, i: int, opts: Options) -> tuple[str, bytes]:
    """(field, bytes) of sample i: the file as it is, or re-encoded when pre-resized."""
    if split.paths is not None:
        try:
            data = Path(split.paths[i]).read_bytes()
        except OSError as e:
            raise BadImage(tars.reason(e)) from None
        image = open_image(data, opts.max_size or 1)
        if opts.max_size is not None and max(image.info["size"]) > opts.max_size:
            return "jpg", _reencoded(image, opts)
        if image.format in FIELDS:
            return FIELDS[image.format], data
        return "png", _png(image)  # a format the loaders do not decode (BMP, TIFF)
    return _from_array(split.images[i], opts)


def _from_array(array: Any, opts: Options) -> tuple[str, bytes]:
    from PIL import Image

    pixels = array.numpy() if hasattr(array, "numpy") else array
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    if opts.max_size is not None and max(image.size) > opts.max_size:
        return "jpg", _reencoded(image, opts)
    return "png", _png(image)


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------ planning

def order(split: Split, opts: Options) -> list[int]:
    """The split's samples in written order: train shuffled (seeded), so that every shard
    holds every class; val as the source lists it."""
    idx = list(range(len(split)))
    if split.name == "train":
        random.Random(opts.seed).shuffle(idx)
    return idx


def plan(split: Split, idx: list[int], opts: Options) -> list[list[int]]:
    """The samples of each shard, in order."""
    if opts.shard_samples:
        n = opts.shard_samples
        return [idx[i:i + n] for i in range(0, len(idx), n)]
    sizes = _estimated_sizes(split, idx, opts)
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in zip(idx, sizes):
        if shards[-1] and used + size > opts.shard_bytes:  # type: ignore[operator]
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return [s for s in shards if s]


def _estimated_sizes(split: Split, idx: list[int], opts: Options) -> list[int]:
    if split.paths is not None and opts.max_size is None:
        return [os.path.getsize(split.paths[i]) + MEMBER_OVERHEAD if os.path.exists(
            split.paths[i]) else MEMBER_OVERHEAD for i in idx]
    probe = idx[:: max(1, len(idx) // 16)][:16]  # encode a few, evenly spread
    sizes = []
    for i in probe:
        try:
            sizes.append(len(encode(split, i, opts)[1]))
        except BadImage:
            pass
    mean = sum(sizes) // max(1, len(sizes))
    return [mean + MEMBER_OVERHEAD] * len(idx)


# ------------------------------------------------------------------------------ writing

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(split: Split, name: str, folder: Path, samples: list[int], first_key: int,
                opts: Options) -> Written:
    """Write one shard; an unreadable image stops it (DataError) or, with skip_bad, is left
    out and listed in `bad`."""
    out = Written(split.name, name, [], [], [])
    with open(folder / name, "wb") as f:
        tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)
        for k, i in enumerate(samples):
            try:
                kind, data = encode(split, i, opts)
            except BadImage as e:
                if not opts.skip_bad:
                    raise DataError(f"{split.describe(i)} cannot be read as an image ({e}); "
                                    "replace or remove it, or add --skip-bad to leave such "
                                    "images out (nothing was written).") from None
                out.bad.append((split.describe(i), str(e)))
                continue
            key = f"{first_key + k:08d}"
            out.starts.append(tar.offset)
            _add(tar, f"{key}.cls", str(split.labels[i]).encode())
            _add(tar, f"{key}.{kind}", data)
            out.labels.append(split.labels[i])
            out.keys.append(key)
        out.starts.append(tar.offset)
        tar.close()
        f.flush()
        os.fsync(f.fileno())
        out.bytes = f.tell()
    return out


# ------------------------------------------------------------------------------ checking

class _Hashing:
    """A file read through, hashed as it goes (the verification reads every byte once)."""

    def __init__(self, f: Any):
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


def verify(folder: Path, shard: Written) -> Written:
    """Read the shard back (straight through, as a stream reader would): every sample's
    member names, label and offset, the count, the size; set its sha256. DataError on any
    difference."""
    path = folder / shard.name

    def fail(what: str) -> DataError:
        return DataError(f"verification of {path} failed: {what}; nothing was kept (a disk "
                         "or file-system fault?); run `ffdist shard` again.")

    with open(path, "rb") as f:
        stream = _Hashing(f)
        try:
            samples = list(tars.walk(tars.open_tar(stream), want=lambda p: True))  # type: ignore[arg-type]
        except tars.Unreadable as e:
            raise fail(str(e)) from None
        while stream.read(1 << 20):
            pass
    if len(samples) != len(shard.labels):
        raise fail(f"{len(samples)} samples, {len(shard.labels)} written")
    for s, key, label, start in zip(samples, shard.keys, shard.labels, shard.starts):
        fields = sorted(s.fields)
        if s.key != key or len(fields) != 2 or "cls" not in fields or tars.image_field(s) is None:
            raise fail(f"sample {s.pos} holds {[f'{s.key}.{x}' for x in fields]}, not "
                       f"{key}.cls and one image")
        if tars.label_of(s, None) != label or s.start != start:
            raise fail(f"sample {key} has label {tars.label_of(s, None)} at offset {s.start}, "
                       f"written {label} at {start}")
    if path.stat().st_size != shard.bytes:
        raise fail(f"{path.stat().st_size} bytes, {shard.bytes} written")
    shard.sha256 = stream.hash.hexdigest()
    return shard


# ------------------------------------------------------------------------------ all of it

_JOB: dict[str, Any] = {}  # what forked writer processes inherit (images held in memory)


def _run(task: tuple[str, str, str, list[int], int]) -> Written:
    what, split_name, name, samples, first_key = task
    split, folder, opts = _JOB["splits"][split_name], _JOB["folder"], _JOB["opts"]
    if what == "write":
        return write_shard(split, name, folder, samples, first_key, opts)
    return verify(folder, _JOB["written"][name])


def write_all(splits: list[Split], folder: Path, opts: Options,
              progress: Callable[[str, int], None]) -> list[Written]:
    """Write and then verify every shard of every split into `folder`; `progress(stage,
    samples)` after each shard. Shards are named SPLIT-NNNNNN.tar."""
    tasks = []
    for split in splits:
        first_key = 0
        for n, samples in enumerate(plan(split, order(split, opts), opts)):
            tasks.append(("write", split.name, f"{split.name}-{n:06d}.tar", samples, first_key))
            first_key += len(samples)
    _JOB.update(splits={s.name: s for s in splits}, folder=folder, opts=opts, written={})
    try:
        written = _map(tasks, opts.workers, lambda w: progress("written", len(w.labels)
                                                               + len(w.bad)))
        _JOB["written"] = {w.name: w for w in written}
        checks = [("verify", w.split, w.name, [], 0) for w in written]
        return _map(checks, opts.workers, lambda w: progress("verified", len(w.labels)))
    finally:
        _JOB.clear()


def _map(tasks: list, workers: int, done: Callable[[Written], None]) -> list[Written]:
    """_run over the tasks, in their order; in forked processes when workers > 1."""
    if workers <= 1 or len(tasks) <= 1:
        out = []
        for t in tasks:
            out.append(_run(t))
            done(out[-1])
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("fork")  # the images in memory are inherited, not sent
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
        futures = [pool.submit(_run, t) for t in tasks]
        for f in as_completed(futures):
            if f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()  # type: ignore[misc]
            done(f.result())
        return [f.result() for f in futures]
