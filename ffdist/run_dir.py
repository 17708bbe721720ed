"""The run directory: who owns it, whether to start fresh, resume, or do nothing, and the
rules that keep a run from replacing what is already there.

Ownership: the primary rank holds an exclusive `flock` on <run_dir>/.ffdist.lock for the
whole run, so a second training into the same output_dir is refused at once, naming the
process that holds it (pid, host, start time, written into the file). The kernel releases
the lock when its holder exits in any way, SIGKILL and OOM included, so a lock file left by
a dead process never blocks: there is no stale lock to clean up. On NFS the lock is held
by the server for every node (NFSv4, or v3 with lockd); when a node crashes, NFSv4 drops
its locks when the lease expires (about 90 s). File systems without locks (Lustre mounted
without `-o flock`) get a warning and no lock.

Claimed, not assumed: a run goes only into a folder that is new, empty, or an ffdist run
(`check_owner`). A run marks its folder with MARKER (.ffdist-run: ffdist's version, when)
when it starts writing; a folder written before the marker existed counts as a run when it
holds ffdist's own files (`older_run`). Anything else is refused in one sentence naming a
file there, before anything is written; so is a recipe that lies where the run writes.
What ffdist itself may have put into a folder before the run (`.ffdist*`, its temp files,
sbatch's slurm-*.out, bench.json), and empty files or folders where the run writes, do not
make it someone else's.

Never replaced (whatever state the checkpoints are in):
- a finished run (its model.pt exists) is not trained again: the same recipe prints
  "nothing to do" (exit 0); a recipe that would make another result is refused, naming
  the keys, unless checkpoint.resume=extend says to continue it in place;
- a fresh start never goes into a folder that holds a run, nor next to checkpoints that
  cannot be read (new step files would mix with them).
Continuing an unfinished run follows ffdist.resume_rules.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist import resume_rules
from ffdist.errors import CheckpointError
from ffdist.outputs import PROBE_BYTES
from ffdist.recipe import Recipe
from ffdist.resume_rules import RunRefused

if TYPE_CHECKING:  # torch is imported by train anyway; `lock` alone stays light
    from ffdist.checkpoint import CheckpointManager
    from ffdist.ckpt_format import Checkpoint

log = logging.getLogger("ffdist")
LOCK_FILE = ".ffdist.lock"
MARKER = ".ffdist-run"
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "model.pt", "tb", "checkpoints", "csv", "profile",
             "wandb", "mlflow-run.json", "wandb-run.json")
"""What a run and its log sinks write into its folder (and would replace)."""
ATOMIC_FILES = re.compile(r"recipe\.yaml|model\.pt|\.ffdist-run")
"""What ffdist writes into a run folder through checkpoint.atomic_write."""
WRITE_TEST = re.compile(r"\.write_test\.\d+")
OLD_BEST_COPY = ".best.pt.tmp"
"""checkpoints/: the temp name of best.pt's copy before best.pt went through atomic_write
(a run started by an earlier ffdist may hold one)."""
FFDIST_BEFORE_RUN = re.compile(r"\.ffdist.*|slurm-\d+\.out|bench\.json")
"""What ffdist (its lock, checks, sbatch's log, `ffdist bench`) may put into an output_dir
before a run starts there: it does not make the folder someone else's."""
LOCK_WAIT_S = 2.0
"""A holder in its last moments (flushing TensorBoard, exiting) gets this long to let go."""
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirInUse(CheckpointError):
    """Another process holds the run directory's lock."""

    same_on_all_ranks = True  # rank 0 tries, every rank learns the verdict


# ----------------------------------------------------------------------------- ownership

_held: list[int] = []  # lock fds of this process, closed in forked children


def _close_in_child() -> None:
    # A forked DataLoader worker inherits the fd; a flock lasts while ANY fd to it is open,
    # so a worker outliving a killed parent would keep the run locked. Closing the child's
    # copy leaves the parent's lock in place.
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """An exclusive flock on <run_dir>/.ffdist.lock (fd None: not held, e.g. other ranks).
    `created`: the folders claim() made (the run directory, its checkpoints/)."""

    def __init__(self, path: Path, fd: int | None, created: tuple[Path, ...] = ()):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        """Let go of the lock; a run that stopped before writing anything (a refusal, a
        missing download) leaves no empty run directory behind: the folders claim() made
        are removed again if they hold nothing but the lock file."""
        if self.fd is None:
            return
        if self.fd in _held:
            _held.remove(self.fd)
        empty = all(not any(p for p in d.iterdir() if p.name != LOCK_FILE and p not in
                            self.created) for d in self.created if d.is_dir())
        if self.created and empty:
            self.path.unlink(missing_ok=True)  # while still locked: no one else holds it
        os.close(self.fd)  # closing the last fd releases the flock
        self.fd = None
        if self.created and empty:
            for folder in sorted(self.created, key=lambda d: len(d.parts), reverse=True):
                try:
                    folder.rmdir()
                except OSError:  # another run has started writing there since: keep it
                    pass


def lock(run_dir: Path) -> RunLock:
    """Take the run directory's lock or raise RunDirInUse naming its holder."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(f"output_dir={run_dir} is in use by another ffdist run "
                              f"({holder}); wait for it to end or stop it, or choose another "
                              "output_dir (or name).") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            os.close(fd)
            log.warning("output_dir=%s is on a file system without file locks (%s): ffdist "
                        "cannot keep a second run out of it", run_dir, e.strerror)
            return RunLock(path, None)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
    _held.append(fd)
    return RunLock(path, fd)


def holder(run_dir: Path) -> str | None:
    """Who holds the run directory's lock now (the text its holder wrote: pid, host, since
    when), or None when no process holds it. Asks the kernel with a non-blocking try that,
    when it succeeds, lets go at once: a run starting meanwhile waits LOCK_WAIT_S for it."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run ever held it (or it cleaned up after itself)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:  # a file system without locks: nobody can be seen holding it
        return None
    finally:
        os.close(fd)  # closing lets go of a lock this process took
    return None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its name yet"


