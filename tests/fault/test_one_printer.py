"""One error printer for every entry point (`python -m ffdist.X`, `ffdist X`, torchrun), each
error's own exit code; and a checkpoint of another format refused with the run untouched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffdist import errors
from ffdist.errors import EXIT_DIVERGED, EXIT_USER_ERROR, DataError, FfdistError, NonFiniteLoss
from tests.fault import kit
from tests.helpers import RECIPES, REPO, env, error_line, in_process, refused

DIGITS = str(RECIPES / "digits.yaml")


class _Custom(FfdistError):
    exit_code = 7


@pytest.mark.parametrize("error,code", [(DataError("no data there; fix it."), EXIT_USER_ERROR),
                                        (NonFiniteLoss("NaN at step 3."), EXIT_DIVERGED),
                                        (_Custom("seven."), 7)])
def test_guard_prints_one_line_and_returns_the_errors_exit_code(capsys, error, code) -> None:
    def body() -> int:
        raise error

    assert errors.guard(body) == code
    assert error_line(capsys.readouterr().err) == f"ffdist: error: {error}"


def test_guard_keeps_the_traceback_of_a_bug() -> None:
    with pytest.raises(ZeroDivisionError):
        errors.guard(lambda: 1 / 0)


ENTRY_POINTS = [
    ["-m", "ffdist.evaluate", "/nonexistent/run"],
    ["-m", "ffdist.cli", "eval", "/nonexistent/run"],
    ["-m", "ffdist.plan", DIGITS, "--world-size", "3"],  # 64 does not divide over 3
    ["-m", "ffdist.bench", DIGITS, "--steps", "0"],
    ["-m", "ffdist.predict", "/nonexistent/run", "x.png", "--out", "/nonexistent/p.csv"],
    ["-m", "ffdist.export", "/nonexistent/run", "--format", "onnx"],
    ["-m", "ffdist.launch", DIGITS, "launch.nproc=0", "--dry-run"],
    ["-m", "ffdist.samples", "--count", "0"],
]


@pytest.fixture(scope="module")
def entry_point_runs() -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each entry point, all started side by side: each is
    mostly a torch import, and one after another they take twice as long on 2 cores."""
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in ENTRY_POINTS]
    outputs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@pytest.mark.parametrize("index", range(len(ENTRY_POINTS)),
                         ids=[argv[1] + (f"-{argv[2]}" if argv[1] == "ffdist.cli" else "")
                              for argv in ENTRY_POINTS])
def test_python_m_entry_points_print_one_line_exit_2(entry_point_runs, index: int) -> None:
    refused(lambda: entry_point_runs[index])


def test_ffdist_train_through_the_cli_exits_3_on_nan(tmp_path: Path) -> None:
    """`ffdist train` (the console script's main) returns NonFiniteLoss's own exit code."""
    proc = kit.run([sys.executable, "-m", "ffdist.cli", "train", DIGITS, *kit.ARGS,
                    "schedule.max_steps=4", f"output_dir={tmp_path / 'run'}"],
                   FFDIST_FAULT="nan_loss:step=3")
    assert proc.returncode == EXIT_DIVERGED, kit.explain(proc)
    assert "NaN/Inf at step 3" in error_line(proc.stderr)


def test_checkpoint_of_an_older_format_is_refused_and_nothing_changes(capfd, ref1: Path,
                                                                      tmp_path: Path) -> None:
    """resume=auto must not skip it (and then start over the run): one sentence, exit 2."""
    from ffdist import train

    out = tmp_path / "old"
    shutil.copytree(ref1, out)
    newest = out / "checkpoints" / "step_00000030.pt"
    state = torch.load(newest, weights_only=True)
    torch.save({**state, "format": 1}, newest)
    line = refused(in_process(capfd, train.main, DIGITS, f"output_dir={out}", *kit.ARGS), out)
    assert f"{newest} has checkpoint format 1, written by an older ffdist" in line
