"""Shared test helpers: run ffdist as a user would, in real processes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ffdist.errors import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout's ffdist first on the path (so a
    worktree or fresh clone tests its own code), few threads, no GPU assumptions."""
    e = dict(os.environ)
    # ffdist.dist sets DS_ACCELERATOR=cpu in a process whose ranks run on the CPU; tests that
    # train in-process (launch.device=cpu) must not hand that to every later child process.
    e.pop("DS_ACCELERATOR", None)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # slurm/train.sh runs this interpreter, not the checkout's .venv (a worktree, or a clone
    # tested with another environment, has none) nor a python3 found on PATH.
    e.setdefault("FFDIST_PYTHON", sys.executable)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 300, check: bool = True,
        **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def train(recipe: str, *overrides: str, timeout: float = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    """python -m ffdist.train (one process, the fallback)."""
    return run([sys.executable, "-m", "ffdist.train", str(RECIPES / recipe), *overrides],
               timeout=timeout, check=check)


def torchrun(recipe: str, *overrides: str, nproc: int = 2, timeout: float = 300,
             check: bool = True, extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), *extra_args, "-m", "ffdist.train", str(RECIPES / recipe),
                *overrides], timeout=timeout, check=check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path, split: str) -> list[dict]:
    return [e for e in metrics(run_dir) if e.get("split") == split]


def end_event(run_dir: Path) -> dict:
    ends = [e for e in metrics(run_dir) if e.get("event") == "end"]
    assert len(ends) == 1, f"expected one end event, got {len(ends)}"
    return ends[0]


# -- the user-error contract -----------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """Every file's hash and every sub-folder under `folder`, except the run lock, which each
    start rewrites with its pid."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            if p.is_file() else "folder"
            for p in sorted(Path(folder).rglob("*")) if p.name != ".ffdist.lock"}


def state(path: Path) -> object:
    """What `path` holds, to compare before and after: None when absent, else its snapshot
    (a folder) or its hash (a file)."""
    path = Path(path)
    if path.is_dir():
        return snapshot(path)
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else None


def error_line(text: str, progress: str = "") -> str:
    """The line of a user error, asserting that it is the only line of `text` (apart from
    lines starting with `progress`, a command's report of what it is doing) and that no
    traceback came with it."""
    lines = [ln for ln in text.splitlines()
             if ln.strip() and not (progress and ln.startswith(progress))]
    assert len(lines) == 1 and lines[0].startswith("ffdist: error: "), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return lines[0]


Action = Callable[[], tuple[int, str, str]]


def in_process(capfd: pytest.CaptureFixture, main: Callable[[list[str]], int],
               *argv: str) -> Action:
    """A command's main(argv) called in this process (the code path of the CLI without
    seconds of imports), as an action for `refused`."""
    return lambda: (main(list(argv)), *capfd.readouterr())


def refused(action: list[str] | Action, *untouched: Path, progress: str = "",
            cwd: Path | None = None, timeout: float = 120) -> str:
    """The contract of a mistake a user can make: exit 2, one sentence ("ffdist: error: ...")
    and nothing else on stderr, no traceback, and nothing written: every path of `untouched`
    is as it was (a folder byte for byte, an absent path still absent).

    `action` is a command line, run as a real process (this checkout's ffdist, in `cwd`, by
    default the checkout), or a callable returning (exit status, stdout, stderr), e.g.
    `in_process`. Returns the sentence's line."""
    before = {p: state(p) for p in untouched}
    if callable(action):
        code, out, err = action()
    else:
        proc = subprocess.run(action, cwd=cwd or REPO, env=env(), capture_output=True,
                              text=True, timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == EXIT_USER_ERROR, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    line = error_line(err, progress)
    assert "Traceback" not in out, out[-3000:]
    for path, was in before.items():
        assert state(path) == was, f"a refused command changed {path}"
    return line


def refused_together(action: list[str], *untouched: Path, cwd: Path | None = None,
                     timeout: float = 120) -> list[str]:
    """The contract of several mistakes found by the checks that run before training
    (ffdist.errors.Refusals): exit 2, no traceback, nothing written, and ONE message on
    stderr: "ffdist: error: N problems stop this run; fix each:" then one line per problem
    ("  - ..."), N of them. The one exception to `refused`'s one sentence. Returns the
    problems' lines."""
    before = {p: state(p) for p in untouched}
    proc = subprocess.run(action, cwd=cwd or REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    text = proc.stderr
    assert proc.returncode == EXIT_USER_ERROR, f"exit {proc.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text + proc.stdout, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0]
    assert head.startswith("ffdist: error: ") and head.endswith("problems stop this run; fix "
                                                                   "each:"), text[-3000:]
    count = int(head.split()[2])
    problems = lines[1:]
    assert len(problems) == count >= 2 and all(p.startswith("  - ") for p in problems), text
    for path, was in before.items():
        assert state(path) == was, f"a refused command changed {path}"
    return [p[4:] for p in problems]


# Overrides that make a digits run tiny and quiet for tests.
FAST = ("log.tensorboard=false", "log.progress=false")


# -- devices ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def cuda_gpus() -> int:
    """GPUs torch can use here: the real count (tests/conftest.py skips `gpu` tests on it)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


CPU = "launch.device=cpu"
"""Ranks on the CPU (gloo) whatever GPUs this machine has: for tests with more ranks than a
machine may have GPUs, and for comparisons that are exact only on the CPU (CUDA kernels
choose algorithms per shape and some reduce with atomics, in a different order each run)."""

# The 2-rank tests that mean the same on GPUs: CPU ranks (gloo) always, and NCCL ranks
# (launch.device=cuda) where 2 GPUs are visible; elsewhere that case reports "no GPU".
TWO_RANK_DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="nccl", marks=(pytest.mark.gpu, pytest.mark.multigpu)),
]


# -- launchers other than torchrun ---------------------------------------------------------

def accelerate(recipe: str, *overrides: str, launch_args: tuple[str, ...] = ("--multi_gpu",
               "--num_processes", "2"), timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS -m ffdist.train RECIPE ...` (a free port each time)."""
    return run([str(BIN / "accelerate"), "launch", *launch_args, "--main_process_port",
                str(free_port()), "-m", "ffdist.train", str(RECIPES / recipe), *overrides],
               timeout=timeout)


def deepspeed_launcher(recipe: str, *overrides: str, nproc: int = 2,
                       timeout: float = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module ffdist.train RECIPE ...`; without GPUs the launcher
    takes N as given and starts N CPU ranks."""
    return run([str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", "ffdist.train", str(RECIPES / recipe),
                *overrides], timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged training loss (log.every_steps=1 gives one per optimizer step)."""
    return {e["step"]: e["loss"] for e in events(run_dir, "train")}
