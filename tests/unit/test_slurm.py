"""ffdist.slurm without a cluster: recipes are checked before anything reaches sbatch
(`ffdist launch ... launch.launcher=slurm`, `bash slurm/train.sh --check`), and the
per-node torchrun of a Slurm job stops on USR1 with one line instead of a traceback.
(tests/slurm/ runs the same on a real two-node cluster, as root.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from ffdist.cli import main as cli_main
from tests.helpers import BIN, FAST, RECIPES, REPO, env, events

DIGITS = str(RECIPES / "digits.yaml")
SCRIPT = str(REPO / "slurm" / "train.sh")


def _launch(capsys, *args: str) -> tuple[int, str]:
    """`ffdist launch DIGITS launch.launcher=slurm ARGS` in this process: (exit code, stderr)."""
    code = cli_main(["launch", DIGITS, "launch.launcher=slurm", *args])
    return code, capsys.readouterr().err


def test_ffdist_launch_checks_the_recipe_before_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(BIN))  # the venv's scripts only: there is no sbatch
    # None of these mistakes ever gets to sbatch.
    code, err = _launch(capsys, "optim.lrr=0.1", f"output_dir={tmp_path / 'a'}")
    assert code == 2 and err.strip() == (
        "ffdist: error: command line: unknown key 'optim.lrr'; "
        "did you mean 'optim.lr'?"), err
    code, err = _launch(capsys, "model.name=resnet5", f"output_dir={tmp_path / 'b'}")
    assert code == 2 and err.strip() == ("ffdist: error: model.name='resnet5' is not a known "
                                         "model; did you mean 'resnet50'?"), err
    # 3 GPUs per node x 2 nodes = 6 processes: a global batch of 64 cannot be split.
    code, err = _launch(capsys, "launch.gpus=[0,1,2]", "--nnodes", "2", "--dry-run",
                        f"output_dir={tmp_path / 'c'}")
    assert code == 2 and "data.batch_size=64 is the global batch and does not divide over 6 " \
        "processes" in err, err
    # A good recipe gets as far as sbatch, and leaves no run directory without it.
    code, err = _launch(capsys, f"output_dir={tmp_path / 'd'}")
    assert code == 2 and err.strip().endswith("sbatch not found on PATH: submit from a Slurm "
                                              "login node, or use another launcher "
                                              "(launch.launcher=torchrun)."), err
    assert not any((tmp_path / d).exists() for d in "abcd")


def _script(*args: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=120)


def test_train_sh_check_mode(tmp_path):
    ok = _script("--check", DIGITS, f"output_dir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == (f"ffdist: {DIGITS} is ready for sbatch: it will run in "
                                 f"{tmp_path / 'run'} and log to {tmp_path / 'run'}/slurm-<job "
                                 "id>.out")
    assert not (tmp_path / "run").exists()  # a check writes nothing
    bad = _script("--check", DIGITS, "optim.lrr=0.1")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "ffdist: error: command line: unknown key 'optim.lrr'; "
        "did you mean 'optim.lr'?")
    empty = _script("--check")
    assert empty.returncode == 2 and empty.stderr.startswith(
        "ffdist: slurm/train.sh: no recipe given; usage: sbatch")
    outside = _script(DIGITS)  # not in a job, not --check
    assert outside.returncode == 2 and "runs inside a Slurm job" in outside.stderr
    for proc in (bad, empty, outside):
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_slurm_node_torchrun_stops_on_usr1_without_traceback(tmp_path):
    """What srun runs on each node (`python -m ffdist.launch --slurm-node`), here as a
    one-node job: USR1 (what slurm/train.sh relays on preemption) makes the workers
    checkpoint, and torchrun, run in that process, ends with one line."""
    out = tmp_path / "run"
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_CPUS_ON_NODE": "2", "SLURMD_NODENAME": "node7"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ffdist.launch", "--slurm-node", DIGITS, f"output_dir={out}",
         "checkpoint.every_epochs=100", "log.every_steps=1", *FAST],
        cwd=REPO, env=env(**job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: the finally below ends all of it
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not events(out, "train"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)  # to torchrun only: it passes it on to its workers
        log = proc.communicate(timeout=120)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 128 + signal.SIGUSR1, log
    assert "ffdist: node node7: torchrun stopped on SIGUSR1" in log, log
    assert "Traceback" not in log, log
    stopped = [int(s) for s in re.findall(r"stopped at step (\d+)", log)]
    assert stopped and (out / "checkpoints" / f"step_{stopped[0]:08d}.pt").exists(), log
