"""The shard index: the shards of a split, how many samples each holds and where each sample
starts, the classes, and a fingerprint of the set. Torch-free.

`ffdist shard` writes it as `index.json` beside the shards, both splits in one file. A
recipe's shards find theirs in this order: data.shard_index (a path or URL), else the
index.json beside them (the folder data.train_shards names, or the folder / URL directory
of the first shard); a pattern, URL list or `pipe:` command without one is scanned once
when the streams are built (every header read: seeked through in a local file, read whole
from a URL or a pipe), and the log says so and how long it took.

The sample offsets (`first`, and `spans`: base64 of little-endian uint32 byte spans, one per
sample) let a loader read a sample of a local shard with one read at its offset, without a
walk through the shard (ffdist.data.shard_reader). The fingerprint hashes names, counts,
sizes and offsets: a checkpoint keeps it, so that a resume over other shards is told.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import json
import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffdist import outputs
from ffdist.data import tars
from ffdist.errors import DataError

FORMAT, VERSION, INDEX = "ffdist-shards", 1, "index.json"
SPLITS = ("train", "val")


@dataclass
class ShardInfo:
    """One shard: where it is, its samples, its size and its samples' byte offsets."""

    url: str
    samples: int
    bytes: int | None = None
    first: int = 0                 # offset of the first sample's first header
    spans: str | None = None       # base64 uint32 little-endian: each sample's byte span
    sha256: str | None = None

    @property
    def name(self) -> str:
        return tars.name_of(self.url)

    def starts(self) -> list[int]:
        """samples + 1 offsets: where each sample starts, then where the last one ends."""
        if self.spans is None:
            raise ValueError(f"{self.url}: the index has no sample offsets")
        spans = array("I")
        spans.frombytes(base64.b64decode(self.spans))
        if sys.byteorder != "little":
            spans.byteswap()
        return list(itertools.accumulate(spans, initial=self.first))

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "samples": self.samples, "bytes": self.bytes,
               "first": self.first, "spans": self.spans}
        return out | ({"sha256": self.sha256} if self.sha256 else {})


def encode_spans(starts: list[int]) -> tuple[int, str]:
    """(first, spans) of samples + 1 offsets, as the index stores them."""
    spans = array("I", (b - a for a, b in zip(starts, starts[1:])))
    if sys.byteorder != "little":
        spans.byteswap()
    return starts[0], base64.b64encode(spans.tobytes()).decode()


@dataclass
class ShardSet:
    """The shards of one split, in the order the recipe (or the index) lists them: sample
    `i` of the split is position i - bounds[s] of shard s."""

    split: str
    shards: list[ShardInfo]
    classes: list[str] | None = None
    origin: str = ""               # the index it came from, or "scan"
    bounds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.bounds = list(itertools.accumulate((s.samples for s in self.shards), initial=0))

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def scanned(self) -> bool:
        return self.origin == "scan"

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, position in it) of the split's sample i."""
        s = bisect.bisect_right(self.bounds, i) - 1
        return s, i - self.bounds[s]

    def fingerprint(self) -> str:
        rows = [[s.name, s.samples, s.bytes, s.first, s.spans] for s in self.shards]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ finding it

def is_folder(spec: str) -> bool:
    """A recipe value that names one local folder (of `ffdist shard`'s output)."""
    return tars.kind(spec) == "file" and "::" not in spec and "{" not in spec and \
        tars.local_path(spec).is_dir()


def location(spec: str, index: str | None) -> str | None:
    """Where the index of `spec`'s shards would be: data.shard_index, else index.json beside
    them; None for a `pipe:` command without data.shard_index."""
    if index:
        return index
    if is_folder(spec):
        return str(tars.local_path(spec) / INDEX)
    first = tars.expand(spec)[0]
    if tars.kind(first) == "pipe":
        return None
    if tars.kind(first) == "http":
        return first.rsplit("/", 1)[0] + "/" + INDEX
    return str(tars.local_path(first).parent / INDEX)


class Unreachable(DataError):
    """The server of an index URL does not answer."""


