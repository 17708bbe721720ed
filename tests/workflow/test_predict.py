"""`ffdist predict`: CSV rows, top-k, the uncertain flag, batching, unreadable files, the
thumbnail picture, grey 8x8 runs fed with a larger RGB JPEG."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ffdist.cli import main as cli


def _images(digits_pngs: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in sorted(digits_pngs.glob("*.png"))[::60]:  # 30 digits, all classes
        shutil.copy(f, folder / f.name)
    grey = np.asarray(Image.open(sorted(digits_pngs.glob("*_3.png"))[0]))
    rgb = np.stack([grey] * 3, -1).repeat(8, 0).repeat(8, 1)  # 64x64 RGB JPEG of a 3
    Image.fromarray(rgb).save(folder / "big_rgb_3.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_predict_folder(digits_run: Path, digits_pngs: Path, tmp_path: Path, capsys):
    folder = _images(digits_pngs, tmp_path / "in")
    out = tmp_path / "preds.csv"
    assert cli(["predict", str(digits_run), str(folder), "--out", str(out), "--topk", "3",
                "--batch-size", "7"]) == 0
    rows = _rows(out)
    assert len(rows) == 32
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["error"].startswith("unreadable image")
    assert broken[0]["prediction"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 31
    for r in good:
        probs = [float(r[f"top{i}_prob"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert r["prediction"] == r["top1"] and r["prediction"] in [str(i) for i in range(10)]
        expect = float(r["probability"]) < 0.5 or float(r["entropy"]) > 0.6
        assert r["uncertain"] == str(int(expect))
    labelled = [r for r in good if r["path"].endswith(".png")]
    right = sum(r["prediction"] == Path(r["path"]).stem.split("_")[1] for r in labelled)
    assert right / len(labelled) >= 0.75  # a 3-epoch model, ~92% on val
    assert Image.open(out.with_suffix(".png")).size[0] > 200
    assert "31 image(s) predicted" in capsys.readouterr().out

    # Same probabilities whatever the batch size (no cross-talk between images).
    again = tmp_path / "again.csv"
    assert cli(["predict", str(digits_run), str(folder), "--out", str(again), "--grid", "0"]) == 0
    for a, b in zip(rows, _rows(again)):
        assert a["path"] == b["path"] and a["prediction"] == b["prediction"]
        if a["probability"]:
            assert math.isclose(float(a["probability"]), float(b["probability"]), abs_tol=2e-4)


def test_predict_only_unreadable_exits_1_and_missing_path_exits_2(digits_run: Path,
                                                                  tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "p.csv"
    assert cli(["predict", str(digits_run), str(bad), "--out", str(out)]) == 1
    assert _rows(out)[0]["error"]
    assert cli(["predict", str(digits_run), str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_predict_tta_averages_with_the_mirror(digits_run: Path, digits_pngs: Path, tmp_path: Path):
    files = [str(f) for f in sorted(digits_pngs.glob("*.png"))[:8]]
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert cli(["predict", str(digits_run), *files, "--out", str(plain), "--grid", "0"]) == 0
    assert cli(["predict", str(digits_run), *files, "--out", str(tta), "--grid", "0",
                "--tta"]) == 0
    a, b = _rows(plain), _rows(tta)
    assert [r["path"] for r in a] == [r["path"] for r in b] == files
    # digits are not mirror-symmetric: averaging with the mirror changes the probabilities
    assert any(abs(float(x["probability"]) - float(y["probability"])) > 1e-3
               for x, y in zip(a, b))


def test_picture_captions_and_lists_unreadable_files(tmp_path: Path):
    """The grid names every file it could not read, under the thumbnails (pixel facts: one
    line of text per file), and cuts the list with a count beyond 20."""
    import torch

    from ffdist import predict
    from tests.unit.test_visual import _ink_bands

    def rows(bad: int) -> list[predict.Row]:
        good = [predict.Row(str(tmp_path / f"img_{i}.png"), probs=torch.eye(10)[i % 10] * 0.9 + 0.01,
                            thumb=torch.zeros(1, 8, 8, dtype=torch.uint8)) for i in range(7)]
        return good + [predict.Row(str(tmp_path / f"bad_{i}.png"), error="unreadable image (x)")
                       for i in range(bad)]

    classes = [str(i) for i in range(10)]
    for bad, lines in ((0, 0), (2, 3), (25, 22)):  # head + files (+ "... and 5 more")
        pic = predict.save_picture(tmp_path / "p.png", rows(bad), classes, 0.5, 0.6, 36)
        assert _ink_bands(pic, pic.info["footer_top"], pic.height) == lines, bad
        assert Image.open(tmp_path / "p.png").size == pic.size
    # Nothing readable: no picture (the CSV and the exit status say it).
    assert predict.save_picture(tmp_path / "q.png", rows(3)[7:], classes, 0.5, 0.6, 36) is None
