"""Bad input: exit code 2, one sentence naming the file/key/value and the fix, no
traceback, and nothing already in the run directory changed.

Recipe mistakes are caught before torch is imported, so they run as real subprocesses
(~1 s each). Mistakes found after the data/model are built run in-process through
`ffdist.train.main` (the same code path the CLI takes, minus 5 s of imports each); the
torchrun case and a full run that skips a broken JPEG are real processes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ffdist import train
from ffdist.errors import EXIT_USER_ERROR
from tests.fault import kit
from tests.helpers import RECIPES, cuda_gpus

DIGITS = str(RECIPES / "digits.yaml")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's hash, except the lock file, which each start rewrites with its pid."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".ffdist.lock"}


@pytest.fixture
def existing_run(ref1: Path, tmp_path: Path) -> Path:
    """A finished run directory that no mistake may change."""
    out = tmp_path / "existing"
    shutil.copytree(ref1, out)
    return out


def only_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffdist: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ recipe (subprocess)

def _recipe_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such recipe file"),
    ("not_yaml", "recipe.yaml: not valid YAML at line 3, column 1"),
    ("not_mapping", "must be a YAML mapping"),
    ("unknown_key", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("wrong_type", "data.batch_size='big' has the wrong type"),
    ("zero_lr", "optim.lr=0.0 is out of range"),
    ("negative_batch", "data.batch_size=-8 is out of range"),
    ("zero_epochs", "schedule.epochs=0 is out of range"),
])
def test_recipe_mistakes(case, expect, tmp_path, existing_run):
    recipe, overrides = DIGITS, [f"output_dir={existing_run}"]
    if case == "missing":
        recipe = str(tmp_path / "nope.yaml")
    elif case == "not_yaml":
        recipe = _recipe_file(tmp_path, "name: x\nmodel: [unclosed\n")
    elif case == "not_mapping":
        recipe = _recipe_file(tmp_path, "- a\n- list\n")
    else:
        overrides.append({"unknown_key": "optim.lrr=0.1", "wrong_type": "data.batch_size=big",
                          "zero_lr": "optim.lr=0", "negative_batch": "data.batch_size=-8",
                          "zero_epochs": "schedule.epochs=0"}[case])
    before = snapshot(existing_run)
    proc = kit.run([sys.executable, "-m", "ffdist.train", recipe, *overrides], timeout=60)
    assert proc.returncode == EXIT_USER_ERROR, kit.explain(proc)
    assert expect in only_error_line(proc.stderr)
    assert snapshot(existing_run) == before


def test_batch_not_divisible_under_torchrun_is_one_line(tmp_path, existing_run):
    before = snapshot(existing_run)
    proc = kit.run(kit.torchrun_cmd(existing_run, "data.batch_size=63"), timeout=90)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: error")]
    assert ours == ["ffdist: error: data.batch_size=63 is the global batch and does not divide "
                    "over 2 processes; use a multiple of 2."], proc.stderr[-3000:]
    # torchrun exits 1 whatever its workers return; it reports theirs:
    assert proc.returncode == 1 and f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr
    assert snapshot(existing_run) == before


# ------------------------------------------------------------------ data, checkpoints, devices

def imagefolder(root: Path, per_class: int = 12) -> Path:
    """A 2-class imagefolder of 8x8 JPEGs made from the digits data."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, n in (("train", per_class), ("val", 4)):
        for label in (0, 1):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            images = d.images[d.target == label][:n] if split == "train" else \
                d.images[d.target == label][-n:]
            for i, img in enumerate(images):
                arr = (img * 255 / 16).astype(np.uint8)
                Image.fromarray(arr).convert("RGB").save(folder / f"{i}.jpg", quality=95)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


FOLDER = ("data.name=imagefolder", "model.num_classes=2", "model.in_channels=3",
          "data.image_size=8", "data.batch_size=8", "schedule.epochs=1", "log.tensorboard=false",
          "log.progress=false", "precision=fp32")


def main_fails(capfd, *args: str) -> str:
    code = train.main([DIGITS, *args])
    err = capfd.readouterr().err
    assert code == EXIT_USER_ERROR, err
    return only_error_line(err)


def test_dataset_root_missing(capfd, tmp_path):
    line = main_fails(capfd, *FOLDER, f"data.root={tmp_path / 'nowhere'}",
                      f"output_dir={tmp_path / 'out'}")
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in line
    assert not (tmp_path / "out").exists()  # refused before the run directory


