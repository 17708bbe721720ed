"""The data-source seam: a source registered by a test (tests/workflow/dummy_source.py, its
own streams, no sampler or DataLoader) trains, resumes mid-epoch bit for bit and evaluates
every one of its images, through ffdist's unchanged entry points in real processes. Only
the registry and the stream interface (ffdist.data.sources, ffdist.data.stream) are used."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ffdist.cli import main as cli
from ffdist.data import sources
from tests import helpers
from tests.fault import kit
from tests.workflow.dummy_source import N_VAL, Dummy

RUNNER = [sys.executable, "-m", "tests.workflow.dummy_source"]
# 200 images / batch 32 = 6 steps an epoch, 12 in all; checkpoints at steps 4 (mid-epoch
# 0), 8 (mid-epoch 1) and 12; evaluations at 6 and 12. fp32 on CPU: bit-exact reruns.
ARGS = (helpers.CPU, "precision=fp32", "data.name=dummy", "model.num_classes=4",
        "data.batch_size=32", "data.eval_batch_size=10", "schedule.epochs=2",
        "checkpoint.every_steps=4", "checkpoint.keep_last=10", "log.every_steps=1",
        *helpers.FAST)


def train(out: Path) -> str:
    proc = helpers.run([*RUNNER, str(helpers.RECIPES / "digits.yaml"), *ARGS,
                        f"output_dir={out}"], timeout=180)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dummy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dummy") / "run"
    train(out)
    return out


def test_a_registered_source_trains_and_evaluates_all_its_images(
        dummy_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    losses = kit.train_losses(dummy_run)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] * 0.7, losses  # it learns the quadrants
    vals = helpers.events(dummy_run, "val")
    assert [e["step"] for e in vals] == [6, 12] and all(e["n"] == N_VAL for e in vals)
    ckpt = torch.load(dummy_run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert ckpt["data"] == {"dummy_images": 200, "data_seed": 1234}  # the stream's own state
    assert ckpt["classes"] == [f"quadrant{c}" for c in range(4)]

    # ffdist eval (in this process, the source registered here) over its eval stream
    monkeypatch.setitem(sources.REGISTRY, "dummy", Dummy)
    assert cli(["eval", str(dummy_run)]) == 0
    report = json.loads((dummy_run / "eval" / "report.json").read_text())
    assert report["n"] == N_VAL and f"n={N_VAL}" in capsys.readouterr().out
    assert report["top1"] == pytest.approx(vals[-1]["top1"], abs=1e-9)


def test_a_registered_source_resumes_mid_epoch_bit_exact(dummy_run: Path,
                                                         tmp_path: Path) -> None:
    """Resumed from the checkpoint of step 4 (epoch 0, step 4 of 6): the stream skips to the
    step, its state comes back, and every later loss and the weights equal the run's."""
    out = tmp_path / "run"
    shutil.copytree(dummy_run, out)
    (out / "model.pt").unlink()
    shutil.rmtree(out / "eval", ignore_errors=True)
    for ckpt in (out / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > 4:
            ckpt.unlink()
    (out / "checkpoints" / "latest").write_text("step_00000004.pt\n")
    log = train(out)
    assert "resumed from step 4 (epoch 0)" in log, log[-2000:]
    assert "dummy stream: state {'dummy_images': 200, 'data_seed': 1234} restored" in log
    assert kit.train_losses(out) == kit.train_losses(dummy_run)
    kit.same_weights(out / "model.pt", dummy_run / "model.pt")