def claim(run_dir: Path, info: Any, recipe_path: str | Path | None = None,
          recipe_yaml: str | None = None) -> RunLock:
    """The primary rank checks that the run directory is new, empty or an ffdist run, that
    the recipe (at recipe_path; the run would write recipe_yaml) is not replaced by the
    run, that it takes files, and takes its lock; every rank learns the verdict
    (ffdist.dist.decide: a deadline, no collective), so that all of them stop with the same
    sentence."""
    from ffdist import dist

    held, refusal = RunLock(Path(run_dir) / LOCK_FILE, None), None
    if info.is_primary:
        run_dir = Path(run_dir)
        try:
            check_owner(run_dir, recipe_path, recipe_yaml)
            new = tuple(d for d in (run_dir, run_dir / "checkpoints") if not d.exists())
            check_writable(run_dir)
            held = lock(run_dir)
            held.created = new
        except CheckpointError as e:
            refusal = str(e)
    refusal = dist.decide("run-dir", refusal, lambda verdicts: verdicts[0],
                          "the run directory check")
    if refusal:
        raise RunRefused(refusal)
    return held


# ----------------------------------------------------------------------------- ownership rule

def check_owner(run_dir: Path, recipe_path: str | Path | None = None,
                recipe_yaml: str | None = None) -> None:
    """Refuse (one sentence, naming a file) a folder that is neither new, nor empty, nor an
    ffdist run, and a recipe that the run would replace; before anything is written."""
    if recipe_path is not None:
        _check_recipe_outside(run_dir, Path(recipe_path), recipe_yaml)
    if not _exists(run_dir):
        return
    if not run_dir.is_dir():
        raise RunRefused(f"output_dir={run_dir} is a file, not a folder; choose another "
                         "output_dir (or name).")
    if (run_dir / MARKER).is_file():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not _ffdist_before_run(p)
                     and not _empty_run_file(p))
    if not foreign or older_run(run_dir):
        return
    replaced = [n for n in RUN_FILES if n in foreign]
    named = replaced[0] if replaced else foreign[0]
    what = " (which a run would replace)" if replaced else ""
    more = len(foreign) - 1
    others = f" and {more} other entr{'y' if more == 1 else 'ies'}" if more else ""
    raise RunRefused(
        f"output_dir={run_dir} is not an ffdist run folder: it holds {run_dir / named}{what}"
        f"{others}; ffdist trains only into a new or empty folder or into its own run: "
        f"choose another: output_dir={resume_rules.next_run_dir(run_dir)}.")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as e:  # ENAMETOOLONG and the like: Path.exists() lets them through
        raise RunRefused(_path_error(path, e)) from None


