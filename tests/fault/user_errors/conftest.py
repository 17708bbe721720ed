"""Fixtures of the user-error suite (the reference runs ref1/ref2: tests/fault/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def existing_run(ref1: Path, tmp_path: Path) -> Path:
    """A finished run directory that no mistake may change."""
    out = tmp_path / "existing"
    shutil.copytree(ref1, out)
    return out
