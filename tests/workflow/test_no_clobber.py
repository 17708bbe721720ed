"""predict and export never write over what is not theirs.

An existing file is replaced only when it is an earlier output of the same command, or
with --force; the files a command reads (weights, recipe.yaml, input images) never; two
outputs never share a path (`--out preds.png` is refused: the picture would replace the
CSV); every path written is printed. The CLI cases run as real processes, the rest through
`ffdist.cli.main` (the same function, minus 5 s of imports each).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from ffdist.cli import main as cli
from ffdist.errors import EXIT_USER_ERROR
from tests import helpers
from tests.helpers import error_line


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def images(digits_pngs: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(digits_pngs.glob("*.png"))[:6]:
        shutil.copy(f, folder / f.name)
    return folder


def ffdist(*args: str) -> tuple[int, str, str]:
    proc = helpers.run([sys.executable, "-m", "ffdist.cli", *args], check=False, timeout=180)
    return proc.returncode, proc.stdout, proc.stderr


def test_predict_out_png_is_refused_before_any_work(digits_run, images, tmp_path):
    out = tmp_path / "preds.png"
    code, _, err = ffdist("predict", str(digits_run), str(images), "--out", str(out))
    assert code == EXIT_USER_ERROR
    assert (f"--out {out}: --out names the CSV file, and the picture is written next to it; "
            f"use e.g. --out {tmp_path / 'preds.csv'}") in error_line(err)
    assert not out.exists()


def test_predict_keeps_a_users_file_and_replaces_its_own(digits_run, images, tmp_path):
    out, picture = tmp_path / "preds.csv", tmp_path / "preds.png"
    code, stdout, err = ffdist("predict", str(digits_run), str(images), "--out", str(out))
    assert code == 0, err
    assert stdout.strip().endswith(f"-> {out}, {picture}"), stdout  # every path written
    assert Image.open(picture).info["ffdist"] == "ffdist predict"
    # again: its own CSV and picture are replaced without --force
    assert cli(["predict", str(digits_run), str(images), "--out", str(out)]) == 0
    # a file of the user's where the CSV goes, or where the picture goes: refused
    for victim in (out, picture):
        other = out if victim == picture else picture
        other.unlink(missing_ok=True)
        if victim.suffix == ".png":
            Image.new("RGB", (4, 4)).save(victim)  # a PNG, but not predict's
        else:
            victim.write_text("my notes\n")
        before = digest(victim)
        assert cli(["predict", str(digits_run), str(images), "--out", str(out)]) == EXIT_USER_ERROR
        assert digest(victim) == before and not other.exists()
    # --force says so
    assert cli(["predict", str(digits_run), str(images), "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith("path,prediction,")


def test_predict_never_writes_over_what_it_reads(digits_run, images, capsys):
    weights = digits_run / "model.pt"
    before = digest(weights)
    for out in (weights, digits_run / "recipe.yaml"):
        code = cli(["predict", str(digits_run), str(images), "--out", str(out), "--force"])
        assert code == EXIT_USER_ERROR
        assert f"that is {out}, which ffdist predict reads" in capsys.readouterr().err
    # an input image as the derived picture: images/x.csv -> images/x.png, an input
    victim = sorted(images.glob("*.png"))[0]
    code = cli(["predict", str(digits_run), str(images), "--out", str(victim.with_suffix(".csv")),
                "--force"])
    assert code == EXIT_USER_ERROR and "which ffdist predict reads" in capsys.readouterr().err
    assert digest(weights) == before


def test_export_refuses_the_runs_own_weights_and_users_files(digits_run, tmp_path):
    weights = digits_run / "model.pt"
    before = digest(weights)
    code, _, err = ffdist("export", str(digits_run), "--format", "torchscript", "--out",
                          str(weights), "--force")
    assert code == EXIT_USER_ERROR
    assert f"--out {weights}: that is {weights}, which ffdist export reads" in error_line(err)
    assert digest(weights) == before

    mine = tmp_path / "model.torchscript.pt"
    mine.write_bytes(b"a user's file")
    assert cli(["export", str(digits_run), "--format", "torchscript", "--out", str(mine)]) \
        == EXIT_USER_ERROR
    assert mine.read_bytes() == b"a user's file"
    assert cli(["export", str(digits_run), "--format", "torchscript", "--out", str(mine),
                "--force"]) == 0
    # from now on it is export's own (its sidecar names it): replaced without --force
    assert cli(["export", str(digits_run), "--format", "torchscript", "--out", str(mine)]) == 0


def test_export_that_fails_verification_replaces_nothing(digits_run, tmp_path, capsys):
    out = tmp_path / "m.torchscript.pt"
    assert cli(["export", str(digits_run), "--format", "torchscript", "--out", str(out)]) == 0
    before = digest(out)
    assert cli(["export", str(digits_run), "--format", "torchscript", "--out", str(out),
                "--tolerance", "-1"]) == 1
    assert "failed verification" in capsys.readouterr().err
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.torchscript.pt",
                                                          "m.torchscript.pt.json"]
