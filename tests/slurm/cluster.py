"""A real one-node Slurm cluster for tests: started by tests/slurm/start_cluster.sh.

As root with apt-get (CI: .ci/system-setup has already done it), the fixture makes sure
munged, slurmctld and slurmd run and the node is idle; elsewhere it skips and says why.
A failing bring-up as root is a test failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

START = Path(__file__).with_name("start_cluster.sh")


def missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def ensure_cluster() -> None:
    reason = missing_capability()
    if reason:
        pytest.skip(f"no Slurm test cluster: {reason}")
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"Slurm bring-up failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def job_state(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(job_id: str, timeout: float) -> dict[str, str]:
    """Block until the job ends (a requeued job counts as running); its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                     "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"Slurm job {job_id} still {job_state(job_id).get('JobState')} "
                         f"after {timeout:.0f} s (cancelled)")
