"""Files that `ffdist predict` and `ffdist export` write: never over someone else's.

Before any work, every path a command will write is checked (`check`):
- a path the command READS (the weights, the run's recipe.yaml, an input image) is never
  written, --force or not;
- two outputs never share a path (predict's picture is derived from --out: preds.csv ->
  preds.png, so `--out preds.png` is refused rather than overwritten by the picture);
- an existing file is replaced only when it is recognisably an earlier output of the same
  command (`owned_by`): predict's CSV by its header, its PNG by a text chunk ffdist writes
  into it, an export by its JSON sidecar naming it; anything else needs --force.
Files are written through a temp file in the same folder and renamed into place
(`replacing`), so a failure (an export that fails verification, a full disk) leaves the
previous file as it was. Every path written is printed by the command.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ffdist.errors import FfdistError

PREDICT_CSV_HEADER = "path,prediction,probability,uncertain,entropy"
PNG_MARK = "ffdist"  # the PNG text chunk's key; its value is the command that wrote it


class OutputError(FfdistError):
    """An output path would replace a file that is not this command's own."""


@dataclass(frozen=True)
class Output:
    path: Path
    kind: str  # "predict.csv" | "predict.png" | "export.model" | "export.sidecar"


def picture_path(csv: Path) -> Path:
    """predict's picture next to its CSV: preds.csv -> preds.png (never the CSV itself)."""
    return csv.with_suffix(".png")


def check(outputs: list[Output], reads: list[Path], force: bool, command: str,
          flag: str = "--out") -> None:
    """Refuse, before any work is done, to write where the rules above forbid."""
    read = {_key(p): p for p in reads}
    seen: dict[tuple, Path] = {}
    for out in outputs:
        key = _key(out.path)
        if key in read:
            raise OutputError(f"{flag} {out.path}: that is {read[key]}, which {command} reads; "
                              "choose another path.")
        if key in seen:
            raise OutputError(f"{flag} {out.path}: {command} would write two files there "
                              f"({seen[key]} and {out.path}); choose another path.")
        seen[key] = out.path
        if out.path.is_dir():
            raise OutputError(f"{flag} {out.path} is a folder; give a file path.")
        if out.path.exists() and not force and not owned_by(out):
            raise OutputError(f"{out.path} exists and is not a file that {command} wrote; "
                              f"choose another {flag}, or pass --force to replace it.")


def _key(path: Path) -> tuple:
    """Identity of a path: (device, inode) when it exists (links, ./, ../ all agree), else
    its resolved name."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("name", str(Path(path).resolve()))


def owned_by(out: Output) -> bool:
    """Whether the existing file at out.path is an earlier output of the same command."""
    try:
        if out.kind == "predict.csv":
            with open(out.path, encoding="utf-8", errors="replace") as f:
                return f.readline().startswith(PREDICT_CSV_HEADER)
        if out.kind == "predict.png":
            from PIL import Image

            with Image.open(out.path) as img:
                return img.format == "PNG" and img.info.get(PNG_MARK) == "ffdist predict"
        if out.kind == "export.sidecar":
            return _sidecar(out.path) is not None
        if out.kind == "export.model":
            meta = _sidecar(out.path.with_name(out.path.name + ".json"))
            return meta is not None and meta.get("file") == out.path.name
    except Exception:  # unreadable, not an image, ...: not ours
        return False
    raise ValueError(f"unknown output kind {out.kind!r}")


def _sidecar(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") in ("torchscript", "onnx") \
        and "file" in meta and "verified" in meta
    return meta if ok else None


@contextlib.contextmanager
def replacing(path: Path, mark: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, so that writers that go by it keep
    working); on success rename it onto `path` (atomically), on failure delete it. A writer
    that writes nothing leaves `path` alone. `mark`: a PNG text chunk to add."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if tmp.exists():
            if mark is not None:
                _mark_png(tmp, mark)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _mark_png(path: Path, value: str) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_MARK, value)
    with Image.open(path) as img:
        img.load()
        img.save(path, format="PNG", pnginfo=info)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
