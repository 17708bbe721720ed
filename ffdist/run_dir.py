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

Never replaced (whatever state the checkpoints are in):
- a finished run (its model.pt exists) is not trained again: the same recipe prints
  "nothing to do" (exit 0); a recipe that would make another result is refused, naming
  the keys, unless checkpoint.resume=extend says to continue it in place;
- a fresh start never goes into a folder that holds a run, nor next to checkpoints that
  cannot be read (new step files would mix with them).
Continuing an unfinished run follows ffdist.resume_rules.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist import resume_rules
from ffdist.errors import CheckpointError
from ffdist.recipe import Recipe
from ffdist.resume_rules import RunRefused

if TYPE_CHECKING:  # torch is imported by train anyway; `lock` alone stays light
    from ffdist.checkpoint import CheckpointManager
    from ffdist.ckpt_format import Checkpoint

log = logging.getLogger("ffdist")
LOCK_FILE = ".ffdist.lock"
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


def claim(run_dir: Path, info: Any) -> RunLock:
    """The primary rank checks that the run directory takes files and takes its lock;
    every rank learns the verdict, so that all of them stop with the same sentence (none is
    left waiting in a collective for a peer that gave up)."""
    from ffdist import dist

    held, refusal = RunLock(Path(run_dir) / LOCK_FILE, None), None
    if info.is_primary:
        run_dir = Path(run_dir)
        new = tuple(d for d in (run_dir, run_dir / "checkpoints") if not d.exists())
        try:
            check_writable(run_dir)
            held = lock(run_dir)
            held.created = new
        except CheckpointError as e:
            refusal = str(e)
    if info.world_size > 1:
        refusal = dist.broadcast_object(refusal)
    if refusal:
        raise RunRefused(refusal)
    return held


# ----------------------------------------------------------------------------- contents

def holds_run(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"  # step_*.pt files, or step_*/ folders of ZeRO shards
    return ((run_dir / "metrics.jsonl").exists() or (run_dir / "model.pt").exists()
            or any(ckpts.glob("step_*")) or (ckpts / "best.pt").exists())


def check_writable(run_dir: Path) -> None:
    """The run directory and its checkpoints/ folder take files (found now, not after the
    first epoch, when the first checkpoint is written)."""
    for folder in (run_dir, run_dir / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            what = "" if folder == run_dir else f": its {folder.name}/ folder"
            raise CheckpointError(f"output_dir={run_dir}{what} is not writable ({e.strerror}); "
                                  "set output_dir=PATH to a folder you can write, or fix its "
                                  "permissions.") from None


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


def write_recipe(recipe: Recipe) -> None:
    from ffdist.checkpoint import save_text

    save_text(recipe.run_dir / "recipe.yaml", recipe.to_yaml())