def _path_error(run_dir: Path, e: OSError) -> str:
    shown = str(run_dir) if len(str(run_dir)) <= 80 else str(run_dir)[:77] + "..."
    if e.errno == errno.ENAMETOOLONG:
        return (f"output_dir={shown} is a longer name than the file system takes (a folder "
                "name at most 255 bytes); choose a shorter output_dir (or name).")
    return (f"output_dir={shown} cannot be used ({e.strerror}); choose another output_dir "
            "(or name).")


def _ffdist_before_run(p: Path) -> bool:
    from ffdist.checkpoint import is_temp_of

    return bool(FFDIST_BEFORE_RUN.fullmatch(p.name) or WRITE_TEST.fullmatch(p.name)
                or is_temp_of(p.name, ATOMIC_FILES))


def _empty_run_file(p: Path) -> bool:
    """An empty file or folder where a run writes: nothing to lose (a start killed before
    it wrote anything left it)."""
    if p.name not in RUN_FILES:
        return False
    try:
        return not any(p.iterdir()) if p.is_dir() else p.stat().st_size == 0
    except OSError:
        return False


def older_run(run_dir: Path) -> bool:
    """A run written before the marker existed: its checkpoints/ holds a checkpoint under
    ffdist's names, or it holds ffdist's complete recipe.yaml with model.pt or a
    metrics.jsonl of ffdist's records. (A checkpoint that only has the name is refused
    later, when it is read, before anything is written.)"""
    from ffdist.checkpoint import CHECKPOINT_FILES

    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(CHECKPOINT_FILES.fullmatch(p.name) or re.fullmatch(
            r"step_\d{8}", p.name) for p in ckpts.iterdir()):
        return True
    saved = _saved_recipe_file(run_dir)
    if saved is None or not set(Recipe.__dataclass_fields__) <= set(saved):
        return False
    return (run_dir / "model.pt").is_file() or _ffdist_metrics(run_dir / "metrics.jsonl")


def _ffdist_metrics(path: Path) -> bool:
    try:
        with open(path) as f:
            first = json.loads(f.readline(1 << 16))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "step" in first and ("split" in first or "event" in first)


def _check_recipe_outside(run_dir: Path, recipe: Path, recipe_yaml: str | None) -> None:
    """The recipe being trained is never replaced by the run: it may not lie where the run
    writes, except a run's own recipe.yaml trained again as it is (`begin` leaves a
    recipe.yaml that already holds what it would write untouched)."""
    try:
        where = recipe.resolve()
        folder = run_dir.resolve()
        if where == folder / "recipe.yaml" and recipe.read_text() == recipe_yaml:
            return
    except (OSError, UnicodeDecodeError):
        return  # a path the run cannot read: the recipe loader or the other checks say so
    written = [folder / n for n in RUN_FILES]
    if not any(where == w or where.is_relative_to(w) for w in written):
        return
    raise RunRefused(
        f"the recipe {recipe} lies where this run writes (output_dir={run_dir}), and would "
        "be replaced by the run's own copy; train a copy of it kept elsewhere, or give the "
        f"run another folder: output_dir={resume_rules.next_run_dir(run_dir)}.")


