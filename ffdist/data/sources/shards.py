"""data.name=shards: tar shards in the WebDataset layout (key.jpg + key.cls, or key.json with
data.label_key), written by `ffdist shard` or by the `webdataset` package: a folder with an
index.json, a brace pattern, http(s):// URLs or a `pipe:` command (data.train_shards,
data.val_shards). Photographs of any size, augmented as image folders are; the order, the
resume and the eval shards are ffdist.data.shard_streams'; docs/data.md tells it whole.

The presence check reads no image: for each shard, that the file is there and has the size
the index records (else, without an index, that it ends with a tar's end-of-archive
blocks), or for a URL that a HEAD request answers (with the recorded size) within a few
seconds. A `pipe:` command is not run before training, and runs at all only with
FFDIST_ALLOW_PIPE=1 in the environment: a recipe alone never makes ffdist run a program.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist.data import shard_index, tars
from ffdist.data.sources.base import SMOKE, DataMissing, Source, where
from ffdist.errors import DataError, RecipeError, printable

if TYPE_CHECKING:
    from ffdist.data.stream import StreamRequest, Streams
    from ffdist.recipe import DataConfig

log = logging.getLogger("ffdist")

HEAD_TIMEOUT = 10.0  # seconds a shard server has to answer the presence check
FORMS = ("a folder written by `ffdist shard`, a brace pattern such as "
         "/data/in1k/train-{000000..000146}.tar, http(s):// URLs or a pipe: command")


class Shards(Source):
    name = "shards"
    folder_like = True
    encoded = True

    @staticmethod
    def specs(cfg: DataConfig) -> list[tuple[str, str, str]]:
        """(recipe key, value, split) of the train and val shards."""
        train = cfg.train_shards or ""
        val = cfg.val_shards or (train if shard_index.is_folder(train) else "")
        return [("data.train_shards", train, "train"), ("data.val_shards", val, "val")]

    # ------------------------------------------------------------------ torch-free
    def check_present(self, cfg: DataConfig, of: str) -> None:
        for key, spec, split in self.specs(cfg):
            if not spec:
                more = "" if key == "data.train_shards" else \
                    " (it defaults to the val split of a data.train_shards folder)"
                raise DataMissing(f"{of}data.name=shards needs {key}{more}: {FORMS}; set "
                                  f"{key}=..., {SMOKE}.")
            pipes = [u for u in tars.expand(spec) if tars.kind(u) == "pipe"]
            if pipes and not tars.pipe_allowed():
                program = (pipes[0][5:].split() or ["?"])[0]
                raise RecipeError(
                    f"{of}{key}: pipe: shards run a program ({printable(program)}), and a recipe "
                    f"alone never makes ffdist run one; set {tars.ALLOW_PIPE}=1 in the "
                    "environment of the run to allow it, or give the shards as a path or URL.")
            check_split(of, key, spec, split, cfg.shard_index)

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        """The index's classes (`ffdist shard` records them), else data.classes, else the
        labels as strings."""
        train = cfg.train_shards or ""
        where_ = shard_index.location(train, cfg.shard_index) if train else None
        raw = shard_index.read(where_) if where_ else None
        return list((raw or {}).get("classes") or cfg.classes or map(str, range(num_classes)))

    # ------------------------------------------------------------------ torch
    def build(self, cfg: DataConfig, req: StreamRequest) -> Streams:
        from ffdist.data.shard_streams import shard_streams
        from ffdist.data.sources.folders import photo_pipeline

        sets = []
        for key, spec, split in self.specs(cfg):
            started = time.perf_counter()
            found = shard_index.load(spec, split, cfg.shard_index, key)
            if found.total == 0:
                raise DataError(f"{key}={spec} holds no samples; write the shards with `ffdist "
                                "shard` (key.jpg + key.cls members).")
            if found.scanned and req.rank == 0:
                log.info("%s: no shard index, so each process scanned the %d shards once "
                         "(%d samples, %.1f s); `ffdist shard --index %s=%s --out FILE` writes "
                         "one, then data.shard_index=FILE starts without the scan", key,
                         len(found.shards), found.total, time.perf_counter() - started, split,
                         spec)
            sets.append(found)
        classes = self.classes(cfg, req.num_classes)
        train_tf, val_tf, spec_ = photo_pipeline(self, cfg, req.channels, classes, req.decode)
        return shard_streams(sets[0], sets[1], spec_, (train_tf, val_tf), cfg, req)


# ---------------------------------------------------------------------- presence

def check_split(of: str, key: str, spec: str, split: str, index: str | None) -> None:
    """DataMissing (one sentence) when a shard of `spec` is absent, truncated or unreachable."""
    fix = f"write the shards with `ffdist shard` or fix {key}, {SMOKE}"
    if shard_index.is_folder(spec):
        raw = shard_index.read(str(tars.local_path(spec) / shard_index.INDEX))
        part = (raw or {}).get("splits", {}).get(split)
        if raw is None or part is None:
            what = f"has no {shard_index.INDEX}" if raw is None else \
                f"has no {split} split in its {shard_index.INDEX}"
            raise DataMissing(f"{of}{key}={where(spec)} {what}; give {FORMS}; {fix}.")
        folder = tars.local_path(spec)
        rows = {str(folder / r["name"]): r for r in part["shards"]}
    else:
        if tars.kind(spec) == "file" and not any(c in spec for c in "{:") and \
                not spec.endswith(".tar") and not Path(spec).exists():
            raise DataMissing(f"{of}{key}={where(spec)} does not exist; give {FORMS}; {fix}.")
        at = shard_index.location(spec, index)
        try:
            raw = shard_index.read(at) if at else None
        except shard_index.Unreachable as e:
            raise DataMissing(f"{of}{key}: {str(e)[:-1]}, {SMOKE}.") from None
        by_name = {r["name"]: r for p in (raw or {}).get("splits", {}).values()
                   for r in p["shards"]}
        rows = {u: by_name.get(tars.name_of(u)) for u in tars.expand(spec)}
    files = [u for u in rows if tars.kind(u) == "file"]
    missing = [u for u in files if not tars.local_path(u).is_file()]
    if missing:
        raise DataMissing(f"{of}{key}: shard {where(missing[0])} does not exist ({len(missing)} "
                          f"of {len(rows)} shards missing); {fix}.")
    for url in files:
        problem = _file_problem(tars.local_path(url), rows[url])
        if problem:
            raise DataMissing(f"{of}{key}: shard {where(url)} {problem}; copy it again or "
                              f"rewrite the shards with `ffdist shard`, {SMOKE}.")
    urls = [u for u in rows if tars.kind(u) == "http"]
    with ThreadPoolExecutor(8) as pool:
        for url, problem in zip(urls, pool.map(lambda u: _url_problem(u, rows[u]), urls)):
            if problem:
                raise DataMissing(f"{of}{key}: shard {url} {problem}; check the server and the "
                                  f"URL, {SMOKE}.")


def _file_problem(path: Path, row: dict[str, Any] | None) -> str | None:
    size = path.stat().st_size
    if row is not None and row.get("bytes") is not None:
        if size != row["bytes"]:
            return (f"is {size:,} bytes but its index says {row['bytes']:,}: truncated or "
                    "rewritten since it was indexed")
        return None
    # no index: a tar ends with two zero blocks, padded to whole 512-byte blocks
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read(1024)
    if size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
        return "does not end as a tar file ends (two zero blocks): it is truncated or not a tar"
    return None


def _url_problem(url: str, row: dict[str, Any] | None) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=HEAD_TIMEOUT) as r:
            length = r.headers.get("Content-Length")
    except (OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError) and e.code in (403, 405):
            return None  # a server that refuses HEAD (signed URLs): the reads will tell
        return f"cannot be reached ({tars.reason(e)}, {HEAD_TIMEOUT:.0f} s timeout)"
    if row is not None and row.get("bytes") is not None and length is not None and \
            int(length) != row["bytes"]:
        return (f"is {int(length):,} bytes on the server but its index says {row['bytes']:,}: "
                "truncated or rewritten since it was indexed")
    return None
