"""`ffdist launch` really starts torchrun and the trainer trains a world of 2."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import FAST, RECIPES, TWO_RANK_DEVICES, end_event, events, run


@pytest.mark.parametrize("device", TWO_RANK_DEVICES)
def test_ffdist_launch_trains_world_of_two(tmp_path, device):
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "ffdist.cli", "launch", str(RECIPES / "digits.yaml"),
                f"launch.device={device}", "launch.nproc=2", "schedule.epochs=2",
                f"output_dir={out}", *FAST], timeout=240)
    assert "torchrun" in proc.stdout and "--nproc_per_node 2" in proc.stdout  # the command
    assert f"on {device} x2 (ddp)" in proc.stdout  # where the ranks ran
    assert {e["world_size"] for e in events(out, "train") + events(out, "val")} == {2}
    assert end_event(out)["step"] == 2 * 22
    assert (out / "model.pt").exists()


def test_ffdist_launch_returns_the_trainer_exit_code(tmp_path):
    # The recipe loads and its data folders exist (launch's own check passes), but the
    # trainer fails on a class folder without images (exit 2): `ffdist launch` must hand
    # that code back, not its own success.
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    proc = run([sys.executable, "-m", "ffdist.cli", "launch", str(RECIPES / "digits.yaml"),
                "launch.nproc=1", "data.name=imagefolder", f"data.root={tmp_path}/data",
                f"output_dir={tmp_path}/run", *FAST], timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "-m ffdist.train" in proc.stdout and "ffdist: error:" in proc.stderr
