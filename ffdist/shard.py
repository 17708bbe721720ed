"""`ffdist shard SOURCE [key=value ...] --out FOLDER [options]`: write a dataset as tar
shards in the WebDataset layout (FOLDER/train-NNNNNN.tar, FOLDER/val-NNNNNN.tar and one
FOLDER/index.json for both splits), then read every shard back to check it.

SOURCE is an ImageFolder root (train/ and val/, a folder per class), or a recipe whose
data.name the shards are made of (digits, mnist, cifar10, imagefolder, filelist, ...: a
file list is `ffdist shard IMAGE_ROOT data.name=filelist data.train_list=... data.val_list=...`).
A recipe for the shards is then data.name=shards data.train_shards=FOLDER (docs/data.md).

`ffdist shard --index SPLIT=SHARDS [SPLIT=SHARDS] --out FILE` indexes shards written
elsewhere (the webdataset package's ShardWriter, ...): it scans them once and writes FILE,
which data.shard_index names, so that training starts without scanning them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ffdist import outputs
from ffdist.errors import DataError, RecipeError, guard

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?", re.I)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10,
         "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ShardError(DataError):
    """A mistake in `ffdist shard`'s input or output folder."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffdist shard", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="docs/data.md: the layout, the index, how training reads shards.")
    p.add_argument("source", nargs="?", help="an ImageFolder root, or a recipe .yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--out", required=True, help="the folder to write (new or empty); with "
                   "--index, the index file to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="256MB", metavar="SIZE",
                      help="target size of a shard: 256MB (default), 1GB, 500MiB, ...")
    size.add_argument("--shard-samples", type=int, metavar="N",
                      help="samples per shard instead of a size")
    p.add_argument("--max-size", type=int, metavar="PX", help="pre-resize: cap the longest "
                   "side at PX pixels, re-encoding those images as JPEG (FFCV's max_resolution)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded "
                   "images (default 90)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="writer processes (default: the CPU count, at most 8)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out "
                   "(counted) instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="the train split's write-time "
                   "shuffle (default 0)")
    p.add_argument("--index", nargs="+", metavar="SPLIT=SHARDS", help="index existing shards "
                   "(a brace pattern, URLs or pipe: commands) into --out instead")
    return p


def parse_size(text: str) -> int:
    m = SIZE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise ShardError(f"--shard-size {text!r} is not a size; give one like 256MB, 1GB or "
                         "500MiB.")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "mb").lower()])


PLACE_FILE = outputs.Place("--out", file=True)
TAR_BYTES_PER_SAMPLE = 2048
"""A sample's tar overhead at most: two members (image, class), a 512-byte header and up to
511 bytes of padding each."""


def shard_bytes(splits: list[Any], opts: Any) -> int:
    """About what the shards take: files copied as they are, their own sizes; images
    encoded or re-encoded (sizes known only once encoded), the tar overhead alone."""
    total = sum(len(s) for s in splits) * TAR_BYTES_PER_SAMPLE
    for split in splits:
        if split.paths is not None and opts.max_size is None:
            total += sum(_size(p) for p in split.paths)
    return total


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # unreadable: skipped or refused by the writer, which says which


def check_out(out: Path) -> None:
    """The folder must be new or empty: ffdist shard never writes among other files."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ShardError(f"--out {out} already holds files; give a new or empty folder (ffdist "
                         "shard never writes over or beside anything).")


# ------------------------------------------------------------------------------ the source

def read_source(source: str, overrides: list[str]) -> Any:
    """The recipe SOURCE stands for: a folder is data.name=imagefolder data.root=SOURCE."""
    from ffdist import recipe_load

    path = Path(source)
    if path.is_dir():
        return recipe_load.from_dict({"data": {"name": "imagefolder", "root": source}},
                                     overrides, source=source)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return recipe_load.load(path, overrides)
    raise ShardError(f"{source} is neither a folder nor a recipe file; give an ImageFolder root "
                     "(train/ and val/, a folder per class) or a recipe .yaml.")


def splits_of(recipe: Any) -> tuple[list[Any], list[str], str]:
    """(the train and val Splits, the class names, a description) of the recipe's data."""
    from ffdist.data import sources
    from ffdist.data.presence import check_present
    from ffdist.data.shard_writer import Split

    cfg, model = recipe.data, recipe.model
    check_present(cfg)
    source = sources.get(cfg.name)
    if hasattr(source, "splits"):  # files: copied as they are
        train, val, classes = source.splits(cfg, model.num_classes)
        return ([Split(name, [lab for _, lab in samples], paths=[p for p, _ in samples])
                 for name, samples in (("train", train), ("val", val))], classes,
                f"data.name={cfg.name} data.root={cfg.root}")
    from ffdist.data.datasets import TensorImages

    datasets = getattr(source, "datasets", None)
    data = datasets(cfg, recipe.seed, model.num_classes, model.in_channels) if datasets else None
    if data is None or not all(isinstance(d, TensorImages) for d in (data.train, data.val)):
        raise ShardError(f"data.name={cfg.name} is not a dataset ffdist shard can write; give an "
                         "ImageFolder root, a file list or a recipe of digits, mnist, "
                         "fashion_mnist, cifar10, cifar100 or synthetic.")
    return ([Split(name, ds.labels.tolist(), images=ds.images)
             for name, ds in (("train", data.train), ("val", data.val))],
            list(data.spec.classes), f"data.name={cfg.name}")


