"""A run that is not learning says so once: digits at optim.lr=1 (16x too high: its loss
jumps a thousandfold, then val top-1 sits at chance) prints one warning with the likely
causes and finishes; with schedule.stop_if_not_learning=true it stops with exit 2 and one
sentence. A healthy run says nothing. The watch's rules: tests/unit/test_threads.py."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.helpers import FAST, RECIPES, refused, train

ABSURD = ("optim.lr=1", "schedule.epochs=3", "log.every_steps=5", "log.images=false", *FAST)
WARNING = "this run is not learning"


def test_the_warning_comes_once_and_the_run_goes_on(tmp_path: Path):
    proc = train("digits.yaml", *ABSURD, f"output_dir={tmp_path}")
    lines = [ln for ln in proc.stdout.splitlines() if WARNING in ln]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert "likely causes: optim.lr too high for the batch (lr 1 for a global batch of 64" \
           in lines[0] and "schedule.stop_if_not_learning=true stops such a run" in lines[0]
    assert (tmp_path / "model.pt").is_file()


def test_stop_if_not_learning_exits_2(tmp_path: Path):
    line = refused([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"),
                    *ABSURD, "schedule.stop_if_not_learning=true", f"output_dir={tmp_path}"])
    assert line.startswith(f"ffdist: error: {WARNING}: ") and "Stopped" in line, line
    assert not (tmp_path / "model.pt").exists()


def test_a_healthy_run_says_nothing(tmp_path: Path):
    proc = train("digits.yaml", "schedule.epochs=2", "log.images=false", *FAST,
                 f"output_dir={tmp_path}")
    assert WARNING not in proc.stdout + proc.stderr
