"""Errors a user can cause. The CLI prints their one sentence and exits 2, no traceback.

Bugs are not FfdistErrors: they keep their traceback so that they get fixed.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class FfdistError(Exception):
    """A mistake in the input (recipe, paths, data, devices) with the fix in its message."""


class RecipeError(FfdistError):
    """The recipe file or a command-line override is wrong."""


class DataError(FfdistError):
    """A dataset is missing, empty or malformed."""


class CheckpointError(FfdistError):
    """A checkpoint does not exist, does not fit the model, or the run dir is in the way."""


class LaunchError(FfdistError):
    """The launch environment or the devices asked for do not exist."""
