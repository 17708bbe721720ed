"""`ffdist samples`: digit PNGs from the val split, labels in the names, for the README's
predict example; idempotent, and never overwrites a user's file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ffdist.cli import main as cli
from ffdist.data import digits


def test_samples_are_val_digits_named_by_their_label(tmp_path: Path, capsys):
    out = tmp_path / "samples"
    assert cli(["samples", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 12 and "12 sample image(s) written" in capsys.readouterr().out
    images, labels = digits.load()
    train, val = digits.split(labels, 0.2)
    seen = set()
    for f in pngs:
        index, label = int(f.stem.split("_")[1]), int(f.stem.split("_true")[1])
        assert index in val and index not in train  # never trained on
        assert labels[index] == label
        assert np.array_equal(np.asarray(Image.open(f)), images[index])  # the exact pixels
        seen.add(label)
    assert seen == set(range(10))
    assert sum(f.stat().st_size for f in pngs) < 50_000

    # Again: nothing rewritten; a user's different file of a sample's name: refused, kept.
    assert cli(["samples", "--out", str(out)]) == 0
    assert "0 sample image(s) written, 12 already there" in capsys.readouterr().out
    pngs[0].write_bytes(b"mine")
    assert cli(["samples", "--out", str(out), "--unreadable"]) == 2
    assert pngs[0].read_bytes() == b"mine" and not (out / "not_an_image.png").exists()
    assert "exists and differs" in capsys.readouterr().err
    assert cli(["samples", "--out", str(out), "--count", "0"]) == 2


def test_readme_predict_example_on_samples(digits_run: Path, tmp_path: Path):
    out = tmp_path / "samples"
    assert cli(["samples", "--out", str(out), "--unreadable"]) == 0
    preds = tmp_path / "preds.csv"
    assert cli(["predict", str(digits_run), str(out), "--out", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 13
    bad = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in bad] == ["not_an_image.png"]
    good = [r for r in rows if not r["error"]]
    right = sum(r["prediction"] == r["path"].rsplit("_true", 1)[1][:-4] for r in good)
    assert right >= 10  # a 3-epoch model, ~92% on val
    assert preds.with_suffix(".png").exists()
