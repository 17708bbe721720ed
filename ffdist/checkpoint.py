"""Atomic checkpoints with auto-resume, keep-last-k and best.

Files: <run>/checkpoints/step_00000420.pt ..., `latest` (a one-line text file naming the
newest complete checkpoint, itself replaced atomically) and best.pt (the consolidated
weights of the best evaluation so far, written by the Trainer whenever an evaluation sets
a new best, whatever the checkpoint interval: `save_best`). The manager decides
WHEN and WHERE; the strategy decides WHO writes WHAT, through the layout it declares
(ffdist.ckpt_format.Layout): one file, which the primary rank writes from the strategy's
state_dict(); or per-rank shards, a folder step_00000420/ in which every rank writes its
own through the strategy's save_shards(), after which (a barrier) the primary rank writes
ffdist_state.pt (our progress, RNG of every rank, recipe) LAST, so a folder without it is
incomplete and never counts. What each file holds is the schema in ffdist.ckpt_format
(`Checkpoint`, encoded and decoded there only). Which checkpoints a run may resume is the
strategies' declaration (ffdist.strategies.check_resume).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ffdist.ckpt_format import (
    BEST,
    BEST_FILE,
    SHARDED_STATE,
    SHARDS,
    Checkpoint,
    decode,
    encode,
    is_resumable,
)
from ffdist.errors import CheckpointError, shorten
from ffdist.outputs import fail_storage
from ffdist.recipe import CheckpointConfig, Recipe
from ffdist.state_dicts import clean_state_dict

if TYPE_CHECKING:
    from ffdist.resolved import Resolved
    from ffdist.strategies import Strategy

log = logging.getLogger(__name__)


TEMP_OF = re.compile(r"\.(?P<target>.+)\.tmp\.\d+")
"""The name of atomic_write's temp file for <target> (`temp_path`)."""
CHECKPOINT_FILES = re.compile(r"step_\d{8}\.pt|latest|best\.pt")
"""What the manager writes into checkpoints/ through atomic_write."""


def temp_path(path: Path) -> Path:
    """Where atomic_write writes `path` first: .<name>.tmp.<pid>, in the same folder."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def is_temp_of(name: str, targets: re.Pattern[str]) -> bool:
    """Whether `name` is atomic_write's temp file of one of `targets` (never a user's file
    that only looks like one: another target, or no pid at the end)."""
    m = TEMP_OF.fullmatch(name)
    return bool(m and targets.fullmatch(m["target"]))


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, flush, fsync, then os.replace: a crash
    at any point leaves either the old file or the new one, never a torn one (and a temp
    file that the run's next start deletes: ffdist.run_dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full or read-only disk: one sentence (torch.save
        fail_storage(e, path, "output_dir")  # turns write()'s OSError into a RuntimeError)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories; the rename is still atomic
    finally:
        os.close(fd)


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def load_torch(path: str | Path) -> Any:
    """torch.load with weights_only=True (never unpickle code) onto the CPU."""
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of a .pt file (a folder "
                              "of shards is read with read_checkpoint).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a .pt "
                              "file or a run directory.") from None
    except pickle.UnpicklingError as e:
        # torch's refusal advises weights_only=False "if you trust the source": a refusal
        # made for safety never repeats advice to turn the protection off.
        if "unsupported global" not in str(e).lower():  # a class or function to import
            why = "" if "Weights only load failed" in str(e) else f": {shorten(_first(e))}"
            raise CheckpointError(f"checkpoint {path} cannot be read (UnpicklingError{why}); "
                                  "it is truncated, corrupt or not a checkpoint.") from None
        raise CheckpointError(f"{path} is not a safe checkpoint: it holds Python objects "
                              "that only unpickling (running code from the file) could rebuild, "
                              "and ffdist reads tensors and plain values only; in an environment "
                              "you trust, re-save its weights as a plain state dict "
                              "(torch.save(model.state_dict(), PATH)) and give that file.") from None
    except Exception as e:  # torn or foreign files raise many different errors
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{shorten(_first(e))}); it is truncated, corrupt or "
                              "not a checkpoint.") from None


def _first(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0]  # some errors have no message at all


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file, or a checkpoint folder of shards (its ffdist_state.pt; the folder
    is `Checkpoint.shards`)."""
    obj, shards = _load_raw(path)
    return decode(obj, path, shards=shards)


