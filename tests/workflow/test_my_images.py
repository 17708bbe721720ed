"""Your own images in one step: the commands in the header of recipes/my_images.yaml, run as
written (train with a few speed overrides, as the README tour does) on a folder of 50 PNGs
in 3 classes that the test writes: the run's recipe.yaml records model.num_classes and
model.cifar_stem as values, the start line names the recipe, the model and the lr scaled
from optim.lr_reference_batch (and metrics.jsonl trains at that lr), eval and predict work.
A folder of class sub-folders without train/ and val/ is split by data.val_fraction. The
mistakes of starting from resnet50.yaml on the same folder come in one message."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffdist import recipe_load
from ffdist.data import sources
from tests.helpers import RECIPES, REPO, env, refused_together

FAST = ("schedule.epochs=2", "data.image_size=32", "log.progress=false", "log.images=false")
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_images(root: Path, n: int = 50, split: bool = True) -> None:
    """n 32x32 PNGs in 3 colour classes; every fifth in val/ (split), else all in root."""
    rng = np.random.default_rng(0)
    for i in range(n):
        name, colour = list(COLOURS.items())[i % 3]
        folder = root / ("val" if i % 5 == 4 else "train") / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 60, (32, 32, 3)) + np.array(colour) * rng.uniform(0.6, 1.0)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def header_commands() -> list[str]:
    """The `ffdist ...` lines of the recipe's opening comment."""
    lines = []
    for line in (RECIPES / "my_images.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("ffdist "):
            lines.append(text)
    return lines


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`ffdist ARGS` as the venv's ffdist runs it (this checkout's, by PYTHONPATH)."""
    argv = [sys.executable, "-m", "ffdist.cli", *command.split()[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# make test-all only: training on an image folder is in the fast tier through tests/fault/
# user_errors/test_data.py, eval and predict through test_eval.py and test_predict.py, this
# recipe's values through test_starting_from_resnet50_lists_every_problem_at_once
@pytest.mark.extended
def test_the_header_commands_work_as_written(tmp_path: Path):
    commands = header_commands()
    assert [c.split()[1] for c in commands] == ["train", "eval", "predict"], commands
    root = re.search(r"data\.root=(\S+)", commands[0]).group(1)
    write_images(tmp_path / root)
    shutil.copytree(RECIPES, tmp_path / "recipes")

    out = sh(" ".join([commands[0], *FAST]), tmp_path).stdout
    assert "my_images: model resnet18 on cpu x1 (single), batch 32 = 32/rank x 1 accum" in out
    assert "lr 0.0007071 = optim.lr 0.002 x sqrt(32/256) (adamw: square root)" in out, out
    run = tmp_path / "runs" / "my_images"
    saved = recipe_load.load(run / "recipe.yaml")  # eval/predict/resume read numbers
    assert (saved.model.num_classes, saved.model.cifar_stem) == (3, True)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    # 40 training images / 32 = 1 step per epoch, warm-up of 20 steps from 0.1 x lr
    assert [r["step"] for r in train] == [1, 2]
    assert math.isclose(train[1]["lr"], 0.002 * math.sqrt(32 / 256) * (0.1 + 0.9 / 20))

    out = sh(commands[1], tmp_path).stdout
    assert re.search(r"top1 \d\.\d{4}", out) and "n=10" in out, out
    sh(commands[2], tmp_path)
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("path,prediction"), rows


def test_one_folder_of_class_folders_is_split(tmp_path: Path):
    write_images(tmp_path, 30, split=False)
    cfg = recipe_load.load(RECIPES / "my_images.yaml", [f"data.root={tmp_path}"]).data
    source = sources.get("imagefolder")
    source.check_present(cfg, "")
    assert source.class_count(cfg) == 3
    assert source.classes(cfg, 3) == ["blue", "green", "red"]
    data = source.datasets(cfg, 0, 3, 3)
    assert (len(data.train), len(data.val)) == (24, 6)


def test_starting_from_resnet50_lists_every_problem_at_once(tmp_path: Path):
    write_images(tmp_path / "pictures")
    out = tmp_path / "r50"
    problems = refused_together([sys.executable, "-m", "ffdist.train",
                                 str(RECIPES / "resnet50.yaml"),
                                 f"data.root={tmp_path / 'pictures'}", f"output_dir={out}"],
                                out, cwd=REPO)
    assert problems == [
        "model.num_classes=1000 but data.name=imagefolder has 3 classes; set "
        "model.num_classes=3 (or auto).",
        "data.batch_size=1024 is larger than the 40 training images; use a smaller batch."]


@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_num_classes_auto_asks_the_source(data: str):
    from ffdist import assemble
    from ffdist.errors import DataError

    rcp = recipe_load.load(None, [f"data.name={data}", "model.num_classes=auto"])
    if data == "digits":
        assert assemble.settle(rcp).model.num_classes == 10
    else:  # random images of any class count: the recipe must say it
        with pytest.raises(DataError, match="data.name=synthetic does not say how many classes"):
            assemble.settle(rcp)