# ------------------------------------------------------------------------------ progress

class Progress:
    """A bar on stderr when it is a terminal, else a line at every tenth."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.stage, self.bar, self.shown = total, 0, "", None, -1

    def __call__(self, stage: str, samples: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.done, self.shown = stage, 0, -1
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=stage, unit="img", file=sys.stderr)
        self.done += samples
        if self.bar is not None:
            self.bar.update(samples)
            return
        tenth = self.done * 10 // max(1, self.total)
        if tenth > self.shown:
            self.shown = tenth
            print(f"ffdist shard: {self.done:,} of {self.total:,} samples {stage} "
                  f"({100 * self.done // max(1, self.total)}%)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------ commands

def write(args: argparse.Namespace) -> int:
    from ffdist.data import shard_index
    from ffdist.data.shard_writer import Options, write_all

    out = Path(args.out)
    # its folder takes the name and files (the space is checked once the source is read)
    outputs.check_folder(out.parent, "ffdist shard", PLACE_FILE, names=[out.name])
    check_out(out)
    for flag, value, low in (("--max-size", args.max_size, 1), ("--quality", args.quality, 1),
                             ("--workers", args.workers, 1), ("--shard-samples",
                                                              args.shard_samples, 1)):
        if value is not None and value < low:
            raise ShardError(f"{flag} {value} is out of range; give a positive number.")
    if args.quality > 100:
        raise ShardError(f"--quality {args.quality} is out of range; give 1..100 (90 is usual).")
    opts = Options(None if args.shard_samples else parse_size(args.shard_size),
                   args.shard_samples, args.max_size, args.quality, args.workers, args.skip_bad,
                   args.seed)
    splits, classes, described = splits_of(read_source(args.source, args.overrides))
    outputs.check_folder(out.parent, "ffdist shard", PLACE_FILE, shard_bytes(splits, opts),
                         [out.name])
    started = time.perf_counter()
    outputs.remove_leftovers(out)  # a killed shard's .<name>.partial-<pid> folder
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    progress = Progress(sum(len(s) for s in splits))
    try:
        written = write_all(splits, tmp, opts, progress)
        progress.close()
        infos = {s.name: [w.info(tmp) for w in written if w.split == s.name] for s in splits}
        bad = [b for w in written for b in w.bad]
        body = shard_index.write(
            tmp / shard_index.INDEX, infos, classes, created_by="ffdist shard", source=described,
            options={k: v for k, v in vars(opts).items() if k != "workers"},
            skipped={s.name: sum(len(w.bad) for w in written if w.split == s.name)
                     for s in splits})
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(tmp, out)
    except BaseException:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, part in body["splits"].items():
        print(f"{split}: {part['samples']:,} samples in {len(part['shards'])} shards, "
              f"{part['bytes'] / 1e6:,.1f} MB")
    for path, why in bad[:10]:
        print(f"skipped unreadable image {path} ({why})", file=sys.stderr)
    print(f"wrote and verified {out} in {time.perf_counter() - started:.1f} s (index "
          f"{out / shard_index.INDEX}, fingerprint {body['fingerprint']}"
          + (f"; {len(bad)} unreadable images skipped" if bad else "") + f"); train on it with "
          f"data.name=shards data.train_shards={out}")
    return 0


def index(args: argparse.Namespace) -> int:
    from ffdist.data import shard_index, tars

    out = Path(args.out)
    if out.exists():
        raise ShardError(f"--out {out} exists; give a new file name for the index.")
    outputs.check_folder(out.parent, "ffdist shard --index", PLACE_FILE, names=[out.name])
    if args.source or args.overrides:
        raise ShardError("--index takes SPLIT=SHARDS words only (e.g. --index "
                         "train=/data/train-{000000..000009}.tar val=...), no SOURCE.")
    splits = {}
    for word in args.index:
        split, _, spec = word.partition("=")
        if split not in shard_index.SPLITS or not spec:
            raise ShardError(f"--index {word!r} is not SPLIT=SHARDS; give train=PATTERN and/or "
                             "val=PATTERN.")
        splits[split] = [shard_index.scan_shard(u) for u in tars.expand(spec)]
        print(f"{split}: {sum(s.samples for s in splits[split]):,} samples in "
              f"{len(splits[split])} shards")
    body = shard_index.write(out, splits, None, created_by="ffdist shard --index")
    print(f"wrote {out} (fingerprint {body['fingerprint']}); train with data.shard_index={out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.index:
        return index(args)
    if not args.source:
        raise RecipeError("ffdist shard needs a SOURCE: an ImageFolder root or a recipe .yaml "
                          "(or --index SPLIT=SHARDS to index existing shards).")
    return write(args)


if __name__ == "__main__":
    sys.exit(guard(main))
