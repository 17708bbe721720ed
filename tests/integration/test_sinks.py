"""Log sinks in real training runs (tests/sinks_probe.py registers two test sinks, then runs
ffdist.train): a sink receives every record exactly once, the same records metrics.jsonl
holds, line by line; a sink that fails is reported once, switched off, and the run still
finishes; under torchrun with 2 ranks only rank 0 has sinks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BIN, CPU, RECIPES, free_port, metrics, run
from tests.sinks_probe import calls

TINY = ("schedule.epochs=2", "log.every_steps=5", "precision=fp32", "log.graph=true")
WARNING = "log sink 'failing' failed in record (RuntimeError: this sink breaks on purpose)"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sinks") / "run"
    proc = run([sys.executable, "-m", "tests.sinks_probe", str(RECIPES / "digits.yaml"), *TINY,
                CPU, "log.sinks=[jsonl,recorder,failing]", f"output_dir={out}"], check=False)
    return out, proc


def test_a_sink_gets_every_record_once_as_metrics_jsonl_holds_it(one_process) -> None:
    out, proc = one_process
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = calls(out / "recorder-rank0.jsonl")
    records = [c["rec"] for c in got if c["member"] == "record"]
    assert records == metrics(out)  # the same dicts, in the same order, each once
    splits = [r.get("split", r.get("event")) for r in records]
    assert splits.count("val") == 2 and splits[-1] == "end" and splits.count("end") == 1
    assert splits.count("train") >= 2 * 22 // 5  # every log.every_steps, and each epoch's end
    members = [c["member"] for c in got]
    assert members.count("hparams") == 1 and members[-1] == "close" and members.count("close") == 1
    hparams = next(c for c in got if c["member"] == "hparams")
    assert hparams["metrics"]["hparam/final_top1"] == records[-1]["final_top1"]
    images = [(c["tag"], c["step"]) for c in got if c["member"] == "image"]
    vals = [("val/confusion", r["step"]) for r in records if r.get("split") == "val"]
    assert images == [("train/sample_images", 0), *vals]
    assert members.count("graph") == 1 and members.count("epoch_end") == 2
    for epoch in (0, 1):  # the bar's position: the epoch's start, then after every step
        done = [c["done"] for c in got if c["member"] == "progress" and c["epoch"] == epoch]
        assert done == list(range(23))


def test_a_failing_sink_is_reported_once_and_the_run_finishes(one_process) -> None:
    out, proc = one_process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert (proc.stdout + proc.stderr).count(WARNING) == 1, proc.stdout[-3000:]
    # called once, switched off (never called again), and closed
    assert (out / "failing-calls.txt").read_text().split() == ["record", "close"]


def test_only_rank_0_has_sinks_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "tests.sinks_probe", str(RECIPES / "digits.yaml"), "schedule.epochs=1",
         "log.every_steps=5", "precision=fp32", CPU, "log.sinks=[jsonl,recorder]",
         f"output_dir={out}"])
    assert sorted(p.name for p in out.glob("recorder-rank*")) == ["recorder-rank0.jsonl"]
    records = [c["rec"] for c in calls(out / "recorder-rank0.jsonl") if c["member"] == "record"]
    assert records == metrics(out) and {r["world_size"] for r in records} == {2}
