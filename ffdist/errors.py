"""Errors a user can cause, and the exit-code contract of `python -m ffdist.train`.

Exit codes (README "Failure and recovery"):
    0                 the run finished (or had already finished: nothing to do)
    2  EXIT_USER_ERROR    bad input (recipe, paths, data, devices, checkpoints): one sentence
    3  EXIT_DIVERGED      non-finite loss (schedule.nan_policy); the last good checkpoint stays
    75 EXIT_PREEMPTED     SIGTERM/SIGUSR1: a checkpoint was written, start again to resume
                          ("requeue me"; 75 is EX_TEMPFAIL of sysexits.h)
    anything else         a bug or a crash (traceback on stderr)

Bugs are not FfdistErrors: they keep their traceback so that they get fixed.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class FfdistError(Exception):
    """A mistake in the input (recipe, paths, data, devices) with the fix in its message."""

    exit_code = EXIT_USER_ERROR
    same_on_all_ranks = False
    """True when every rank raises it alike (then only rank 0 prints it)."""


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


def one_line(e: BaseException) -> str:
    """The message of a user error; a DataLoader worker re-raises ours with its traceback
    folded into the message, so keep only the original sentence."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


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
