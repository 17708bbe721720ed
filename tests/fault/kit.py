"""Shared pieces of the fault tests: one tiny digits schedule, real processes, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from tests.helpers import BIN, CPU, RECIPES, REPO, env, free_port, metrics

# 30 steps of 64 over 2 epochs (22 steps each): checkpoints every 5 steps, so some are
# mid-epoch; one loss per step in metrics.jsonl; fp32 on CPU ranks (also where GPUs exist)
# so that runs are bit-exact.
STEPS = 30
ARGS = (CPU, "precision=fp32", "schedule.epochs=2", f"schedule.max_steps={STEPS}",
        "checkpoint.every_steps=5", "checkpoint.keep_last=10", "log.every_steps=1",
        "log.tensorboard=false", "log.progress=false")


WINDOW4 = "log.every_steps=4"
"""Log lines at steps 4, 8, 12, ... (and the epoch's end): checkpoints fall between them."""


def python_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *ARGS,
            f"output_dir={out}", *overrides]


def torchrun_cmd(out: Path, *overrides: str, nproc: int = 2,
                 extra: tuple[str, ...] = ()) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *extra, "-m", "ffdist.train", str(RECIPES / "digits.yaml"),
            *ARGS, f"output_dir={out}", *overrides]


def run(cmd: list[str], timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)


def start(cmd: list[str], **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def explain(proc: subprocess.CompletedProcess | subprocess.Popen, out: str = "") -> str:
    text = out or (proc.stdout or "") + (getattr(proc, "stderr", "") or "")
    return f"exit {proc.returncode}\n{text[-3000:]}"


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Poll metrics.jsonl until a train event at `step` or later is logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        try:
            if any(e.get("split") == "train" and e["step"] >= step for e in metrics(run_dir)):
                return
        except (FileNotFoundError, ValueError):
            pass  # not written yet, or a line being written
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from each child's environment)."""
    found = {}
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "ffdist.train" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def send(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; asserts that no step is logged twice."""
    steps = [e["step"] for e in metrics(run_dir) if e.get("split") == "train"]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {e["step"]: e["loss"] for e in metrics(run_dir) if e.get("split") == "train"}


def same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a, weights_only=True)
    wb = torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()
