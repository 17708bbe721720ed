"""checkpoints/best.pt is the run's best evaluation: written at every evaluation that sets a
new best, whatever checkpoint.every_epochs says, holding which step, split and value it is;
`ffdist eval --checkpoint best.pt` gives exactly the best top-1 (and n) the run reported,
for a single-process and a DDP run (ZeRO and EMA runs: tests/distributed/test_ema_zero.py,
tests/workflow/test_regularization.py); the summary names it with its step and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffdist.ckpt_peek import peek
from ffdist.cli import main as cli
from tests.helpers import CPU, FAST, end_event, events, torchrun, train

VAL_SIZE = 360


def evaluate(run: Path, *args: str) -> dict:
    assert cli(["eval", str(run), *args, "--set", "log.tensorboard=false"]) == 0
    return json.loads((run / "eval" / "report.json").read_text())


def best_section(run: Path) -> dict:
    return peek(run / "checkpoints" / "best.pt", ("best",))["best"]


def test_a_short_finetune_keeps_its_best_evaluation_in_best_pt(digits_run: Path,
                                                               tmp_path: Path):
    """Two epochs with no checkpoint interval inside them (every_epochs=10) and a weight
    decay that wipes out what the pretrained weights knew: the best evaluation is the one
    before training, which best.pt must hold, not the final weights."""
    out = tmp_path / "ft"
    proc = train("digits.yaml", *FAST, CPU, "precision=fp32", "schedule.epochs=2",
                 f"model.pretrained={digits_run / 'model.pt'}", "optim.weight_decay=5",
                 "schedule.evaluate_before_train=true", "checkpoint.every_epochs=10",
                 f"output_dir={out}")
    end, val = end_event(out), events(out, "val")
    assert [e["step"] for e in val] == [0, 22, 44]
    assert val[0]["top1"] > 0.8 > val[-1]["top1"], "the weight decay should undo the training"
    best = best_section(out)
    assert best == {"step": 0, "epoch": 0, "split": "val", "weights": "raw", "metric": "top1",
                    "value": end["best_top1"], "n": VAL_SIZE}
    assert end["best_top1"] == val[0]["top1"] and end["best_step"] == 0
    report = evaluate(out, "--checkpoint", str(out / "checkpoints" / "best.pt"))
    assert report["top1"] == end["best_top1"] and report["n"] == VAL_SIZE
    assert evaluate(out)["top1"] == end["final_top1"] < end["best_top1"]  # model.pt: the last
    assert f"checkpoints/best.pt (step 0, top-1 {end['best_top1']:.4f})" in proc.stdout
    best_pt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best_pt["kind"] == "weights" and best_pt["optimizer"] is None and not best_pt["rng"]


# make test-all only: best.pt of several ranks is in the fast tier through tests/distributed/
# test_ema_zero.py::test_zero2_best_pt_gives_back_the_best_value, of one process above
@pytest.mark.extended
def test_a_ddp_run_writes_best_pt_at_its_best_evaluation(tmp_path: Path):
    """Two ranks (one file, written by rank 0) evaluated every epoch, no checkpoint before
    the end: best.pt is the step of the first highest val top-1."""
    out = tmp_path / "ddp"
    torchrun("digits.yaml", *FAST, CPU, "precision=fp32", "schedule.epochs=2",
             "checkpoint.every_epochs=10", f"output_dir={out}")
    end, val = end_event(out), events(out, "val")
    top = max(e["top1"] for e in val)
    first = next(e for e in val if e["top1"] == top)
    assert end["world_size"] == 2 and end["best_top1"] == top
    best = best_section(out)
    assert (best["step"], best["value"], best["n"]) == (first["step"], top, VAL_SIZE)
    report = evaluate(out, "--checkpoint", str(out / "checkpoints" / "best.pt"),
                      "--set", "launch.device=cpu")
    assert report["top1"] == end["best_top1"] and report["n"] == VAL_SIZE
