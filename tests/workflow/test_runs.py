"""`ffdist runs`: a table (and --json) of the runs under a folder: finished runs with their
best/final top-1, steps and time; a run killed after a checkpoint as "stopped at step N"
with the time its checkpoint counted; a run whose lock a live process holds as running,
naming it; the recipe keys in which the runs differ and nothing else. Without torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffdist import run_dir
from ffdist.cli import main as cli
from tests.helpers import FAST, RECIPES, REPO, env, run, train

TINY = (*FAST, "launch.device=cpu", "schedule.epochs=1", "schedule.max_steps=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/a and runs/b finished (b with another lr), runs/c killed after step 3 with a
    checkpoint at step 2, runs/d a folder whose lock this test process holds."""
    root = tmp_path_factory.mktemp("runs")
    train("digits.yaml", *TINY, f"output_dir={root / 'a'}")
    train("digits.yaml", *TINY, "optim.lr=0.05", f"output_dir={root / 'b'}")
    killed = run([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *TINY,
                  "checkpoint.every_steps=2", "schedule.evaluate_before_train=true",
                  f"output_dir={root / 'c'}"], check=False, FFDIST_FAULT="kill:step=3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (root / "d").mkdir()
    (root / "d" / "recipe.yaml").write_text((root / "a" / "recipe.yaml").read_text())
    return root


def listing(root: Path, capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli(["runs", str(root), *args]) == 0
    return capsys.readouterr().out


def test_the_table_shows_each_run_state_numbers_and_the_keys_that_differ(runs: Path, capsys):
    held = run_dir.lock(runs / "d")  # a live process holds runs/d: it is running
    try:
        lines = listing(runs, capsys).splitlines()
    finally:
        held.release()
    head, rows = lines[0].split(), {ln.split()[0]: ln for ln in lines[1:]}
    assert head == ["run", "state", "best", "final", "steps", "time", "checkpoint.every_steps",
                    "optim.lr", "schedule.evaluate_before_train"]
    end = json.loads((runs / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    a = rows["a"].split()
    assert a[:5] == ["a", "finished", f"{end['best_top1']:.4f}", f"{end['final_top1']:.4f}",
                     "4"] and a[-3:] == ["0", "0.1", "False"]
    assert rows["b"].split()[-2] == "0.05"
    assert "stopped at step 2" in rows["c"]
    assert f"running (pid {os.getpid()} on {socket.gethostname()})" in rows["d"]
    assert "pid" not in listing(runs, capsys)  # the lock let go: runs/d no longer running


def test_json_gives_the_same_with_the_checkpoint_totals_of_a_stopped_run(runs: Path, capsys):
    out = json.loads(listing(runs, capsys, "--json"))
    assert out["keys"] == ["checkpoint.every_steps", "optim.lr",
                           "schedule.evaluate_before_train"]
    by_name = {r["name"]: r for r in out["runs"]}
    assert [by_name[n]["state"] for n in "abcd"] == ["finished", "finished", "stopped",
                                                       "stopped"]
    assert by_name["b"]["differs"] == {"checkpoint.every_steps": 0, "optim.lr": 0.05,
                                       "schedule.evaluate_before_train": False}
    ckpt = torch.load(runs / "c" / "checkpoints" / "step_00000002.pt", weights_only=True)
    c = by_name["c"]
    assert (c["step"], c["seconds"], c["segments"]) == (2, ckpt["totals"]["seconds"], 1)
    best = torch.load(runs / "c" / "checkpoints" / "best.pt", weights_only=True)["best"]
    assert (c["best_top1"], c["best_step"]) == (best["value"], 0)  # evaluated before step 1
    assert by_name["d"]["describe"] == "stopped before its first checkpoint"
    a = by_name["a"]
    end = json.loads((runs / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (a["seconds"], a["segments"], a["best_step"]) == (end["seconds"], 1, 4)


def test_it_imports_no_torch_and_refuses_a_missing_folder(runs: Path, tmp_path: Path):
    code = ("import sys; from ffdist.cli import main; rc = main(['runs', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(runs)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped at step 2" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ffdist.cli", "runs", str(tmp_path / "nope")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'nope'} is not a folder" in proc.stderr
