"""Uninterrupted reference runs, shared by the fault tests (computed once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault import kit


@pytest.fixture(scope="session")
def ref1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schedule run once, never stopped, by one process."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    proc = kit.run(kit.python_cmd(out))
    assert proc.returncode == 0, kit.explain(proc)
    return out


@pytest.fixture(scope="session")
def ref2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same schedule, never stopped, by 2 DDP ranks under torchrun."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    proc = kit.run(kit.torchrun_cmd(out))
    assert proc.returncode == 0, kit.explain(proc)
    return out


@pytest.fixture(scope="session")
def ref1_window4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schedule run once by one process with a log line every 4 steps (checkpoints
    every 5: some fall between two lines)."""
    out = tmp_path_factory.mktemp("ref1_window4") / "run"
    proc = kit.run(kit.python_cmd(out, kit.WINDOW4))
    assert proc.returncode == 0, kit.explain(proc)
    return out
