"""Tar shards in the WebDataset layout, read with the standard library (no torch, no
webdataset): where a shard lives (a local path, an http(s) URL, a `pipe:` command), brace
patterns, opening a shard, and the walk that groups a tar's members into samples.

The layout is WebDataset's: a sample is a run of consecutive regular members that share a
key, the member's path up to the first dot of its file name (`n01440764_10026.jpg` and
`n01440764_10026.cls` are sample `n01440764_10026`, fields `jpg` and `cls`, lower-cased);
members named `__*__` (metadata) and anything that is not a file are no sample's. Shards are
plain tar files, not compressed: JPEG and PNG bytes do not compress, and only a plain tar
can be read at a sample's byte offset (ffdist.data.shard_reader).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif")
"""Fields that hold the image (the first one a sample has), as torchvision decodes them."""
TIMEOUT = 60.0
"""Seconds a shard's server may stay silent before a read fails."""
ALLOW_PIPE = "FFDIST_ALLOW_PIPE"
"""The environment variable (=1) that lets `pipe:` shards run their program."""
_META = re.compile(r"__[^/]*__($|/)")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class Unreadable(Exception):
    """A shard (or one of its samples) cannot be read: the reason, in words."""


def expand(spec: str) -> list[str]:
    """The shards a recipe value names: `::`-separated parts, each brace-expanded
    (`train-{000000..000146}.tar`, `{a,b}`), as WebDataset expands its URLs."""
    return [url for part in spec.split("::") if part.strip() for url in _braces(part.strip())]


def _braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if m is None:
        return [text]
    body = m.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:  # zero-padded to the wider end, as braceexpand does
        lo, hi = span.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [url for item in items for url in _braces(text[:m.start()] + item + text[m.end():])]


def kind(url: str) -> str:
    """file | http | pipe."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith(("http://", "https://")):
        return "http"
    return "file"


def local_path(url: str) -> Path:
    return Path(url[len("file:"):] if url.startswith("file:") else url)


def name_of(url: str) -> str:
    """The shard's file name, which an index lists it by: the last path component (of a
    `pipe:` command, of its last word that names a .tar)."""
    if kind(url) == "pipe":
        words = [w for w in url[5:].split() if ".tar" in w] or [url[5:]]
        url = words[-1]
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def pipe_allowed() -> bool:
    """A `pipe:` shard runs a program: only where the run's environment says so, never on
    a recipe's word alone (docs/failure-and-recovery.md, Security)."""
    return os.environ.get(ALLOW_PIPE) == "1"


def open_shard(url: str, timeout: float = TIMEOUT) -> IO[bytes]:
    """A binary stream of the shard's bytes (seekable for a local file). Unreadable with
    the reason when it cannot be opened."""
    try:
        k = kind(url)
        if k == "file":
            return open(local_path(url), "rb")
        if k == "http":
            import urllib.request

            return urllib.request.urlopen(url, timeout=timeout)
        if not pipe_allowed():
            raise Unreadable(f"pipe: shards run a program, which ffdist does only with "
                             f"{ALLOW_PIPE}=1 in the environment")
        return PipeStream(url[5:])
    except (OSError, ValueError) as e:  # ValueError: a command shlex cannot split
        raise Unreadable(reason(e)) from None


def reason(e: BaseException) -> str:
    """An I/O error in a few words (no errno prefix, no traceback)."""
    inner = getattr(e, "reason", None)
    if isinstance(inner, BaseException):  # urllib's URLError around the socket's error
        return reason(inner)
    text = getattr(e, "strerror", None) or inner or str(e) or type(e).__name__
    code = getattr(e, "code", None)
    return f"HTTP {code} {text}" if isinstance(code, int) else " ".join(str(text).split())


