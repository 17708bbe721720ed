"""Errors a user can cause, and the exit-code contract of `python -m ffdist.train`.

Exit codes (docs/failure-and-recovery.md):
    0                 the run finished (or had already finished: nothing to do)
    2  EXIT_USER_ERROR    bad input (recipe, paths, data, devices, checkpoints, a launcher
                          variable, a disk that is full or read-only): one sentence
    3  EXIT_DIVERGED      non-finite loss (schedule.nan_policy); the last good checkpoint stays
    75 EXIT_PREEMPTED     SIGTERM/SIGUSR1: a checkpoint was written, start again to resume
                          ("requeue me"; 75 is EX_TEMPFAIL of sysexits.h)
    anything else         a bug or a crash (traceback on stderr)

Bugs are not FfdistErrors: they keep their traceback so that they get fixed. Every entry
point prints errors through `guard` (one printer, each error's own exit code). An OSError
whose errno is the disk's or the file system's answer (full, read-only, a name too long, a
quota, no permission: `STORAGE`) is translated here, in one place (`storage_error`), into
a StorageError sentence: where ffdist writes it names the file (`storage_error(e, path)`),
and guard translates what escapes. A reader that left (`| head`) or a closed stdout never
fails a command (ffdist.stdio).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ffdist import stdio
from ffdist.world import EnvError, report_to_launcher, world_from_env

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class FfdistError(Exception):
    """A mistake in the input (recipe, paths, data, devices) with the fix in its message."""

    exit_code = EXIT_USER_ERROR
    same_on_all_ranks = False
    """True when every rank raises it alike (then only rank 0 prints it)."""
    per_node = False
    """With same_on_all_ranks: alike on the ranks of one node (files on a node's own disks),
    so the first rank of each node prints it."""


class RecipeError(FfdistError):
    """The recipe file or a command-line override is wrong."""

    same_on_all_ranks = True  # every rank reads the same recipe and overrides


class DataError(FfdistError):
    """A dataset is missing, empty or malformed."""


class CheckpointError(FfdistError):
    """A checkpoint does not exist, does not fit the model, or the run dir is in the way."""


class LaunchError(FfdistError):
    """The launch environment or the devices asked for do not exist."""


class NonFiniteLoss(FfdistError):
    """The training loss became NaN/Inf (schedule.nan_policy). Not an input mistake, so it
    has its own exit code; every rank raises it at the same step (the flag is all-reduced)."""

    exit_code = EXIT_DIVERGED
    same_on_all_ranks = True


class Refusals(FfdistError):
    """Several mistakes found by the checks that run before training (the data against the
    model, the batch against the data, ...), reported together: one message, one line per
    problem with its fix, so that a user fixes them in one go instead of one per start."""

    def __init__(self, problems: list[FfdistError]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {one_line(p)}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problems stop this run; fix each:\n{lines}")
        self.same_on_all_ranks = all(p.same_on_all_ranks for p in self.problems)
        self.per_node = any(p.per_node for p in self.problems)


class Problems:
    """Collects the user errors of checks that can all run before one of them is fixed;
    `raise_any` raises the one found as it is, or several as one Refusals."""

    def __init__(self) -> None:
        self.found: list[FfdistError] = []

    def add(self, e: FfdistError) -> None:
        if all(one_line(e) != one_line(f) for f in self.found):
            self.found.append(e)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run a check; its FfdistError is kept instead of raised (the block stops there)."""
        try:
            yield
        except FfdistError as e:
            self.add(e)

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise Refusals(self.found)


class StorageError(FfdistError):
    """A file or folder cannot be written (or read) because of its disk or file system: no
    space, read-only, a name too long, a quota, no permission. Made from the OSError by
    `storage_error`."""


STORAGE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space is left on its device", "free space there, or {elsewhere}"),
    errno.EDQUOT: ("the disk quota there is used up", "free space within your quota, or "
                   "{elsewhere}"),
    errno.EROFS: ("its file system is read-only", "{elsewhere} (or remount it read-write)"),
    errno.ENAMETOOLONG: ("a name in it is longer than the file system takes (255 bytes on "
                         "most)", "choose a shorter {name}"),
    errno.EFBIG: ("the file would be larger than its file system takes", "{elsewhere}"),
    errno.EACCES: ("permission denied", "fix its permissions, or {elsewhere}"),
    errno.EPERM: ("the operation is not permitted there", "fix its permissions, or "
                  "{elsewhere}"),
}
"""errno -> (what it means for the path, the fix): the one table of these sentences."""


