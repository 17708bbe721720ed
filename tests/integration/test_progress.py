"""What a training run shows while it trains, in real processes: with stdout a pipe (a log
file, nohup, sbatch) one line per training record with the whole run's ETA; on a terminal
(a pseudo-terminal here) a bar for the run and one for the epoch instead; and the profiler
window (log.profile_steps), whose trace parses as Chrome trace JSON holding exactly the
window's optimizer steps, with a table of real operators printed."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from ffdist import profiling, recipe_load
from ffdist.errors import RecipeError
from tests.helpers import CPU, RECIPES, REPO, env, events, run

# digits: 22 steps an epoch, so a record every 11 steps is one line per 11 steps, 4 in all
TINY = ("schedule.epochs=2", "log.every_steps=11", "precision=fp32", CPU, "log.tensorboard=false")
LINE = re.compile(r"^\d\d:\d\d:\d\d ffdist step (\d+)/44 \((\d+)%\)  epoch (\d)  loss (\S+)  "
                  r"lr (\S+)  (\d+) img/s  data wait (\d+\.\d)%  ETA (\d+):(\d\d):(\d\d)$")


@pytest.fixture(scope="module")
def piped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("progress") / "run"
    proc = run([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *TINY,
                "log.profile_steps=[3,5]", f"output_dir={out}"])
    return out, proc.stdout


def test_without_a_terminal_each_training_record_is_a_line_with_the_run_eta(piped) -> None:
    out, stdout = piped
    lines = [m for m in map(LINE.match, stdout.splitlines()) if m]
    train = events(out, "train")
    assert len(lines) == len(train) == 44 // 11, stdout[-3000:]
    for m, rec in zip(lines, train):
        step, percent, epoch = int(m[1]), int(m[2]), int(m[3])
        assert (step, epoch) == (rec["step"], rec["epoch"]) and percent == round(100 * step / 44)
        assert m[4] == f"{rec['loss']:.4f}" and m[5] == f"{rec['lr']:.4g}"
        assert int(m[6]) == round(rec["images_per_s"])
    etas = [int(m[8]) * 3600 + int(m[9]) * 60 + int(m[10]) for m in lines]
    assert etas[-1] == 0  # the last step: nothing left
    assert "\r" not in stdout and "it/s" not in stdout  # no bar in a log file


def test_the_profiler_window_records_its_steps_and_prints_the_top_operators(piped) -> None:
    out, stdout = piped
    trace = json.loads((out / "profile" / "rank0.steps3-5.pt.trace.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert sum(n.startswith("Optimizer.step#") for n in names) == 3  # steps 3, 4 and 5
    assert any(n.startswith("aten::") for n in names)
    head, _, table = stdout.partition(f"profile of steps 3-5: {out}/profile/rank0.steps3-5")
    assert table, stdout[-3000:]
    rows = table.split("Self CPU time total")[0]
    assert re.search(r"^\s*aten::\w*convolution\w*\s+\d", rows, re.M), rows
    # printed when the window closed, at step 5: before the first line (step 11)
    assert not any(LINE.match(line) for line in head.splitlines())


def test_a_profiler_window_after_the_last_step_is_refused() -> None:
    rcp = recipe_load.load(RECIPES / "digits.yaml", ["log.profile_steps=[50,60]"])
    with pytest.raises(RecipeError) as e:
        profiling.window(rcp, total_steps=44)
    assert str(e.value) == ("log.profile_steps=[50, 60]: the run has 44 optimizer steps, so the "
                            "window records nothing; give steps between 1 and 44, e.g. "
                            "log.profile_steps=[10,15].")
    assert profiling.window(rcp, total_steps=50) == [50, 60]  # ends with the run: kept


def in_a_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr a pseudo-terminal of 120 x 24 (what a user's
    terminal gives; tqdm draws nothing in a terminal of width 0); its exit status and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # the other end is gone: the process has exited
            break
        if ready and not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_a_bar_for_the_run_and_one_for_the_epoch(tmp_path: Path) -> None:
    code, text = in_a_terminal([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"),
                                *TINY, f"output_dir={tmp_path / 'run'}"])
    assert code == 0, text[-3000:]
    frames = text.replace("\r\n", "\r").split("\r")
    run_bar = [f for f in frames if re.match(r"run: +\d+%\|.*\| \d+/44 \[", f)]
    epoch_bars = {re.match(r"(epoch \d): +\d+%\|.*\| \d+/22 \[", f)[1] for f in frames
                  if re.match(r"epoch \d: ", f)}
    assert run_bar and epoch_bars == {"epoch 0", "epoch 1"}, text[-3000:]
    assert any("44/44" in f for f in run_bar)
    # the run's ETA: tqdm's [elapsed<remaining] on the run bar
    assert all(re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", f) for f in run_bar if "0/44" not in f)
    assert not LINE.search(text.replace("\r", "\n"))  # no log-file lines on a terminal
    assert "val loss" in text and "finished in" in text  # the other lines still print
