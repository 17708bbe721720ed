"""A few plain fields of a checkpoint file, read without torch and without its tensors.

`ffdist runs` lists runs without importing torch (~3 s) and without loading checkpoints
that may hold gigabytes; the Trainer reads best.pt's `best` section the same way on
resume. A file written by `torch.save` is a zip archive: `<name>/data.pkl` is the pickled
object, whose tensors only point (pickle persistent ids) at the archive's other members,
where their bytes are. Unpickling data.pkl alone, with every torch global replaced by an
inert placeholder, gives the dict with its numbers, strings, lists and dicts intact and
reads none of the tensor data: a few kilobytes even for a large model.

Safety: like `torch.load(weights_only=True)`, nothing but plain containers is built. The
unpickler resolves `torch.*` globals to `Opaque` (which does nothing), a short list of
harmless builtins, and refuses every other global, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

MAX_PICKLE = 64 << 20
"""A data.pkl larger than this is not read (a checkpoint's is kilobytes to a few MB)."""

_SAFE = {("collections", "OrderedDict"): collections.OrderedDict,
         ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
         ("builtins", "slice"): slice, ("builtins", "complex"): complex}


class Opaque:
    """What a tensor, storage or other torch object of the file reads as: nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return Opaque()

    def __setstate__(self, state: Any) -> None:
        pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return Opaque
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if (module, name) == ("_codecs", "encode"):  # bytes, as pickle protocol 2 writes them
            return lambda text, encoding="latin1": str(text).encode(encoding)
        raise pickle.UnpicklingError(f"global {module}.{name} is not read")

    def persistent_load(self, pid: Any) -> Any:
        return None  # a storage: its bytes stay in the archive


def peek(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The top-level `keys` of the dict that `torch.save` wrote to `path` (those present),
    tensors as `Opaque`; None when the file is not such an archive or cannot be read (torn,
    foreign, not a dict)."""
    try:
        with zipfile.ZipFile(path) as z:
            member = next((i for i in z.infolist() if i.filename.endswith("/data.pkl")
                           and i.filename.count("/") == 1), None)
            if member is None or member.file_size > MAX_PICKLE:
                return None
            raw = z.read(member)
        obj = _Unpickler(io.BytesIO(raw)).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError,
            TypeError, AttributeError, IndexError, KeyError, MemoryError):
        return None
    if not isinstance(obj, dict):
        return None
    return {k: obj[k] for k in keys if k in obj}