# ----------------------------------------------------------------------------- contents

def holds_run(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"  # step_*.pt files, or step_*/ folders of ZeRO shards
    return ((run_dir / "metrics.jsonl").exists() or (run_dir / "model.pt").exists()
            or any(ckpts.glob("step_*")) or (ckpts / "best.pt").exists())


def check_writable(run_dir: Path) -> None:
    """The run directory and its checkpoints/ folder take files (found now, not after the
    first epoch, when the first checkpoint is written). The probe is one block, synced (a
    full disk still creates empty files, and may take a few bytes into a block it has). The
    probe file never stays, not even when writing it fails (a full disk), nor do the folders
    this check made."""
    made: list[Path] = []
    for folder in (run_dir, run_dir / "checkpoints"):
        probe = folder / f".write_test.{os.getpid()}"
        try:
            made += [d for d in (*reversed(folder.parents), folder)
                     if d not in made and not d.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with open(probe, "wb") as f:
                    f.write(bytes(PROBE_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                probe.unlink(missing_ok=True)
        except OSError as e:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise CheckpointError(_unwritable(run_dir, folder, e)) from None


def _unwritable(run_dir: Path, folder: Path, e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return _path_error(run_dir, e)
    what = "" if folder == run_dir else f": its {folder.name}/ folder"
    blocker = next((p for p in (folder, *folder.parents) if p.is_file()), None)
    if blocker is not None:  # a file where a folder must go
        why = "it is a file" if blocker == folder else f"{blocker} is a file, not a folder"
        return (f"output_dir={run_dir}{what} is not writable ({why}); set output_dir=PATH to "
                "another folder.")
    fix = {errno.ENOSPC: "free space there, or set output_dir=PATH to a folder on another disk",
           errno.EDQUOT: "free space within your quota, or set output_dir=PATH to a folder on "
                         "another disk",
           errno.EROFS: "set output_dir=PATH to a folder on a file system that takes files"}
    return (f"output_dir={run_dir}{what} is not writable ({e.strerror}); "
            f"{fix.get(e.errno, 'set output_dir=PATH to a folder you can write, or fix its permissions')}.")


@dataclass
class Start:
    """What train does with the run directory."""

    found: tuple[str, Checkpoint] | None = None  # the checkpoint to resume from (None: fresh)
    done: bool = False                     # finished already with this recipe: nothing to do
    message: str = ""


def decide_start(recipe: Recipe, manager: CheckpointManager) -> Start:
    """Fresh start, resume, or nothing to do; refuses whatever would replace a run."""
    run_dir, mode = recipe.run_dir, recipe.checkpoint.resume
    if mode == "never":
        if holds_run(run_dir):
            raise RunRefused(
                f"output_dir={run_dir} already holds a run and checkpoint.resume=never; "
                "choose a new output_dir (or name), or use checkpoint.resume=auto to continue it.")
        return Start()
    if mode not in ("auto", "extend"):
        return _from_path(recipe, Path(mode))
    latest = manager.load_latest()
    found = (str(latest[0]), latest[1]) if latest else None
    if (run_dir / "model.pt").is_file():
        return _finished(recipe, found)
    if found is None:
        if manager.candidates():
            raise RunRefused(
                f"output_dir={run_dir}: none of its checkpoints can be read (see the warnings "
                "above); a fresh start would mix new checkpoints with them: move "
                f"{run_dir / 'checkpoints'} away, or choose a new output_dir (or name).")
        return Start()
    resume_rules.check(found[1], recipe, found[0])
    return Start(found=found)


def _from_path(recipe: Recipe, path: Path) -> Start:
    run_dir = recipe.run_dir
    inside = path.resolve().is_relative_to((run_dir / "checkpoints").resolve())
    if (run_dir / "model.pt").is_file() or (holds_run(run_dir) and not inside):
        raise RunRefused(
            f"output_dir={run_dir} already holds another run; resuming {path} there would mix "
            f"with it or replace it: add {resume_rules.new_place(recipe)}.")
    from ffdist.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    resume_rules.check(state, recipe, str(path))
    return Start(found=(str(path), state))


def _finished(recipe: Recipe, found: tuple[str, Checkpoint] | None) -> Start:
    run_dir = recipe.run_dir
    saved = found[1].recipe if found else None
    if saved is None:
        saved = _saved_recipe_file(run_dir)
    if recipe.checkpoint.resume == "extend":
        if found is None:
            raise RunRefused(
                f"checkpoint.resume=extend: {run_dir} has no readable checkpoint to continue "
                "from (model.pt holds weights only, no optimizer state or progress); start a "
                f"new run from them: model.pretrained={run_dir / 'model.pt'} "
                f"{resume_rules.new_place(recipe)}.")
        resume_rules.check(found[1], recipe, found[0])
        return Start(found=found)
    if saved is None:
        raise RunRefused(
            f"output_dir={run_dir} holds a model.pt but neither a readable checkpoint nor a "
            "recipe.yaml that says which run made it; it is not trained over: choose a new "
            "output_dir (or name).")
    diffs = [d for d in resume_rules.differences(saved, recipe)
             if resume_rules.rule_for(d[0]).result]
    if diffs:
        raise RunRefused(resume_rules.finished_refusal(run_dir, recipe, diffs,
                                                            can_extend=found is not None))
    step = f" (step {found[1].step})" if found else ""
    return Start(done=True, message=(
        f"ffdist: {run_dir} already holds the finished run{step}; nothing to do. A new run "
        f"needs its own folder: {resume_rules.new_place(recipe)}."))


def _saved_recipe_file(run_dir: Path) -> dict | None:
    import yaml

    from ffdist import safe_yaml

    try:
        saved = safe_yaml.load((run_dir / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # missing, or hand-edited beyond reading
        return None
    return saved if isinstance(saved, dict) else None


def check_progress(recipe: Recipe, state: Checkpoint | None, total_steps: int) -> None:
    """checkpoint.resume=extend asks for more training: refuse when the recipe gives none."""
    if state is None or recipe.checkpoint.resume != "extend":
        return
    if state.step >= total_steps or state.epoch >= recipe.schedule.epochs:
        raise RunRefused(
            f"checkpoint.resume=extend: the run in {recipe.run_dir} already reached step "
            f"{state.step} (epoch {state.epoch}), and this recipe ends at step "
            f"{total_steps} (schedule.epochs={recipe.schedule.epochs}); raise schedule.epochs "
            "or schedule.max_steps to extend it.")


def begin(recipe: Recipe) -> None:
    """The run starts writing (primary rank, after every refusal): the folder's marker
    (kept from the first start), what killed starts left (ffdist's temp files only), and
    recipe.yaml."""
    from ffdist import __version__
    from ffdist.checkpoint import save_text

    run_dir = recipe.run_dir
    if not (run_dir / MARKER).is_file():
        save_text(run_dir / MARKER, json.dumps({
            "ffdist": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    remove_leftovers(run_dir)
    text, path = recipe.to_yaml(), run_dir / "recipe.yaml"
    if not (path.is_file() and path.read_text() == text):  # (the recipe trained, maybe)
        save_text(path, text)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temp files of writes that never finished (a kill, a full disk): in the
    run folder and checkpoints/, the names ffdist's own writes use, nothing else."""
    from ffdist.checkpoint import CHECKPOINT_FILES, is_temp_of

    removed = []
    for folder, targets in ((run_dir, ATOMIC_FILES), (run_dir / "checkpoints", CHECKPOINT_FILES)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if (is_temp_of(p.name, targets) or WRITE_TEST.fullmatch(p.name)
                    or (folder.name == "checkpoints" and p.name == OLD_BEST_COPY)) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
