"""The README's 5-minute tour, run as written, in order, so that it cannot go stale.

What runs: every line of the ```bash blocks between `<!-- tour -->` and `<!-- /tour -->` in
README.md (blank lines and `#` comments left out), in the order the README gives them, each
in its own `bash -c`, in one scratch folder (tmp_path) that holds a copy of `recipes/` and a
`.venv` link to the venv this test runs in. ffdist is this checkout's (PYTHONPATH).

The rules, the same for every line (the fast variants):
- `make train` runs what the Makefile's `train` target runs once `make setup` is done,
  `python -m ffdist.train recipes/digits.yaml` (the test checks the Makefile says so);
  `make` itself would install into the venv.
- Every command that trains (`ffdist train ...`, `... -m ffdist.train ...`) gets TRAIN_FAST
  appended: 1 epoch instead of 20, no progress bar. Everything else about the command,
  its recipe, overrides and output_dir, is the README's.
- `torchrun` gets `--master_port <a free port>` after its name: the default port 29500 may
  be taken by another job on a shared machine.
- `. .venv/bin/activate` is sourced and must put the venv's `ffdist` first on PATH; the
  following commands run with the PATH and VIRTUAL_ENV it set, as in the user's shell.
- `tensorboard ...` starts a server that never exits: not run; the venv must have it.
Every command must exit 0, and CHECKS looks at its key output (eval prints a top-1, predict
writes preds.csv with a row per sample, export writes the file, ...). A tour line that no
check knows fails the test, so a new line in the README comes with its check here.

About 60 s of CPU time, 75-100 s wall on a shared 2-core machine (the start-up of ~10
processes dominates).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import REPO, env, free_port

TRAIN_FAST = ("schedule.epochs=1", "log.progress=false")
BEGIN, END = "<!-- tour -->", "<!-- /tour -->"


def tour_commands(readme: str) -> list[str]:
    """The shell lines of the ```bash blocks between the tour markers, in order."""
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "README needs one tour block"
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    commands: list[str] = []
    for fence in re.findall(r"```bash\n(.*?)```", block, flags=re.S):
        for line in fence.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def fast_variant(command: str) -> str | None:
    """The command as the test runs it (None: not run), by the rules of the docstring."""
    if command == "make train":
        makefile = (REPO / "Makefile").read_text()
        assert "$(BIN)/python -m ffdist.train recipes/digits.yaml" in makefile, (
            "the Makefile's train target changed; update the README tour and this test")
        command = "python -m ffdist.train recipes/digits.yaml"
    if command.startswith("tensorboard"):
        return None
    if command.startswith("torchrun "):
        command = command.replace("torchrun ", f"torchrun --master_port {free_port()} ", 1)
    if re.search(r"(^ffdist train |-m ffdist\.train )", command):
        command = " ".join([command, *TRAIN_FAST])
    return command


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def end_of(run: Path) -> dict:
    ends = [json.loads(x) for x in lines_of(run / "metrics.jsonl") if '"event": "end"' in x]
    assert len(ends) == 1, f"{run}: expected one end event"
    return ends[0]


def check_trained(run: str, world_size: int = 1) -> Callable[[Path, str], None]:
    def check(cwd: Path, out: str) -> None:
        end = end_of(cwd / run)
        assert end["world_size"] == world_size and end["step"] == 22, end  # 1 epoch of 22 steps
        assert (cwd / run / "model.pt").is_file()
    return check


def check_lr005(cwd: Path, out: str) -> None:
    check_trained("runs/digits_lr005")(cwd, out)
    assert "lr: 0.05" in (cwd / "runs/digits_lr005/recipe.yaml").read_text()
    assert end_of(cwd / "runs/digits")["step"] == 22  # the first run is left as it was


def check_runs(cwd: Path, out: str) -> None:
    lines = out.splitlines()
    assert "optim.lr" in lines[0].split(), out  # the key in which the runs differ
    states = {ln.split()[0]: ln.split()[1] for ln in lines[1:]}
    assert states == {"digits": "finished", "digits_2ranks": "finished",
                      "digits_lr005": "finished"}, out


def check_activate(cwd: Path, out: str) -> None:
    found = Path(out.strip().splitlines()[-1])
    assert found.resolve() == (cwd / ".venv" / "bin" / "ffdist").resolve(), out


def check_models(cwd: Path, out: str) -> None:
    names = out.split()
    assert "resnet50" in names and all("resnet" in n for n in names), out


def check_plan(cwd: Path, out: str) -> None:
    assert "global 64" in out and re.search(r"^DDP .*\d", out, re.M), out


def check_eval(cwd: Path, out: str) -> None:
    assert re.search(r"top1 0\.\d{4}", out), out
    report = json.loads((cwd / "runs/digits/eval/report.json").read_text())
    assert report["n"] == 360 and 0 < report["top1"] <= 1
    assert (cwd / "runs/digits/eval/confusion.png").stat().st_size > 0


def check_samples(cwd: Path, out: str) -> None:
    assert len(list((cwd / "samples").glob("digit_*_true*.png"))) == 12


def check_predict(cwd: Path, out: str) -> None:
    rows = lines_of(cwd / "preds.csv")
    assert rows[0].startswith("path,prediction,probability") and len(rows) == 13, rows
    assert (cwd / "preds.png").stat().st_size > 0


def check_export(cwd: Path, out: str) -> None:
    assert "verified against PyTorch" in out, out
    assert (cwd / "runs/digits/export/model.torchscript.pt").stat().st_size > 0
    assert (cwd / "runs/digits/export/model.torchscript.pt.json").is_file()


def check_bench(cwd: Path, out: str) -> None:
    bench = json.loads((cwd / "runs/digits/bench.json").read_text())
    assert bench["train_images_per_s"] > 0 and "train images/s" in out


# (how the README's command starts, its check); the first match wins.
CHECKS: list[tuple[str, Callable[[Path, str], None]]] = [
    ("make train", check_trained("runs/digits")),
    (". .venv/bin/activate", check_activate),
    ("ffdist models", check_models),
    ("ffdist plan recipes/digits.yaml", check_plan),
    ("ffdist train recipes/digits.yaml optim.lr=0.05 output_dir=runs/digits_lr005", check_lr005),
    ("ffdist eval runs/digits", check_eval),
    ("ffdist samples", check_samples),
    ("ffdist predict runs/digits samples --out preds.csv", check_predict),
    ("ffdist export runs/digits --format torchscript", check_export),
    ("torchrun --nproc_per_node 2 -m ffdist.train recipes/digits.yaml",
     check_trained("runs/digits_2ranks", world_size=2)),
    ("ffdist bench recipes/digits.yaml", check_bench),
    ("ffdist runs", check_runs),
]


def check_for(command: str) -> Callable[[Path, str], None]:
    for start, check in CHECKS:
        if command.startswith(start):
            return check
    raise AssertionError(f"README tour line {command!r} has no check in {__file__}; add one")


def test_tour_block_is_found() -> None:
    """The extraction itself: the README's tour starts with make train, has the commands
    a first user needs (eval, predict, export, torchrun, bench, ...), and every line has a
    check."""
    commands = tour_commands((REPO / "README.md").read_text())
    assert commands[:2] == ["make train", ". .venv/bin/activate"], commands
    joined = "\n".join(commands)
    for needed in ("ffdist eval", "ffdist predict", "ffdist export", "torchrun", "ffdist bench",
                   "ffdist runs", "tensorboard --logdir runs"):
        assert needed in joined, needed
    for command in commands:
        if not command.startswith("tensorboard"):
            check_for(command)


# make test-all only: each command of the tour runs in the fast tier through its own tests
# (tests/workflow/test_eval.py, test_predict.py, test_export.py, test_runs.py, tests/perf/
# test_bench.py, tests/integration/test_digits.py); test_tour_block_is_found checks the block
@pytest.mark.extended
def test_readme_tour_runs_in_order(tmp_path: Path) -> None:
    commands = tour_commands((REPO / "README.md").read_text())
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    assert (tmp_path / ".venv" / "bin" / "activate").is_file(), (
        f"the tests run in {sys.prefix}, which is not a venv; run them as make test does")
    shell = env()
    shell.pop("VIRTUAL_ENV", None)
    # A user's shell before activation: the venv is NOT on PATH (the tour must activate it).
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    shell["PATH"] = os.pathsep.join(p for p in shell["PATH"].split(os.pathsep)
                                    if p and Path(p).resolve() != venv_bin)
    for command in commands:
        if command.startswith("tensorboard"):
            assert (tmp_path / ".venv" / "bin" / "tensorboard").exists()
            continue
        check = check_for(command)
        actual = fast_variant(command)
        assert actual is not None
        if command.startswith(". "):
            actual = f'{command} && echo "VENV=$VIRTUAL_ENV" && echo "PATH=$PATH" && command -v ffdist'
        elif command == "make train":
            # before activation, as `make train` runs it: the venv's own python
            actual = actual.replace("python ", ".venv/bin/python ", 1)
        proc = subprocess.run(["bash", "-c", actual], cwd=tmp_path, env=shell,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"README tour: {command!r} (run as {actual!r}) exited "
                                      f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if command.startswith(". "):
            values = dict(x.split("=", 1) for x in proc.stdout.splitlines() if "=" in x)
            shell["PATH"], shell["VIRTUAL_ENV"] = values["PATH"], values["VENV"]
        check(tmp_path, proc.stdout)
