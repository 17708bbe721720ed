"""Decompression bombs in a dataset or given to predict: a 109 KB palette PNG of 30000x30000
pixels (2.7 GB as RGB) and a JPEG whose header claims 65000x65000 are refused from their
headers (data.max_image_pixels, predict --max-image-pixels) before any decoder allocates.
As real processes on the CPU, each with its peak memory measured (RUSAGE_CHILDREN of a
parent with one child) against a process that only imports torch and torchvision (0.9 GB
here, with a CUDA build of torch): at most 256 MB more, where decoding one bomb took 4.8 GB.

- training with data.bad_images=skip: both bombs (one in train/, one in val/, so the eval
  loader too) are skipped, named in a warning and counted against data.max_bad_fraction;
- training with data.bad_images=error: one sentence naming the file, its size and the key;
- predict: an error row per bomb, the other files predicted;
- eval (extended): the run's eval loader skips the bomb in val/.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.fault.user_errors.common import DIGITS, FOLDER, bomb_jpeg, bomb_png, imagefolder, train_cmd
from tests.helpers import CPU, env, refused

MARGIN_MB = 256  # over importing torch + torchvision; one decoded bomb is 2.7 GB at least

# Runs one child and reports its peak RSS: RUSAGE_CHILDREN of a fresh parent that has
# exactly one child is that child's maximum.
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "err": p.stderr, "out": p.stdout,
                  "seconds": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measured(cmd: list[str], timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def limit_mb() -> float:
    """Peak memory a command may reach: what importing torch and torchvision takes in a
    process of its own here, plus MARGIN_MB."""
    return measured([sys.executable, "-c", "import torch, torchvision"])["rss_mb"] + MARGIN_MB


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    box = tmp_path_factory.mktemp("bombs")
    return {"png": bomb_png(box / "bomb.png"), "jpeg": bomb_jpeg(box / "bomb.jpg")}


def bombed_folder(root: Path, bombs: dict[str, Path]) -> tuple[Path, Path, Path]:
    """The 2-class imagefolder with the PNG bomb among train/0 and the JPEG one in val/1."""
    imagefolder(root)
    train_bomb, val_bomb = root / "train" / "0" / "bomb.png", root / "val" / "1" / "bomb.jpg"
    train_bomb.write_bytes(bombs["png"].read_bytes())
    val_bomb.write_bytes(bombs["jpeg"].read_bytes())
    return root, train_bomb, val_bomb


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory: pytest.TempPathFactory, bombs: dict[str, Path]) -> dict:
    """A training run over the bombed folder with data.bad_images=skip, measured."""
    box = tmp_path_factory.mktemp("skip")
    root, train_bomb, val_bomb = bombed_folder(box / "data", bombs)
    out = box / "run"
    result = measured(train_cmd(DIGITS, *FOLDER, CPU, f"data.root={root}", "data.bad_images=skip",
                                "data.max_bad_fraction=0.2", f"output_dir={out}"))
    return {**result, "run": out, "train_bomb": train_bomb, "val_bomb": val_bomb}


def test_training_skips_and_counts_bombs_in_little_memory(skipped_run, limit_mb):
    r = skipped_run
    assert r["rc"] == 0, r["err"][-3000:]
    text = r["out"] + r["err"]
    for path, split, side in ((r["train_bomb"], "train", 30000), (r["val_bomb"], "val", 65000)):
        said = [ln for ln in text.splitlines() if str(path) in ln]
        assert said and f"skipping unreadable {split} image {path} ({side}x{side} = " \
                         f"{side * side:,} pixels, more than data.max_image_pixels=89478485)" \
                         in said[0], text[-3000:]
    assert (r["run"] / "model.pt").is_file()
    assert r["rss_mb"] < limit_mb, (r["rss_mb"], limit_mb)


def test_training_with_bad_images_error_stops_in_one_sentence(tmp_path, bombs, limit_mb):
    root, train_bomb, _ = bombed_folder(tmp_path / "data", bombs)
    out = tmp_path / "run"
    seen: dict = {}

    def action() -> tuple[int, str, str]:
        seen.update(measured(train_cmd(DIGITS, *FOLDER, CPU, f"data.root={root}",
                                       "data.bad_images=error", f"output_dir={out}")))
        return seen["rc"], seen["out"], seen["err"]

    line = refused(action, root)
    assert line == (f"ffdist: error: {train_bomb}: not decoded: 30000x30000 = 900,000,000 "
                    "pixels, more than data.max_image_pixels=89478485; resize or remove the "
                    "file, or set data.bad_images=skip to skip such files (or raise "
                    "data.max_image_pixels if images this large are expected).")
    assert seen["rss_mb"] < limit_mb, (seen["rss_mb"], limit_mb)


def test_predict_reports_bombs_and_predicts_the_rest_in_little_memory(skipped_run, bombs,
                                                                      tmp_path, limit_mb):
    assert skipped_run["rc"] == 0, skipped_run["err"][-3000:]
    folder = tmp_path / "images"
    folder.mkdir()
    for name, src in (("bomb.png", bombs["png"]), ("bomb.jpg", bombs["jpeg"])):
        (folder / name).write_bytes(src.read_bytes())
    Image.new("RGB", (8, 8), (250, 250, 250)).save(folder / "white.webp")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(folder / "black.png")
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "preds.csv"
    r = measured([sys.executable, "-m", "ffdist.predict", str(skipped_run["run"]), str(folder),
                  "--out", str(out), "--device", "cpu"])
    assert r["rc"] == 0, r["err"][-3000:]
    assert "skipped 1 file(s) that are not JPEG, PNG, WebP, GIF, BMP or TIFF images: notes.txt" \
        in r["out"]
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert sorted(rows) == ["black.png", "bomb.jpg", "bomb.png", "white.webp"]
    assert rows["bomb.png"]["error"] == ("not decoded (30000x30000 = 900,000,000 pixels, more "
                                         "than --max-image-pixels=89478485)")
    assert rows["bomb.jpg"]["error"].startswith("not decoded (65000x65000 = ")
    assert rows["white.webp"]["prediction"] and rows["black.png"]["prediction"]
    assert r["rss_mb"] < limit_mb, (r["rss_mb"], limit_mb)


def test_predict_max_image_pixels_sets_the_limit(skipped_run, tmp_path, capfd):
    """The flag, in this process: 8x8 = 64 pixels pass a limit of 64, not one of 63."""
    from ffdist.predict import main

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for limit, error in (("64", ""), ("63", "not decoded (8x8 = 64 pixels, more than "
                                            "--max-image-pixels=63)")):
        out = tmp_path / f"p{limit}.csv"
        main([str(skipped_run["run"]), str(tmp_path / "a.png"), "--out", str(out), "--grid", "0",
              "--max-image-pixels", limit])
        assert next(csv.DictReader(out.open()))["error"] == error
    capfd.readouterr()


# make test-all only; the fast tier covers its path: test_training_skips_and_counts_bombs_in_
# little_memory (the run's own evaluations read val/ through the same eval loader)
@pytest.mark.extended
def test_eval_skips_the_bomb_in_little_memory(skipped_run, limit_mb):
    assert skipped_run["rc"] == 0, skipped_run["err"][-3000:]
    r = measured([sys.executable, "-m", "ffdist.evaluate", str(skipped_run["run"])])
    assert r["rc"] == 0, r["err"][-3000:]
    assert f"skipping unreadable val image {skipped_run['val_bomb']} (65000x65000" in \
        r["out"] + r["err"]
    assert r["rss_mb"] < limit_mb, (r["rss_mb"], limit_mb)