def storage_error(e: BaseException, path: str | Path | None = None, option: str | None = None,
                  chained: bool = False, elsewhere: str | None = None) -> StorageError | None:
    """The sentence for an OSError whose errno is in STORAGE; None for any other error (a
    bug keeps its traceback). `path`: what was being written, when the error does not name
    it (a write() into an open file does not); `option`: how the user chose that path
    (`--out`, `output_dir`), so the fix says "choose another --out"; `elsewhere`: that
    advice in other words, for a path no option chooses. `chained`: also look at what `e`
    was raised from or while handling, for a writer that turns the OSError into its own
    error (torch.save: RuntimeError, errno lost); only where a write failed, never for
    errors in general (a bug inside an `except OSError` block)."""
    found = e
    while chained and found is not None and not isinstance(found, OSError):
        found = found.__cause__ or found.__context__
    if not isinstance(found, OSError) or found.errno not in STORAGE:
        return None
    meaning, advice = STORAGE[found.errno]
    where = path if path is not None else found.filename
    shown = printable(shorten(str(where), 200)) if where is not None else "a file ffdist writes"
    elsewhere = elsewhere or (f"choose another {option}" if option else "write elsewhere")
    fix = advice.format(elsewhere=elsewhere, name=option or "name")
    return StorageError(f"{shown}: {meaning} ({errno.errorcode[found.errno]}); {fix}.")


def one_line(e: BaseException) -> str:
    """The message of a user error; a DataLoader worker re-raises ours with its traceback
    folded into the message, so keep only the original sentence."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


# ------------------------------------------------------------------------------ printing

PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def guard(main: Callable[..., Any], *args: Any) -> int:
    """Run an entry point's body; THE error printer of every command (`ffdist X`,
    `python -m ffdist.X`, under torchrun). A FfdistError becomes one line and its own
    exit code; a rank that only lost a peer says so in one line (exit 1); bugs keep their
    traceback. The body's return value (None: 0) is the exit code otherwise. The standard
    streams are made safe first (ffdist.stdio: closed ones, a reader that leaves)."""
    with stdio.guarded():
        return _guarded(main, *args)


def _guarded(main: Callable[..., Any], *args: Any) -> int:
    try:
        return int(main(*args) or 0)
    except FfdistError as e:
        report(e)
        return e.exit_code
    except EnvError as e:  # a launcher variable that is not a number (ffdist.world)
        report(LaunchError(str(e)))
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `ffdist models | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a full or read-only disk that no writer named: the one table
        error = storage_error(e)
        if error is None:
            raise  # a bug: keep the traceback
        report(error)
        return error.exit_code
    except Exception as e:
        if not peer_lost(e):
            raise  # a bug: keep the traceback
        rank, _, world, _, _ = _world()
        why = next((s for s in PEER_LOST if s in str(e)), type(e).__name__)
        print(f"ffdist: rank {rank} of {world} stopped: it lost contact with another rank "
              f"({why}), which failed first: see that rank's message.", file=sys.stderr,
              flush=True)
        return 1


def report(e: FfdistError) -> None:
    """One line on stderr. An error every rank raises alike is printed by rank 0 only, so
    that torchrun with N ranks shows it once; others are printed by each rank that hit it."""
    rank, local_rank, world, _, _ = _world()
    where = f" (rank {rank} of {world})" if rank != 0 else ""
    line = f"ffdist: error{where}: {one_line(e)}"
    printer = local_rank == 0 if e.per_node else rank == 0
    if e.same_on_all_ranks and not printer:
        # torchrun's failure summary lists every rank's error file: a pointer, not the
        # sentence again (and not torchrun's URL, which is what it shows for no file)
        report_to_launcher(f"ffdist: rank {rank} of {world} stopped on the same error as "
                           "rank 0 (its message above).")
        # Let the printing rank fail first: torchrun names the first failure its root cause
        # and stops the others, and a rank that exits before the printer has even started
        # would leave a pointer to a message nobody printed.
        import time

        time.sleep(0.5)
        return
    report_to_launcher(line)  # torchrun's failure summary then shows it instead of a URL
    print(line, file=sys.stderr, flush=True)


def _world() -> tuple[int, int, int, int, str]:
    """Which rank is speaking; the printer must print even when the launcher's variables
    are what it is reporting (WORLD_SIZE=two): then it speaks as the only process."""
    try:
        return world_from_env()
    except EnvError:
        return 0, 0, 1, 1, "none"


def peer_lost(e: Exception) -> bool:
    """A collective failed because a peer process died: the fallout of another rank's
    error or crash (which reports itself), not a second bug; one line instead of N tracebacks."""
    if _world()[2] < 2:
        return False
    comm_error = type(e).__name__ in ("DistBackendError", "DistNetworkError")
    return comm_error or (isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_LOST))


def shorten(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters, cut between words (never mid-word)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 3)
    return text[: cut if cut > limit // 2 else limit - 3].rstrip(" ,;:") + "..."


def printable(text: object) -> str:
    """User text inside a one-line message: newlines, tabs and other control characters
    escaped (\\n, \\t, \\x0c), the rest as is."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]