def _load_raw(path: str | Path) -> tuple[Any, Path | None]:
    """What a checkpoint file holds (unread: ckpt_format.decode reads it), and the folder of
    shards when `path` is one. CheckpointError when it cannot be loaded at all."""
    path = Path(path)
    if path.is_dir():
        return load_torch(path / SHARDED_STATE), path
    return load_torch(path), None


def write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """model.pt: the final weights as a plain state dict (ffdist.ckpt_format), on the CPU:
    a file trained on cuda loads anywhere with torch.load's default map_location."""
    save_torch(path, cpu_state(state))


def cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of a state dict as its own contiguous CPU tensor (dtype kept). A view
    would drag its whole storage into the file (torch.save writes storages); a cuda tensor
    would need a GPU (or map_location) to load."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu")
            # clone when still sharing a larger (or strided) storage: the file holds its own
            whole = v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes
            v = v if whole else v.contiguous().clone()
        out[k] = v
    return out


# ------------------------------------------------------------------------------ RNG state

def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches, as plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_initialized():  # in use here; get_rng_state_all would initialise it
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ manager

class CheckpointManager:
    """Decides when and where checkpoints go; the strategy decides who writes."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, is_writer: bool):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.is_writer = cfg, is_writer
        # (path, encoded checkpoint, step) before a step file (or a folder's marker) is
        # written: tests' fault injection (ffdist.faults, under FFDIST_FAULT); None otherwise
        self.before_write: Callable[[Path, dict[str, Any], int], None] | None = None

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def save(self, ckpt: Checkpoint, strategy: Strategy) -> Path:
        """Write `ckpt` (of step ckpt.step) in its layout: per-rank shards (EVERY rank calls
        this, each writes its own), or one file (the writer, rank 0, writes it)."""
        if ckpt.layout.kind == SHARDS:
            return self._save_shards(ckpt, strategy)
        path = self.path_for(ckpt.step)
        if self.is_writer:
            data = encode(ckpt)
            if self.before_write is not None:
                self.before_write(path, data, ckpt.step)
            save_torch(path, data)
            save_text(self.dir / "latest", path.name + "\n")
            self._prune()
        return path

    def _save_shards(self, ckpt: Checkpoint, strategy: Strategy) -> Path:
        from ffdist.dist import barrier

        path = self.dir / f"step_{ckpt.step:08d}"
        if self.is_writer and path.is_dir() and not (path / SHARDED_STATE).is_file():
            _remove(path)  # debris of a killed save: its files must not mix with these
        barrier()
        path.mkdir(parents=True, exist_ok=True)  # every rank: whoever comes first
        strategy.save_shards(path)
        barrier()  # every shard is on disk before the folder is marked complete
        if self.is_writer:
            data = encode(ckpt)
            if self.before_write is not None:
                self.before_write(path / SHARDED_STATE, data, ckpt.step)
            save_torch(path / SHARDED_STATE, data)
            save_text(self.dir / "latest", path.name + "\n")
            self._prune()
        barrier()
        return path

    @property
    def best_path(self) -> Path:
        return self.dir / BEST_FILE

    def save_best(self, ckpt: Checkpoint) -> None:
        """best.pt (the writer only): `ckpt` is a weights file (kind WEIGHTS, consolidated
        weights, its `best` section). Written atomically: a kill mid-write leaves the
        previous best.pt and a temp file `.best.pt.tmp.<pid>`, removed at the next start."""
        if self.is_writer:
            data = encode(ckpt)
            if self.before_write is not None:
                self.before_write(self.best_path, data, ckpt.step)
            save_torch(self.best_path, data)

    def best_so_far(self) -> dict[str, Any] | None:
        """The `best` section of this run's best.pt (what it holds: step, split, metric,
        value), read without its tensors; None without a readable one."""
        from ffdist.ckpt_peek import peek

        found = peek(self.best_path, (BEST,)) if self.best_path.is_file() else None
        best = (found or {}).get(BEST)
        return best if isinstance(best, dict) else None

    @staticmethod
    def restore(ckpt: Checkpoint, strategy: Strategy) -> None:
        """Load the strategy's state from `ckpt`, as its layout holds it: from its shards
        (every rank reads its own), or from the file's own state."""
        if ckpt.layout.kind == SHARDS:
            strategy.load_shards(ckpt.shards)
        else:
            strategy.load_state_dict(ckpt.strategy_state())

    def _prune(self) -> None:
        steps = self._complete()
        for old in steps[: -self.cfg.keep_last]:
            _remove(old)
        if steps:  # debris of a save interrupted before its marker, older than the newest
            for d in self.dir.glob("step_*"):
                if d.is_dir() and d not in steps and d.name < steps[-1].name:
                    _remove(d)

    def _complete(self) -> list[Path]:
        """Complete checkpoints (files, or folders with their marker), oldest first."""
        return sorted(p for p in self.dir.glob("step_*") if (p.is_file() and p.suffix == ".pt")
                      or (p / SHARDED_STATE).is_file())

    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first: `latest` first, then step files by step."""
        found = self._complete()[::-1]
        pointer = self.dir / "latest"
        if pointer.is_file():
            named = self.dir / pointer.read_text().strip()
            if named in found:
                found.remove(named)
                found.insert(0, named)
        return found

    def load_latest(self) -> tuple[Path, Checkpoint] | None:
        """The newest checkpoint that loads; a torn or corrupt newer one is skipped with a
        warning (the previous one is still complete, thanks to atomic writes). One of
        another format version is an error, never skipped: falling back past it would
        restart the run and overwrite it."""
        for path in self.candidates():
            try:
                obj, shards = _load_raw(path)
            except CheckpointError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
                continue
            return path, decode(obj, path, shards=shards)
        return None


def check_compatible(ckpt: Checkpoint, model: torch.nn.Module, source: str | Path,
                     recipe: Recipe, resolved: Resolved) -> None:
    """Refuse, before the run directory is touched, a checkpoint this run cannot resume:
    weights only, a layout this run's strategy does not read (or not at this world size,
    or with other parameters: as the strategy declares), or weights that do not fit `model`
    (naming the first key that differs, instead of load_state_dict's multi-line error)."""
    from ffdist import strategies

    if not is_resumable(ckpt):
        raise CheckpointError(
            f"checkpoint {source} holds weights only (no optimizer state or RNG, as every "
            "best.pt); resume from a step checkpoint, or start a new "
            f"run from these weights with model.pretrained={source}.")
    strategies.check_resume(ckpt.layout, ckpt.step, source, recipe, resolved)
    if ckpt.model is not None:  # shards keep the weights in their own files
        _check_weights(ckpt, model, source, recipe.model.num_classes)


def _check_weights(ckpt: Checkpoint, model: torch.nn.Module, source: str | Path,
                   num_classes: int) -> None:
    saved = ckpt.model
    mine = clean_state_dict(model.state_dict())
    saved_model = ckpt.recipe.get("model") or {}
    what = f"model.name={saved_model.get('name')}" if saved_model.get("name") else "another model"
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        side = "is missing from it" if missing else "is not in this model"
        raise CheckpointError(
            f"checkpoint {source} comes from {what}: key '{key}' {side} "
            f"({len(missing)} missing, {len(unexpected)} unexpected); resume it with its own "
            "recipe, or choose another checkpoint.resume / output_dir.")
    for k, v in mine.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            hint = ""
            if saved_model.get("num_classes") not in (None, num_classes):
                hint = (f" (it was trained with model.num_classes="
                        f"{saved_model['num_classes']}, this recipe has {num_classes})")
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' has shape {list(saved[k].shape)} but this "
                f"model's is {list(v.shape)}{hint}; set model.num_classes / model.* as in the "
                "checkpoint's recipe, or start from another checkpoint.")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
