"""A run folder is claimed, not assumed: ffdist trains only into a folder that is new,
empty, or an ffdist run (its marker, or an older run's own files), never replaces the
recipe it is training, and says so in one sentence naming a file, before anything is
written; paths that cannot be a run folder (a file, a name too long) likewise. What a
killed start leaves (ffdist's temp files, and those only) is gone at the next start.

Mostly through ffdist.train.main in this process (the CLI's code path, without seconds of
imports); the `cd exp; output_dir=.` cases as real processes in that folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ffdist import run_dir, train
from tests.fault import kit
from tests.fault.user_errors.common import DIGITS, train_main
from tests.helpers import FAST, env, in_process, refused, snapshot

TINY = ("schedule.max_steps=2", "launch.device=cpu", *FAST)


def mine(folder: Path) -> Path:
    """The adversarial user's folder: a copy of the recipe with notes, their own metrics."""
    folder.mkdir()
    (folder / "recipe.yaml").write_text(Path(DIGITS).read_text() + "# my notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    return folder


def trains(capfd, *args: str) -> str:
    code = train.main([DIGITS, *TINY, *args])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    return out


def test_a_folder_that_is_not_a_run_is_never_trained_into(capfd, tmp_path):
    exp = mine(tmp_path / "exp")
    line = refused(in_process(capfd, train.main, str(exp / "recipe.yaml"), *TINY,
                              f"output_dir={exp}"), exp)
    assert "lies where this run writes" in line and line.endswith(
        f"give the run another folder: output_dir={tmp_path / 'exp_2'}.")
    # the same recipe from elsewhere: the folder is someone else's, named by a file in it
    copy = tmp_path / "copy.yaml"
    shutil.copy(exp / "recipe.yaml", copy)
    line = refused(in_process(capfd, train.main, str(copy), *TINY, f"output_dir={exp}"), exp)
    assert line == (f"ffdist: error: output_dir={exp} is not an ffdist run folder: it holds "
                    f"{exp / 'recipe.yaml'} (which a run would replace) and 1 other entry; "
                    "ffdist trains only into a new or empty folder or into its own run: choose "
                    f"another: output_dir={tmp_path / 'exp_2'}.")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    line = refused(train_main(capfd, *TINY, f"output_dir={notes}"), notes)
    assert f"it holds {notes / 'todo.txt'};" in line
    # the advice works (a new folder beside it), and the notes stay as they were
    before = snapshot(exp)
    trains(capfd, f"output_dir={tmp_path / 'exp_2'}")
    assert snapshot(exp) == before and (tmp_path / "exp_2" / "model.pt").is_file()


def test_cd_into_the_folder_and_output_dir_dot(tmp_path):
    """`cd exp && ffdist train recipe.yaml output_dir=.`: refused, and `output_dir=.` where
    it is legal (an empty folder) trains and ends with its summary, not a traceback."""
    exp = mine(tmp_path / "exp")
    line = refused([sys.executable, "-m", "ffdist.train", "recipe.yaml", *TINY, "output_dir=."],
                   exp, cwd=exp)
    assert "the recipe recipe.yaml lies where this run writes" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ffdist.train", DIGITS, *TINY, "output_dir=."],
                          cwd=empty, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "finished in" in proc.stdout and (empty / "model.pt").is_file()
    assert f"output_dir={tmp_path / 'empty_2'}" in proc.stdout  # the next run's folder


def test_a_runs_own_recipe_trained_again_is_left_as_it_is(capfd, tmp_path):
    """recipe.yaml of a run, trained again as it is: the file the run would write is the
    file already there (nothing to do here); with an override it would be replaced."""
    out = tmp_path / "run"
    trains(capfd, f"output_dir={out}")
    saved = out / "recipe.yaml"
    before = snapshot(out)
    assert "nothing to do" in trains(capfd, f"output_dir={out}") and snapshot(out) == before
    code = train.main([str(saved)])  # its overrides are in it already
    assert code == 0 and "nothing to do" in capfd.readouterr().out and snapshot(out) == before
    line = refused(in_process(capfd, train.main, str(saved), "optim.lr=0.05"), out)
    assert line.startswith(f"ffdist: error: the recipe {saved} lies where this run writes")


def test_what_may_be_there_before_a_run(capfd, tmp_path):
    """New, empty, or holding only what ffdist put there (sbatch's log, bench.json, an
    empty checkpoints/ of a start killed early): claimed, and marked as the run's."""
    out = tmp_path / "job"
    (out / "checkpoints").mkdir(parents=True)
    (out / "slurm-4242.out").write_text("the job's log")
    (out / "bench.json").write_text("{}")
    trains(capfd, f"output_dir={out}")
    marker = json.loads((out / run_dir.MARKER).read_text())
    assert set(marker) == {"ffdist", "created"} and (out / "slurm-4242.out").is_file()


def test_older_runs_without_the_marker_are_still_runs(capfd, existing_run, tmp_path):
    (existing_run / run_dir.MARKER).unlink()  # written before the marker existed
    assert train.main([DIGITS, *kit.ARGS, f"output_dir={existing_run}"]) == 0
    assert "nothing to do" in capfd.readouterr().out
    # killed before its first checkpoint: ffdist's whole recipe.yaml and ffdist's records
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(existing_run / "recipe.yaml", early / "recipe.yaml")
    first = (existing_run / "metrics.jsonl").read_text().splitlines()[0]
    (early / "metrics.jsonl").write_text(first + "\n")
    trains(capfd, f"output_dir={early}")
    assert (early / run_dir.MARKER).is_file()
    # the same recipe.yaml beside someone else's metrics.jsonl is not a run
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(existing_run / "recipe.yaml", fake / "recipe.yaml")
    (fake / "metrics.jsonl").write_text('{"mine": 1}\n')
    line = refused(train_main(capfd, *TINY, f"output_dir={fake}"), fake)
    assert "is not an ffdist run folder" in line


def test_paths_that_cannot_be_a_run_folder(capfd, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = refused(train_main(capfd, *TINY, f"output_dir={a_file}"), a_file)
    assert line == (f"ffdist: error: output_dir={a_file} is a file, not a folder; choose "
                    "another output_dir (or name).")
    long = tmp_path / ("a" * 300)
    line = refused(train_main(capfd, *TINY, f"output_dir={long}"), tmp_path)
    assert "is a longer name than the file system takes" in line and "shorter" in line


def test_leftovers_of_killed_writes_go_at_the_next_start_and_nothing_else(capfd, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    (out / run_dir.MARKER).write_text("{}")
    ours = [out / ".write_test.123", out / ".model.pt.tmp.4567", out / ".recipe.yaml.tmp.9",
            ckpts / ".write_test.77", ckpts / ".step_00000002.pt.tmp.31", ckpts / ".latest.tmp.8",
            ckpts / ".best.pt.tmp"]
    theirs = [out / ".notes.tmp.123", out / ".model.pt.tmp", out / "model.pt.tmp.5",
              out / ".model.pt.tmp.5.bak", ckpts / ".best.pt.tmp.old", ckpts / "mine.tmp.1"]
    for p in ours + theirs:
        p.write_text("left over")
    trains(capfd, f"output_dir={out}")
    assert [p for p in ours if p.exists()] == []
    assert all(p.read_text() == "left over" for p in theirs)


def test_the_write_probe_never_stays_even_on_a_full_disk(tmp_path, monkeypatch):
    """ENOSPC after the probe file was created (found when its block is synced): it is
    removed, and so is the folder the check made; the sentence says why and what to do.
    (A real full tmpfs: tests/fault/user_errors/test_storage.py.)"""
    real = os.fsync

    def full(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".write_test."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(run_dir.CheckpointError, match=r"not writable \(No space left on "
                       r"device\); free space there, or set output_dir=PATH to a "
                       r"folder on another disk\."):
        run_dir.check_writable(tmp_path / "kept" / "new" / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert not any((tmp_path / "kept").iterdir())