def test_empty_class_folder(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    for f in (root / "train" / "1").iterdir():
        f.unlink()
    line = main_fails(capfd, *FOLDER, f"data.root={root}", f"output_dir={tmp_path / 'out'}")
    assert f"class folder {root / 'train' / '1'} holds no .jpg/.png images" in line


def test_label_out_of_range_in_filelist(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (tmp_path / "train.txt").write_text("train/0/0.jpg 0\ntrain/1/0.jpg 5\n")
    (tmp_path / "val.txt").write_text("val/0/0.jpg 0\n")
    line = main_fails(capfd, *FOLDER, "data.name=filelist", f"data.root={root}",
                      f"data.train_list={tmp_path / 'train.txt'}",
                      f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={tmp_path / 'out'}")
    assert "data.train_list: label 5 is out of range for 2 classes" in line


def test_num_classes_differs_from_checkpoint(capfd, existing_run):
    before = snapshot(existing_run)
    line = main_fails(capfd, "data.name=synthetic", "model.num_classes=12",
                      f"output_dir={existing_run}", *kit.ARGS)
    assert "already holds a finished run, and this recipe differs in model.num_classes " \
           "(10 -> 12), data.name (digits -> synthetic)" in line
    assert snapshot(existing_run) == before


def test_checkpoint_of_another_model(capfd, ref1, tmp_path):
    ckpt = ref1 / "checkpoints" / "step_00000030.pt"
    line = main_fails(capfd, "model.name=lenet", f"checkpoint.resume={ckpt}",
                      f"output_dir={tmp_path / 'out'}", *kit.ARGS)
    assert f"checkpoint {ckpt} (step 30) was trained with another model.name (small_cnn -> " \
           "lenet), which a resumed run cannot change" in line
    # (a checkpoint without its recipe is incomplete: tests/unit/test_ckpt_format.py)


def test_gpu_that_does_not_exist(capfd, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    missing = cuda_gpus()  # ids are 0..count-1 here: this one never exists
    line = main_fails(capfd, f"launch.gpus=[{missing}]", f"output_dir={tmp_path / 'out'}")
    assert f"launch.gpus=[{missing}] names GPU {missing}" in line


def test_output_dir_not_writable(capfd, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder must go: fails even for root
    line = main_fails(capfd, f"output_dir={blocker / 'run'}", *kit.ARGS)
    assert f"output_dir={blocker / 'run'} is not writable" in line


def test_finished_run_is_never_overwritten(capfd, existing_run):
    before = snapshot(existing_run)
    line = main_fails(capfd, f"output_dir={existing_run}", "checkpoint.resume=never", *kit.ARGS)
    assert "already holds a run and checkpoint.resume=never" in line
    # resume=auto (the default) on a finished run: nothing to do, exit 0, nothing rewritten
    assert train.main([DIGITS, f"output_dir={existing_run}", *kit.ARGS]) == 0
    assert "already holds the finished run (step 30); nothing to do" in capfd.readouterr().out
    assert snapshot(existing_run) == before


# ------------------------------------------------------------------ broken images

def test_broken_jpeg_with_bad_images_error_names_the_file(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    truncate(root / "train" / "1" / "3.jpg")
    line = main_fails(capfd, *FOLDER, f"data.root={root}", "data.bad_images=error",
                      f"output_dir={tmp_path / 'out'}")
    assert f"{root / 'train' / '1' / '3.jpg'}: cannot be decoded as an image" in line


def test_too_many_broken_jpegs_fail_naming_the_fraction(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    for i in range(3):
        truncate(root / "train" / "0" / f"{i}.jpg")
    line = main_fails(capfd, *FOLDER, f"data.root={root}", "data.max_bad_fraction=0.05",
                      f"output_dir={tmp_path / 'out'}")
    assert "of 24 train images cannot be decoded (more than data.max_bad_fraction=0.05)" in line


def test_broken_jpeg_is_skipped_and_reported(tmp_path):
    root = imagefolder(tmp_path / "data")
    bad = root / "train" / "1" / "3.jpg"
    truncate(bad)
    out = tmp_path / "out"
    proc = kit.run([sys.executable, "-m", "ffdist.train", DIGITS, *FOLDER, f"data.root={root}",
                    "data.max_bad_fraction=0.1", f"output_dir={out}"], timeout=90)
    assert proc.returncode == 0, kit.explain(proc)
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if str(bad) in ln]
    assert len(warnings) == 1 and "skipping unreadable train image" in warnings[0]
    assert (out / "model.pt").is_file()


def test_user_error_on_one_rank_under_torchrun_is_one_line_per_failing_rank(tmp_path):
    """Rank 1 alone hits a user error mid-training: it prints its sentence; rank 0, whose
    collective then fails, prints one line pointing at it instead of a gloo traceback."""
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, "launch.pg_timeout=20"), timeout=90,
                   FFDIST_FAULT="data_error:step=3:rank=1")
    assert proc.returncode == 1 and f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
    assert ours[0].startswith("ffdist: error (rank 1 of 2): injected by FFDIST_FAULT at step 3")
    assert all("lost contact with another rank" in ln for ln in ours[1:]), ours
    # the only traceback left is torchrun's own (its agent raises ChildFailedError)
    assert proc.stderr.count("Traceback") == 1 and "[rank0]:" not in proc.stderr
