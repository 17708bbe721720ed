"""launch.threads=auto in real processes: the start line says how many intra-op threads the
process runs and why, from the cores it may use (an affinity mask of one core) and from
the ranks of its node (LOCAL_WORLD_SIZE of two ranks that share the machine); the process
really runs that many (torch.get_num_threads, in bench.json). One process of
strategy.name=ddp says `single`, which is what trains. The rule itself, case by case:
tests/unit/test_threads.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ffdist import threads
from tests.helpers import FAST, RECIPES, REPO, env, free_port

# A micro-batch of 32 images of 64x64 = 131,072 pixels: work for 2 threads by the rule, so
# that one core (or one of two ranks on two cores) is what limits auto to 1.
WORK = ("data.name=synthetic", "data.image_size=64", "model.in_channels=3",
        "data.batch_size=32", "data.synthetic_size=96", "schedule.max_steps=1",
        "log.images=false", "checkpoint.every_epochs=1000", *FAST)
LINE = re.compile(r"(\d+) threads? \(auto: ([^\n]*)\)\n")
CORES = threads.usable_cores().count


def no_omp(**extra: str) -> dict[str, str]:
    e = env(**extra)
    e.pop("OMP_NUM_THREADS", None)  # tests set it to 1 for every child: auto decides here
    return e


def start_line(out: str) -> tuple[int, str]:
    found = LINE.search(out)
    assert found, out[-3000:]
    return int(found.group(1)), found.group(2)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to limit a process to 1 of them")
def test_auto_takes_the_affinity_mask(tmp_path: Path):
    code = ("import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "sys.argv = sys.argv[1:]; runpy.run_module('ffdist.train', run_name='__main__')")
    cmd = [sys.executable, "-c", code, "ffdist.train", str(RECIPES / "digits.yaml"), *WORK,
           "strategy.name=ddp", f"output_dir={tmp_path / 'one'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=no_omp(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, why = start_line(proc.stdout)
    assert n == 1 and why.startswith("1 core (affinity, of ") and why.endswith("1 rank"), why
    assert "on cpu x1 (single)" in proc.stdout  # strategy.name=ddp alone trains as single
    # the same run without the mask uses 2 threads (the work's), where it has 2 cores
    proc = subprocess.run(cmd[:1] + ["-m", "ffdist.train"] + cmd[4:-1]
                          + [f"output_dir={tmp_path / 'all'}"], cwd=REPO, env=no_omp(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert start_line(proc.stdout)[0] == 2


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to share between 2 ranks")
def test_auto_shares_the_cores_between_the_ranks_of_a_node(tmp_path: Path):
    """Two gloo ranks started as a launcher starts them (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_*), without torchrun's OMP_NUM_THREADS=1: auto divides the cores by 2."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *WORK,
         "launch.device=cpu", f"output_dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=no_omp(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    n, why = start_line(outs[0][0])  # rank 0 prints it
    assert "on cpu x2 (ddp)" in outs[0][0]
    assert (n, why) == (min(CORES // 2, 2), f"{threads.usable_cores().why}, 2 ranks"), why


def test_the_process_runs_the_threads_it_resolved(tmp_path: Path):
    """bench.json records torch.get_num_threads() of the timed process: launch.threads=3 is
    applied (over the tests' OMP_NUM_THREADS=1)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ffdist.bench", str(RECIPES / "digits.yaml"), *WORK,
         "launch.threads=3", "--steps", "1", "--warmup", "0", "--reps", "1", "--eval-steps",
         "1", "--out", str(out), f"output_dir={tmp_path}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["threads"] == 3
