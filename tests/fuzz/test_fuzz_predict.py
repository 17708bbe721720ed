"""Fuzz `ffdist predict` on random image folders and flags: exit 0 or 2 (1 only when no
image at all could be read, as documented), no traceback, the inputs unchanged, every
unreadable file a row of the CSV."""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ffdist.cli import main as cli
from tests.fuzz import strategies as S
from tests.fuzz.conftest import examples, no_traceback, snapshot
from tests.helpers import REPO, env

# make test-all only: random cases of paths the fast tier covers with fixed ones
# (tests/fault/user_errors/); `make fuzz` is the long run.
pytestmark = pytest.mark.extended

flags = st.lists(st.one_of(
    st.tuples(st.just("--topk"), st.sampled_from(["1", "3", "12", "0", "-1", "x"])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["1", "2", "64", "0"])),
    st.tuples(st.just("--grid"), st.sampled_from(["0", "1", "4", "36"])),
    st.tuples(st.just("--uncertain-threshold"), st.sampled_from(["0", "0.5", "2", "nan"])),
    st.tuples(st.just("--tta"),),
), max_size=3)


def contract(code: int, out: str, err: str, csv_path: Path) -> None:
    assert code in (0, 1, 2), f"exit {code}\n{out}\n{err}"
    no_traceback(out + err)
    if code == 1:  # "no image could be read": the CSV lists every file as unreadable
        rows = list(csv.DictReader(csv_path.open()))
        assert rows and all(r["error"] for r in rows)
    if code == 0:
        assert csv_path.is_file()


def image_folder(box: Path, files: list) -> Path:
    """<box>/in with one file per drawn image spec."""
    folder = box / "in"
    folder.mkdir()
    for i, spec in enumerate(files):
        S.write_image(folder / f"f{i}", spec)
    return folder


def args_for(run: Path, folder: Path, out: Path, extra: list[tuple]) -> list[str]:
    return [str(run), str(folder), "--out", str(out), *[a for f in extra for a in f]]


@settings(max_examples=examples("predict"))
@given(files=st.lists(S.image_files, min_size=1, max_size=6), extra=flags)
def test_predict_contract_in_process(tiny_run, files, extra, capfd):
    with tempfile.TemporaryDirectory() as box:
        box = Path(box)
        folder = image_folder(box, files)
        before = snapshot(box, skip=box / "out")
        try:
            code = cli(["predict", *args_for(tiny_run, folder, box / "out" / "p.csv", extra)])
        except SystemExit as e:  # argparse: usage and exit 2
            code = e.code
        captured = capfd.readouterr()
        contract(code, captured.out, captured.err, box / "out" / "p.csv")
        assert snapshot(box, skip=box / "out") == before


@settings(max_examples=1)
@given(files=st.lists(S.image_files, min_size=3, max_size=8))
def test_predict_contract_real_process(tiny_run, files):
    with tempfile.TemporaryDirectory() as box:
        box = Path(box)
        folder = image_folder(box, files)
        before = snapshot(box, skip=box / "out")
        proc = subprocess.run([sys.executable, "-m", "ffdist.cli", "predict",
                               *args_for(tiny_run, folder, box / "out" / "p.csv", [])],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        contract(proc.returncode, proc.stdout, proc.stderr, box / "out" / "p.csv")
        assert snapshot(box, skip=box / "out") == before
