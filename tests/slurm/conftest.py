"""The Slurm tests' fixtures: the host as it was before them, and the private cluster.

`host_before` is taken before the cluster exists; the cluster's teardown compares the host
with it again after everything is stopped (an error at teardown if /etc or someone
else's daemon changed), and tests/slurm/test_sbatch.py's last test compares it while the
cluster runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.slurm.cluster import CannotRun, new_cluster, skip_unless_possible

WATCHED = (Path("/etc/slurm"), Path("/etc/munge"), Path("/etc/hosts"))
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd")  # not slurmstepd: it comes and goes


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:  # unreadable: record why, so a change of that shows too
        return f"unreadable: {e.strerror}"


def _entry(path: Path) -> tuple:
    st = path.lstat()
    if path.is_symlink():
        return ("link", os.readlink(path), st.st_mode, st.st_uid, st.st_gid)
    if path.is_dir():
        return ("dir", st.st_mode, st.st_uid, st.st_gid)
    return ("file", _digest(path), st.st_mode, st.st_uid, st.st_gid)


def etc_snapshot() -> dict[str, tuple | None]:
    """Every file under the watched paths: content hash, mode, owner; None when absent."""
    snap: dict[str, tuple | None] = {}
    for root in WATCHED:
        if not root.exists() and not root.is_symlink():
            snap[str(root)] = None
            continue
        snap[str(root)] = _entry(root)
        if root.is_dir() and not root.is_symlink():
            for p in sorted(root.rglob("*")):
                snap[str(p)] = _entry(p)
    return snap


def running_daemons() -> dict[int, str]:
    """Slurm and munge daemons running now: pid -> command line."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            name = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if name in DAEMONS and cmdline:
            found[int(proc.name)] = cmdline
    return found


def host_changes(before: dict) -> list[str]:
    """What differs from `before` ({'etc': ..., 'daemons': ...}): changed files, daemons gone."""
    now = etc_snapshot()
    changed = [f"{p}: {before['etc'].get(p)} -> {now.get(p)}"
               for p in sorted(set(now) | set(before["etc"]))
               if now.get(p) != before["etc"].get(p)]
    alive = running_daemons()
    gone = [f"daemon {pid} ({cmd}) is no longer running" for pid, cmd in before["daemons"].items()
            if alive.get(pid) != cmd]
    return changed + gone


@pytest.fixture(scope="package")
def host_before() -> dict:
    return {"etc": etc_snapshot(), "daemons": running_daemons()}


@pytest.fixture(scope="package")
def slurm_cluster(host_before):
    skip_unless_possible()
    cluster = new_cluster()
    try:
        try:
            cluster.start()
        except CannotRun as e:
            pytest.skip(f"no private Slurm test cluster: {e}")
        except Exception as e:
            pytest.fail(f"Slurm bring-up failed: {e}\n{cluster.logs()}", pytrace=False)
        yield cluster
    finally:
        problems = cluster.stop()
        problems += host_changes(host_before)
        assert not problems, "\n".join(problems)
