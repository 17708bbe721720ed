"""Files that the commands write beside a training run (`ffdist predict`, `export`,
`eval`, `bench`, `samples`, `shard`): never over someone else's, and checked before work.

Before any work, the folder a command writes into is checked (`check_folder`): it exists or
can be made (no file where a folder must go), takes files (a probe file, written and removed:
a read-only or full file system, no permission), takes the names (with the temp names
written first) and, where the size is known, has the space. One sentence names the folder,
the option that chose it and the fix.

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
previous file as it was, and the temp file is removed whatever happened; a disk that fills
up or turns read-only during the write is one sentence naming the file
(ffdist.errors.storage_error). A temp file that a killed command left (`.<name>.<pid>.tmp<suffix>`,
checkpoint.atomic_write's `.<name>.tmp.<pid>`, shard's `.<name>.partial-<pid>`) is removed
when a command next writes that same name, unless its process still runs on this machine
(`remove_leftovers`); nothing else is ever deleted. Every path written is printed by the
command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ffdist.errors import FfdistError, StorageError, storage_error

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
          flag: str = "--out", need: int = 0) -> None:
    """Refuse, before any work is done, to write where the rules above forbid, or into a
    folder that cannot take the files (`check_folder`; `need`: their bytes, when known)."""
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
    folders: dict[Path, list[str]] = {}
    for out in outputs:
        folders.setdefault(out.path.parent, []).append(out.path.name)
    for folder, names in folders.items():
        check_folder(folder, command, Place(flag, file=True), need, names)
        need = 0  # (the estimate is of the first folder's files: the others' are small)


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


# ------------------------------------------------------------------------ the folder, first

PROBE_BYTES = 4096
"""What the probe writes: one block, so that a full disk says so now (an empty file can
still be created on a disk whose blocks are all used)."""
SPARE_BYTES = 1 << 20
"""Kept free beyond a command's own estimate (file system metadata, a log line)."""
LONGEST_PID = 9_999_999  # (Linux's pid_max is at most 4,194,304)


@dataclass(frozen=True)
class Place:
    """How the user chose a folder, for the advice in a sentence: the option (`--out`,
    `output_dir`; `file`: the option names a file in the folder), or for a folder no option
    chooses (eval's RUN_DIR/eval) the way out."""

    option: str | None = None
    elsewhere: str | None = None
    file: bool = False

    def __call__(self, folder: Path) -> str:
        """The folder as the sentence names it."""
        text = str(folder) if len(str(folder)) <= 120 else str(folder)[:117] + "..."
        if self.option is None:
            return text
        if self.file:
            return f"{text} (the folder of {self.option})"
        # a flag and its value (--out X), or a recipe key and its value (output_dir=X)
        return f"{self.option}{' ' if self.option.startswith('-') else '='}{text}"

    @property
    def other(self) -> str:
        return self.elsewhere or f"choose another {self.option or 'folder'}"


def check_folder(folder: Path, command: str, place: Place, need: int = 0,
                 names: Sequence[str] = ()) -> None:
    """Before any work: `folder` exists or can be made, takes files, takes `names` and their
    temp names, and (need > 0) has `need` bytes free, else one sentence naming it as
    `place` says. Nothing stays behind: the probe file is removed, no folder is made."""
    folder = Path(folder)
    base = _existing_base(folder, place)
    name_max = _name_max(base)
    new_parts = folder.parts[len(base.parts):]  # the folders mkdir would make
    for name, temp in [*((n, False) for n in (*new_parts, *names)),
                       *((temp_path(Path(n), LONGEST_PID).name, True) for n in names)]:
        size = len(os.fsencode(name))
        if size > name_max:
            shown = name if len(name) <= 60 else name[:57] + "..."
            first = f" (the temp name {command} writes first)" if temp else ""
            raise StorageError(
                f"{place(folder)}: the name {shown}{first} is {size} bytes, and its file "
                f"system takes {name_max}; choose a shorter {place.option or 'name'}.")
    _probe(base, folder, place)
    if need > 0:
        free = shutil.disk_usage(base).free
        if free < need + SPARE_BYTES:
            raise StorageError(
                f"{place(folder)}: {command} writes about {size_text(need)} there, and its "
                f"disk has {size_text(free)} free; free space there, or {place.other}.")


def _existing_base(folder: Path, place: Place) -> Path:
    """The folder itself, or the nearest folder above it that exists (where mkdir starts)."""
    for path in (folder, *folder.parents):
        try:
            if path.is_dir():
                return path
            if path.exists():  # a file where a folder must go
                what = "is a file" if path == folder else f"lies under {path}, which is a file"
                fix = place.other if place.option else f"move that file away, or {place.other}"
                raise OutputError(f"{place(folder)} {what}, not a folder; {fix}.")
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # a name check_folder measures: look further up
                continue
            raise _storage(e, folder, place) from None
    return Path(folder.anchor or ".")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _probe(base: Path, folder: Path, place: Place) -> None:
    """Write one block into `base` and remove it: read-only, full, no permission show now."""
    probe = base / f".ffdist-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _storage(e, folder, place) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _storage(e: OSError, folder: Path, place: Place) -> FfdistError:
    error = storage_error(e, place(folder), place.option, elsewhere=place.elsewhere)
    if error is not None:
        return error
    return StorageError(f"{place(folder)} cannot be written ({e.strerror or e}); "
                        f"{place.other}.")


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------ writing

def temp_path(path: Path, pid: int | None = None) -> Path:
    """Where `replacing` writes `path` first: .<name>.<pid>.tmp<suffix>, beside it (the same
    suffix, so that writers that go by it keep working)."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp{path.suffix}")


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temp files of earlier writes of `path` that never finished (a kill): the
    names ffdist's writers give it (`temp_path`, checkpoint.atomic_write's .<name>.tmp.<pid>,
    shard's .<name>.partial-<pid> folder), whose process no longer runs here. Nothing else."""
    path = Path(path)
    name = re.escape(path.name)
    pattern = re.compile(rf"\.{name}\.(?:(\d+)\.tmp{re.escape(path.suffix)}|tmp\.(\d+)|partial-(\d+))")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(next(g for g in m.groups() if g))):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a temp file of a live writer stays)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


@contextlib.contextmanager
def replacing(path: Path, mark: str | None = None, place: Place = Place("--out")
              ) -> Iterator[Path]:
    """Yield a temp path beside `path` (`temp_path`); on success rename it onto `path`
    (atomically), on failure delete it. A writer that writes nothing leaves `path` alone.
    `mark`: a PNG text chunk to add. A full or read-only disk met on the way is one sentence
    naming `path` (`place`: how the user chose it). Leftovers of killed writes of the same
    name go first (`remove_leftovers`)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        yield tmp
        if tmp.exists():
            if mark is not None:
                _mark_png(tmp, mark)
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        error = storage_error(e, path, place.option, chained=True, elsewhere=place.elsewhere)
        if error is None:
            raise
        raise error from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def fail_storage(e: BaseException, path: Path, option: str | None = None) -> None:
    """Raise the sentence for a write of `path` that failed on its disk (full, read-only,
    ...: also when a writer such as torch.save turned the OSError into its own error);
    return for any other error, which the caller re-raises."""
    error = storage_error(e, path, option, chained=True)
    if error is not None:
        raise error from None


def _mark_png(path: Path, value: str) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_MARK, value)
    with Image.open(path) as img:
        img.load()
        img.save(path, format="PNG", pnginfo=info)


def write_text(path: Path, text: str, place: Place = Place("--out")) -> None:
    with replacing(path, place=place) as tmp:
        tmp.write_text(text)
