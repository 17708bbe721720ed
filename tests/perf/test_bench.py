"""`ffdist bench` in real processes: one device (the fallback) and torchrun with 2 ranks;
`--profile`'s trace (Chrome trace JSON with the profiled steps) and operator table.

Structure and consistency only; speed is never asserted (benchmarks/ prints it)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import BIN, RECIPES, TWO_RANK_DEVICES, free_port, run

KEYS = ("train_images_per_s", "eval_images_per_s", "data_wait_fraction", "step_ms_p50",
        "step_ms_p90", "peak_mem_bytes", "world_size", "model", "batch_size", "precision")
TINY = ("--steps", "4", "--warmup", "1", "--eval-steps", "2")


def check_figures(r: dict, world: int, batch: int, steps: int) -> None:
    for k in KEYS:
        assert k in r, f"bench.json lacks {k}"
    assert r["world_size"] == world and r["batch_size"] == batch
    assert r["model"] == "small_cnn" and r["precision"] in ("bf16", "fp32")
    assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
    assert 0 <= r["data_wait_fraction"] < 1
    assert 0 < r["step_ms_p50"] <= r["step_ms_p90"]
    if r["device"] == "cpu":
        assert r["peak_mem_bytes"] > 10 * 2**20  # peak RSS of a Python process with torch
    else:  # CUDA's max_memory_allocated: weights, grads, momentum of ~98k params at least
        assert r["peak_mem_bytes"] > 3 * 4 * 97_802, r["peak_mem_bytes"]
    assert len(r["ranks"]) == world and [x["rank"] for x in r["ranks"]] == list(range(world))
    slowest = max(x["elapsed_s"] for x in r["ranks"])
    assert r["train_images_per_s"] == pytest.approx(batch * steps / slowest, rel=1e-6)
    for x in r["ranks"]:
        assert len(x["step_ms"]) == steps
        assert x["train_images_per_s"] == pytest.approx(batch / world * steps / x["elapsed_s"])
        # step times are inside the timed span, which also holds the loop's bookkeeping
        assert sum(x["step_ms"]) / 1000 <= x["elapsed_s"] * 1.001
        assert x["eval_images"] > 0


def test_bench_one_device_writes_bench_json_in_run_dir(tmp_path: Path) -> None:
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"),
                f"output_dir={tmp_path}", "data.batch_size=32", *TINY])
    r = json.loads((tmp_path / "bench.json").read_text())
    check_figures(r, world=1, batch=32, steps=4)
    assert r["data"] == "digits" and r["image_size"] == 8
    assert r["pipeline"]["decode"] == "cpu" and r["pipeline"]["images_per_s"] > 0  # real data
    assert "train images/s" in proc.stdout and "bench.json" in proc.stdout
    assert not (tmp_path / "checkpoints").exists()  # bench trains nothing that lasts


@pytest.mark.parametrize("device", TWO_RANK_DEVICES)
def test_bench_torchrun_two_ranks_synthetic(tmp_path: Path, device: str) -> None:
    out = tmp_path / "b.json"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "ffdist.bench", str(RECIPES / "digits.yaml"), "--synthetic", *TINY,
         "--out", str(out), f"output_dir={tmp_path / 'run'}", f"launch.device={device}"])
    r = json.loads(out.read_text())
    check_figures(r, world=2, batch=64, steps=4)
    assert r["device"] == device
    assert r["strategy"] == "ddp" and r["per_rank_batch"] == 32
    assert r["data"] == "synthetic" and r["image_size"] == 8  # digits' own size
    # Eval shards are disjoint: the global count is the sum of the ranks'.
    assert sum(x["eval_images"] for x in r["ranks"]) > r["ranks"][0]["eval_images"]


def test_bench_bad_flag_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ffdist.cli import main

    code = main(["bench", str(RECIPES / "digits.yaml"), "--steps", "0", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "--steps=0" in err and "Traceback" not in err


def test_bench_profile_writes_a_trace_and_prints_the_top_operators(tmp_path: Path) -> None:
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"),
                f"output_dir={tmp_path}", "launch.device=cpu", "precision=fp32", *TINY,
                "--profile"])
    r = json.loads((tmp_path / "bench.json").read_text())
    trace_path = tmp_path / "profile" / "bench-rank0.pt.trace.json"
    assert r["profile_trace"] == str(trace_path)
    names = [e.get("name", "") for e in json.loads(trace_path.read_text())["traceEvents"]]
    assert sum(n.startswith("Optimizer.step#") for n in names) == 4  # --steps 4, profiled
    table = proc.stdout.split(f"profile of 4 bench steps: {trace_path}")[1]
    rows = table.split("Self CPU time total")[0]
    assert len(re.findall(r"^\s*(aten::|autograd::|Optimizer)\S*", rows, re.M)) >= 10, rows
    assert re.search(r"^\s*aten::\w*convolution\w*\s+\d", rows, re.M), rows
    assert len(r["ranks"][0]["step_ms"]) == 4  # the profiled steps are not timed
