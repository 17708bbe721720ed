"""What the caller did with the standard streams never fails a command (ffdist.stdio): a
closed stdout (`>&-`) and a reader that leaves (`| head -1`) let a training run finish, with
exit 0 and its model written, and no traceback or logging error; a Slurm node whose
launcher variable is not a number is one sentence. Real processes: the streams are the
process's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault.user_errors.common import DIGITS, train_cmd
from tests.helpers import CPU, FAST, REPO, env, refused

SHORT = (CPU, *FAST, "schedule.max_steps=3", "log.every_steps=1")


def finished(out: Path, err: str) -> None:
    assert (out / "model.pt").is_file(), err[-3000:]
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]


def test_a_closed_stdout_is_discarded_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"  # (the progress bar asks the closed stream whether it is a tty)
    short = [a for a in SHORT if a != "log.progress=false"]
    cmd = ["sh", "-c", 'exec "$@" >&-', "sh", *train_cmd(DIGITS, *short, f"output_dir={out}")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished(out, proc.stderr)
    assert not list(tmp_path.glob("**/*.log")), "stdout's output landed in a file"


def test_a_reader_that_left_does_not_stop_the_run(tmp_path):
    """`ffdist train ... | head -1`: the pipe closes after the first line; the run goes on,
    finishes and exits 0 (its own code), the rest of its output discarded."""
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(DIGITS, *SHORT, f"output_dir={out}"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader leaves: later writes to the pipe get EPIPE
        err = proc.stderr.read().decode(errors="replace")
        code = proc.wait(timeout=300)
    finally:
        proc.kill() if proc.poll() is None else None
    assert first, err[-3000:]
    assert code == 0, err[-3000:]
    finished(out, err)


def test_a_reader_that_left_a_listing(tmp_path):
    """`ffdist models | head -1`: the listing stops quietly, exit 0."""
    cmd = ["sh", "-c", '"$@" | head -1; exit 0', "sh", sys.executable, "-m", "ffdist.cli",
           "models"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 1 and proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.parametrize("variable", [
    "SLURM_NNODES",
    # make test-all; SLURM_NNODES keeps the path (world.int_env on the job's copy) in the fast tier
    pytest.param("SLURM_NODEID", marks=pytest.mark.extended),
    pytest.param("SLURM_CPUS_ON_NODE", marks=pytest.mark.extended)])
def test_a_slurm_variable_that_is_not_a_number(tmp_path, variable):
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_CPUS_ON_NODE": "2", variable: "two"}
    cmd = [sys.executable, "-m", "ffdist.launch", "--slurm-node", DIGITS,
           f"output_dir={tmp_path / 'run'}", *FAST]
    proc = subprocess.run(cmd, cwd=REPO, env=env(**job), capture_output=True, text=True,
                          timeout=120)
    line = refused(lambda: (proc.returncode, proc.stdout, proc.stderr))
    assert f"the environment variable {variable}=two is not a whole number" in line, line
    assert not (tmp_path / "run").exists()
