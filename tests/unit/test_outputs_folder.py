"""ffdist.outputs below the commands: the temp files of killed writes are removed at the
next write of the same name (never a live writer's, never a user's file that only looks
like one), `replacing` leaves no temp file whatever happens, `check_folder` makes nothing
and leaves nothing; ffdist.stdio's stream survives a reader that left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ffdist import outputs, stdio


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writes_go_and_nothing_else(tmp_path):
    target = tmp_path / "preds.csv"
    dead = dead_pid()
    killed = [tmp_path / f".preds.csv.{dead}.tmp.csv",        # outputs.replacing
              tmp_path / f".preds.csv.tmp.{dead}"]            # checkpoint.atomic_write
    (tmp_path / f".preds.csv.partial-{dead}").mkdir()         # shard's folder
    live = tmp_path / f".preds.csv.{os.getppid()}.tmp.csv"    # a writer that still runs
    users = [tmp_path / ".preds.csv.notes", tmp_path / f".other.csv.{dead}.tmp.csv",
             tmp_path / ".preds.csv.tmp"]
    for p in [*killed, live, *users]:
        p.write_text("x")
    removed = outputs.remove_leftovers(target)
    assert sorted(removed) == sorted([*killed, tmp_path / f".preds.csv.partial-{dead}"])
    assert live.exists() and all(p.exists() for p in users)


def test_replacing_leaves_the_previous_file_and_no_temp_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("before")
    with pytest.raises(ZeroDivisionError), outputs.replacing(target) as tmp:
        tmp.write_text("half")
        1 / 0  # noqa: B018 (a writer's bug: it keeps its traceback)
    assert target.read_text() == "before" and sorted(tmp_path.iterdir()) == [target]


def test_check_folder_makes_nothing_and_leaves_nothing(tmp_path):
    outputs.check_folder(tmp_path / "a" / "b", "ffdist samples", outputs.Place("--out"),
                         1000, ["x.png"])
    assert list(tmp_path.iterdir()) == []


def test_a_stream_whose_reader_left_drops_the_text(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader left
    stream = stdio.LeftReader(open(write, "w"))  # noqa: SIM115
    assert stream.write("lost\n") == 5 and (stream.flush() or True)
    assert stream.gone and not stream.isatty()
    stream.stream.close()