def read(where: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """The index at `where` (a path or URL); None when there is none; DataError when it is
    unreadable or not an ffdist shard index (Unreachable: its server does not answer)."""
    try:
        if tars.kind(where) == "http":
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(where, timeout=timeout) as r:
                    text = r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise
            except OSError as e:  # refused, timed out, no such host
                raise Unreachable(f"shard index {where} cannot be reached ({tars.reason(e)}, "
                                  f"{timeout:.0f} s timeout); check the server and the URL.") \
                    from None
        else:
            path = tars.local_path(where)
            if not path.is_file():
                return None
            text = path.read_text()
        raw = json.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"shard index {where} cannot be read ({tars.reason(e)}); write it again "
                        "with `ffdist shard`, or remove it to have the shards scanned.") from None
    ok = isinstance(raw, dict) and raw.get("format") == FORMAT and isinstance(raw.get("splits"),
                                                                              dict)
    if not ok or raw.get("version", 0) > VERSION:
        raise DataError(f"{where} is not a shard index this ffdist reads (format {FORMAT} "
                        f"version {VERSION}); write it again with `ffdist shard`, or remove it "
                        "to have the shards scanned.")
    return raw


def _info(url: str, row: dict[str, Any]) -> ShardInfo:
    return ShardInfo(url, int(row["samples"]), row.get("bytes"), int(row.get("first", 0)),
                     row.get("spans"), row.get("sha256"))


def load(spec: str, split: str, index: str | None = None, key: str = "data.train_shards",
         timeout: float = 10.0) -> ShardSet:
    """The shards `spec` names (a recipe value) with their counts: from the index, or by a
    scan of every shard when there is none. DataError when the index does not list them."""
    where = location(spec, index)
    raw = read(where, timeout) if where else None
    classes = raw.get("classes") if raw else None
    if is_folder(spec):
        rows = (raw or {}).get("splits", {}).get(split)
        if raw is None or rows is None:
            what = f"has no {INDEX}" if raw is None else f"'s {INDEX} has no {split} split"
            raise DataError(f"{key}={spec} {what}; give a folder written by `ffdist shard`, or "
                            "a pattern of its .tar files (e.g. train-{000000..000009}.tar).")
        folder = tars.local_path(spec)
        shards = [_info(str(folder / r["name"]), r) for r in rows["shards"]]
        return ShardSet(split, shards, classes, origin=str(where))
    urls = tars.expand(spec)
    if raw is None:
        return ShardSet(split, [scan_shard(u) for u in urls], None, origin="scan")
    rows = {r["name"]: r for part in raw["splits"].values() for r in part["shards"]}
    absent = [u for u in urls if tars.name_of(u) not in rows]
    if absent:
        raise DataError(f"{key}: the shard index {where} does not list {tars.name_of(absent[0])} "
                        f"({len(absent)} of {len(urls)} shards unlisted); point data.shard_index "
                        "at the index of these shards, or remove the index to have them scanned.")
    return ShardSet(split, [_info(u, rows[tars.name_of(u)]) for u in urls], classes,
                    origin=str(where))


def scan_shard(url: str) -> ShardInfo:
    """A shard's counts and offsets, from one walk through it (headers only in a local
    file). DataError when it cannot be read."""
    try:
        stream = tars.open_shard(url)
        try:
            samples = list(tars.walk(tars.open_tar(stream)))
        finally:
            stream.close()
    except tars.Unreadable as e:
        raise DataError(f"shard {url} cannot be read ({e}); check the file or URL, or rewrite "
                        "the shards with `ffdist shard`.") from None
    size = os.path.getsize(tars.local_path(url)) if tars.kind(url) == "file" else None
    if not samples:
        return ShardInfo(url, 0, size)
    return ShardInfo(url, len(samples), size,
                     *encode_spans([*(s.start for s in samples), samples[-1].end]))


# ------------------------------------------------------------------------------ writing it

def write(path: Path, splits: dict[str, list[ShardInfo]], classes: list[str] | None,
          **meta: Any) -> dict[str, Any]:
    """index.json at `path` (atomically): both splits, the classes, what `meta` adds (the
    source, the options used) and a fingerprint of the whole; returns what it wrote."""
    body: dict[str, Any] = {"format": FORMAT, "version": VERSION, **meta, "classes": classes,
                            "splits": {}}
    for split, shards in splits.items():
        body["splits"][split] = {"samples": sum(s.samples for s in shards),
                                 "bytes": sum(s.bytes or 0 for s in shards),
                                 "shards": [s.to_json() for s in shards]}
    body["fingerprint"] = hashlib.sha256(json.dumps(body["splits"], sort_keys=True).encode()
                                         ).hexdigest()[:16]
    with outputs.replacing(path) as tmp, open(tmp, "w") as f:  # (no temp file stays)
        json.dump(body, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return body
