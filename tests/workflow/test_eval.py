"""`ffdist eval`: the same numbers as training's last evaluation, exact counts under
torchrun with 2 ranks, --checkpoint PATH, files written, errors as one sentence, and
key=value words refused naming the option (--checkpoint, --weights, --set) that eval,
predict and export share."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from ffdist.cli import main as cli
from tests import helpers

VAL_SIZE = 360  # digits: 20% of 1,797, stratified


def _report(run: Path) -> dict:
    return json.loads((run / "eval" / "report.json").read_text())


def test_eval_matches_training_and_writes_files(digits_run: Path):
    assert cli(["eval", str(digits_run)]) == 0  # in-process; the torchrun test runs processes
    r = _report(digits_run)
    last = helpers.events(digits_run, "val")[-1]
    assert r["n"] == VAL_SIZE == last["n"] and r["world_size"] == 1
    assert abs(r["top1"] - last["top1"]) < 1e-9 and abs(r["top5"] - last["top5"]) < 1e-9
    assert [c["class"] for c in r["per_class"]] == [str(i) for i in range(10)]
    assert sum(c["support"] for c in r["per_class"]) == VAL_SIZE
    hits = sum(c["recall"] * c["support"] for c in r["per_class"])
    assert abs(hits / VAL_SIZE - r["top1"]) < 1e-9  # per-class recall agrees with top-1
    for c in r["per_class"]:
        assert 0.0 <= c["precision"] <= 1.0 and 0.0 <= c["f1"] <= 1.0
    rows = list(csv.reader((digits_run / "eval" / "confusion.csv").open()))
    assert rows[0] == ["true\\predicted", *[str(i) for i in range(10)]]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == VAL_SIZE
    picture = Image.open(digits_run / "eval" / "confusion.png")
    assert picture.size[0] > 500
    from tests.unit.test_visual import _ink_bands

    assert _ink_bands(picture, 0, 50) == 2  # the title (run, weights) and top-1 with n


@pytest.mark.parametrize("device", helpers.TWO_RANK_DEVICES)
def test_eval_torchrun_two_ranks_exact_counts_and_checkpoint(digits_run: Path, device: str):
    best = digits_run / "checkpoints" / "best.pt"
    where = f"launch.device={device}"
    # The reference: one process on the same device. (digits_run trained where it found a
    # GPU, and CPU and GPU kernels round differently: a borderline image may flip.)
    assert cli(["eval", str(digits_run), "--checkpoint", str(best), "--set", where]) == 0
    one = _report(digits_run)
    helpers.run([str(helpers.BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                 str(helpers.free_port()), "-m", "ffdist.evaluate", str(digits_run),
                 "--checkpoint", str(best), "--set", "log.tensorboard=false", "--set", where])
    r = _report(digits_run)
    assert r["world_size"] == 2 and r["n"] == VAL_SIZE  # disjoint shards, no padding
    assert r["weights"] == str(best)
    assert abs(r["top1"] - one["top1"]) < 1e-9 and r["per_class"] == one["per_class"]
    if helpers.cuda_gpus() == 0:  # trained on this CPU: the number training reported
        assert abs(r["top1"] - helpers.end_event(digits_run)["best_top1"]) < 1e-9


def test_evaluate_before_train_runs_first(digits_run: Path):
    val = helpers.events(digits_run, "val")
    assert val[0]["step"] == 0 and len(val) == 4  # before training + 3 epochs
    assert val[0]["top1"] < val[-1]["top1"]


def test_eval_errors_are_one_sentence(tmp_path: Path, capsys):
    assert cli(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffdist: error:") and "recipe.yaml" in err and "\n" not in err


@pytest.mark.parametrize("command", ["eval", "export"])
@pytest.mark.parametrize("word,fix", [
    ("checkpoint=runs/x/checkpoints/best.pt", "--checkpoint runs/x/checkpoints/best.pt"),
    ("weights=ema", "--weights ema"),
    ("data.root=/new/place", "--set data.root=/new/place"),
])
def test_key_value_words_are_refused_naming_the_option(tmp_path: Path, capsys, command: str,
                                                       word: str, fix: str):
    """eval, predict and export take the same options (--checkpoint, --weights, --set): a
    key=value word is refused, before anything is read, with the option it should be."""
    required = ["--format", "torchscript"] if command == "export" else []
    assert cli([command, str(tmp_path), word, *required]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ffdist: error: ffdist {command}: unexpected argument '{word}'")
    assert fix in err and "\n" not in err
