"""The host check the Slurm tests rely on (tests/slurm/conftest.py) sees what it must: a
changed, added or removed file, a changed mode, and a daemon that stopped. Runs on temp
files and a stand-in daemon, never on /etc."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.slurm import conftest


def test_host_check_sees_changes(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    (etc / "slurm").mkdir(parents=True)
    (etc / "slurm" / "slurm.conf").write_text("ClusterName=real\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(conftest, "WATCHED", (etc / "slurm", etc / "munge", etc / "hosts"))
    fake = tmp_path / "munged"  # a process whose name is munged: a daemon to the check
    shutil.copy("/bin/sleep", fake)
    daemon = subprocess.Popen([str(fake), "60"])
    comm = Path(f"/proc/{daemon.pid}/comm")
    deadline = time.monotonic() + 30
    while comm.read_text().strip() != "munged" and time.monotonic() < deadline:
        time.sleep(0.01)  # the fork runs, the exec of `munged` has not happened yet (load)
    try:
        before = {"etc": conftest.etc_snapshot(), "daemons": conftest.running_daemons()}
        assert before["etc"][str(etc / "munge")] is None  # absent, and recorded as such
        assert daemon.pid in before["daemons"]
        assert conftest.host_changes(before) == []

        (etc / "slurm" / "slurm.conf").write_text("ClusterName=ffdist\n")
        (etc / "slurm" / "new.conf").write_text("")
        (etc / "hosts").chmod(0o600)
        (etc / "munge").mkdir()
        daemon.kill()
        daemon.wait()
        changes = conftest.host_changes(before)
    finally:
        daemon.kill()
    changed = sorted(c.split(":")[0] for c in changes if not c.startswith("daemon "))
    assert changed == sorted(str(p) for p in (etc / "hosts", etc / "munge", etc / "slurm" / "new.conf",
                                              etc / "slurm" / "slurm.conf")), changes
    assert [c for c in changes if c.startswith(f"daemon {daemon.pid} ")], changes
