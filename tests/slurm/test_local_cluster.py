"""slurm/local_cluster.sh as docs/slurm.md tells a user to run it: one node on this
machine, in a folder of its own; a start that fails shows the daemons' logs and leaves
nothing running; stop leaves nothing running either."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import run
from tests.slurm.cluster import SCRIPT, cmdline_has, free_port_pair, skip_unless_possible


def _ours(folder: Path) -> list[str]:
    return [p.name for p in Path("/proc").glob("[0-9]*") if cmdline_has(p, str(folder))]


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def folder():
    """Under /tmp: munged wants every folder above its socket searchable by all users,
    and pytest's tmp_path is private."""
    path = Path(tempfile.mkdtemp(prefix="ffdist-slurm-try-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# make test-all only; the fast tier covers its path: tests/slurm/test_sbatch.py (the same
# slurm/local_cluster.sh, two nodes, /etc checked)
@pytest.mark.extended
def test_one_node_cluster_for_trying_it(host_before, folder, tmp_path):
    skip_unless_possible()
    private = _script("start", str(tmp_path / "x"))
    assert private.returncode == 1 and "munged needs every folder above" in private.stderr
    port = free_port_pair()
    # Someone else listens on the port: slurmctld cannot start, and the script says why.
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("", port))
        busy.listen()
        failed = _script("start", str(folder / "a"), "--port", str(port))
    assert failed.returncode == 1, failed
    assert "slurmctld.log (last 15 lines)" in failed.stderr, failed.stderr
    assert "Address already in use" in failed.stderr, failed.stderr
    assert _ours(folder / "a") == []

    folder = folder / "b"
    try:
        up = _script("start", str(folder), "--port", str(port))
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.strip().endswith(f"export SLURM_CONF={folder}/slurm.conf")
        conf = str(folder / "slurm.conf")
        job = run(["sbatch", "--parsable", "--output", str(tmp_path / "job-%j.out"), "--wrap",
                   "srun hostname"], SLURM_CONF=conf).stdout.strip()
        deadline = time.monotonic() + 60
        while "JobState=COMPLETED" not in (state := run(["scontrol", "show", "job", job],
                                                        SLURM_CONF=conf).stdout):
            assert time.monotonic() < deadline and "JobState=FAILED" not in state, state
            time.sleep(0.3)
        assert (tmp_path / f"job-{job}.out").read_text().strip() == socket.gethostname()
        assert run(["sinfo", "-h", "-o", "%P %a %D"], SLURM_CONF=conf).stdout.split() == [
            "debug*", "up", "1"]
    finally:
        down = _script("stop", str(folder))
    assert down.returncode == 0, down.stderr
    assert _ours(folder) == []