class PipeStream:
    """The standard output of a command (WebDataset's `pipe:` shards, e.g. `pipe:curl -s
    URL`), run as an argv list (shlex-split, no shell: no pipes or redirections); closing
    it stops the command, and a command that failed makes the read fail."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if not data and n != 0 and self.proc.wait() != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
            raise Unreadable(f"`{self.command}` exited {self.proc.returncode}"
                             + (f": {err.splitlines()[-1]}" if err else ""))
        return data

    def close(self) -> None:
        self.proc.stdout.close()  # type: ignore[union-attr]
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()  # type: ignore[union-attr]


@dataclass
class Sample:
    """One sample of a shard: its key, position, byte range and fields (bytes of the fields
    that were read; None for those walked past)."""

    key: str
    pos: int
    start: int                         # offset of its first member's header
    end: int = 0                       # end of its last member's data, 512-padded
    wanted: bool = False
    fields: dict[str, bytes | None] = field(default_factory=dict)


def open_tar(stream: IO[bytes]) -> tarfile.TarFile:
    """A TarFile over `stream`: seeking over the data it does not read when the stream is a
    local file, reading straight through otherwise (a URL, a pipe)."""
    seekable = getattr(stream, "seekable", lambda: False)()
    try:
        return tarfile.open(fileobj=stream, mode="r:" if seekable else "r|")  # type: ignore[call-overload]
    except tarfile.TarError as e:
        raise Unreadable(f"not a plain tar file ({e}); shards must be uncompressed .tar") from None


def walk(tar: tarfile.TarFile, want: Callable[[int], bool] = lambda pos: False
         ) -> Iterator[Sample]:
    """The samples of a tar in order, reading the data of those at positions `want` says
    (the rest is skipped: seeked over in a local file). Unreadable on a truncated or
    malformed tar, and on a field that appears twice in one sample."""
    current: Sample | None = None
    try:
        for m in tar:
            tar.members = []  # keep no list of every member: shards hold thousands
            split = _KEY.match(m.name)
            if not m.isreg() or split is None or _META.match(m.name):
                continue
            key, name = split.group(1), split.group(2).lower()
            if current is None or key != current.key:
                if current is not None:
                    yield current
                pos = current.pos + 1 if current is not None else 0
                current = Sample(key, pos, m.offset, wanted=want(pos))
            if name in current.fields:
                raise Unreadable(f"sample {key} has two '{name}' members")
            member = tar.extractfile(m) if current.wanted else None
            current.fields[name] = member.read() if member is not None else None
            current.end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError) as e:
        raise Unreadable(f"truncated or not a tar file ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise Unreadable(reason(e)) from None
    if current is not None:
        yield current


def parse_sample(span: bytes) -> Sample | None:
    """The first sample of `span`, bytes that start at a sample's first header (what the
    index's offsets cut out of a shard). Plain ustar headers, what `ffdist shard` and the
    webdataset package write, are parsed here (a tenth of tarfile's time for a whole
    member); a span with pax or GNU long-name headers goes through tarfile. Unreadable when
    a header's checksum is wrong (the shard changed since it was indexed)."""
    sample: Sample | None = None
    pos = 0
    while pos + tarfile.BLOCKSIZE <= len(span):
        head = span[pos:pos + tarfile.BLOCKSIZE]
        if head.count(0) == tarfile.BLOCKSIZE:
            break  # the end-of-archive blocks
        kind = head[156:157]
        if kind in (b"x", b"g", b"L", b"K") or head[124] & 0x80:  # extended headers, huge
            return next(walk(open_tar(io.BytesIO(span)), want=lambda p: True), None)
        try:
            stored = int(head[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
            size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            stored = size = -1
        if stored != sum(head) - sum(head[148:156]) + 8 * 32:
            raise Unreadable(f"no tar header at the offset the index gives (byte {pos} of the "
                             "sample): the shard changed since it was indexed; index it again")
        name = head[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = head[345:500].split(b"\0", 1)[0] if head[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        split = _KEY.match(name)
        if kind in (b"0", b"\0") and split is not None and not _META.match(name):
            key, field_ = split.group(1), split.group(2).lower()
            if sample is None:
                sample = Sample(key, 0, 0, wanted=True)
            elif key != sample.key:
                break
            if field_ in sample.fields:
                raise Unreadable(f"sample {key} has two '{field_}' members")
            sample.fields[field_] = bytes(span[pos + 512:pos + 512 + size])
            if len(sample.fields[field_]) != size:  # type: ignore[arg-type]
                raise Unreadable(f"truncated: member {name} holds {len(span) - pos - 512} of "
                                 f"its {size} bytes")
        pos += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return sample


def image_field(sample: Sample) -> str | None:
    """The field that holds the image (IMAGE_FIELDS' first that the sample has)."""
    return next((f for f in IMAGE_FIELDS if f in sample.fields), None)


def label_of(sample: Sample, label_key: str | None) -> int:
    """The class label: the `.cls` member (a decimal integer, WebDataset's convention), else
    `label_key` of the `.json` member. Unreadable when neither gives an integer."""
    import json

    try:
        if sample.fields.get("cls") is not None:
            return int(sample.fields["cls"].decode().strip())  # type: ignore[union-attr]
        if label_key and sample.fields.get("json") is not None:
            value = json.loads(sample.fields["json"])[label_key]  # type: ignore[arg-type]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(value)
            return int(value)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    where = f".cls member, nor a '{label_key}' key in its .json" if label_key else \
        ".cls member (set data.label_key to read labels from a .json member)"
    raise Unreadable(f"sample {sample.key} has no integer label: no {where}")
