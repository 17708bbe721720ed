"""Advice in an error message works when followed. For each refusal below: run the mistaken
command, take the advice out of its sentence ("set X=Y", "use X=Y", "write X=Y", "e.g.
X=Y", "did you mean 'K'?", "use --flag V", "leave out 'ARG'", "add ... another class"),
apply it to the same command, run it again, and check that it gets past that error (exit
0). A message that stops giving advice this table can read fails here, and so does advice
that does not work.

The commands run in this process (ffdist.train.main, ffdist.cli.main: the CLI's code path
without seconds of imports each); the reruns that train are tiny (digits or 8x8 folders,
a few steps).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ffdist import train
from ffdist.cli import main as cli
from tests.fault.user_errors.common import DIGITS, FOLDER, bomb_png, imagefolder
from tests.helpers import in_process, refused

# A training rerun: a few steps on the CPU, quiet.
SHORT = ("launch.device=cpu", "precision=fp32", "schedule.epochs=1", "schedule.max_steps=2",
         "log.tensorboard=false", "log.progress=false")

OVERRIDE = re.compile(r"\b(?:set|use|write|e\.g\.)\s+([a-z_][\w.]*=(?:\[[^\]]*\]|[^\s,;]+))")
RENAME = re.compile(r"'([\w.]+)'[^']*did you mean '([\w.]+)'\?")  # (wrong key, right key)
FLAG = re.compile(r"\b(?:use|pass) (--[\w-]+) (\w+)")
CLASS = re.compile(r"add the images of another class")
DROP = re.compile(r"leave out '([^']+)'")


def advice(line: str) -> tuple[str, ...]:
    """The first piece of advice in a sentence, as (kind, what...)."""
    found = [(m.start(), kind, m) for kind, pattern in (("override", OVERRIDE), ("rename", RENAME),
                                                        ("flag", FLAG), ("class", CLASS),
                                                        ("drop", DROP))
             for m in [pattern.search(line)] if m]
    assert found, f"no advice this test can follow in: {line}"
    _, kind, m = min(found, key=lambda f: f[0])
    if kind == "override":
        return kind, m.group(1).rstrip(".)")
    return (kind, *m.groups())


@dataclass
class Case:
    """A mistaken command: `argv(tmp_path, run)` -> (main, argv) for a run directory `run`
    that no mistake may change; `said` is in its sentence; `advice` is what it advises."""

    argv: Callable[[Path, Path], tuple[Callable, list[str]]]
    said: str
    advice: tuple[str, ...]
    fill: dict[str, Callable[[Path], str]] = field(default_factory=dict)
    """Placeholders in the advice (output_dir=PATH) and what a user would put there."""


def trains(*args: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:
    return lambda tmp, run: (train.main, [DIGITS, *SHORT, f"output_dir={tmp / 'out'}", *args])


def launches(*args: str) -> Callable[[Path, Path], tuple[Callable, list[str]]]:
    return lambda tmp, run: (cli, ["launch", "--dry-run", DIGITS, *args])


def one_class_folder(tmp: Path, run: Path) -> tuple[Callable, list[str]]:
    root = imagefolder(tmp / "data")
    for split in ("train", "val"):
        shutil.rmtree(root / split / "1")
    return train.main, [DIGITS, *FOLDER, *SHORT, f"data.root={root}", f"output_dir={tmp / 'out'}"]


def bombed_folder(tmp: Path, run: Path) -> tuple[Callable, list[str]]:
    root = imagefolder(tmp / "data", per_class=60)  # 1 bad file in 121: under 1%
    bomb_png(root / "train" / "1" / "bomb.png", 12000, 12000)  # 144 M pixels
    return train.main, [DIGITS, *FOLDER, *SHORT, "schedule.max_steps=null",  # the whole epoch
                        f"data.root={root}", "data.bad_images=error", f"output_dir={tmp / 'out'}"]


def not_writable(tmp: Path, run: Path) -> tuple[Callable, list[str]]:
    (tmp / "a_file").write_text("x")  # a file where a folder must go: fails even for root
    return train.main, [DIGITS, *SHORT, f"output_dir={tmp / 'a_file' / 'run'}"]


CASES = {
    "num_classes": Case(trains("model.num_classes=5"), "but data.name=digits has 10 classes",
                        ("override", "model.num_classes=10")),
    "batch_not_divisible": Case(
        lambda tmp, run: (cli, ["plan", "--gpus", "2", DIGITS, "data.batch_size=63"]),
        "does not divide over 2 processes", ("override", "data.batch_size=64")),
    "micro_batch_not_dividing": Case(
        lambda tmp, run: (cli, ["plan", "--gpus", "2", DIGITS, "data.micro_batch_size=12"]),
        "does not divide the per-rank batch 32", ("override", "data.micro_batch_size=8")),
    "one_class_folder": Case(one_class_folder, "has 1 class(es) (0); a classifier needs at least 2",
                             ("class",)),
    "unknown_key": Case(trains("optim.lrr=0.05"), "unknown key 'optim.lrr'",
                        ("rename", "optim.lrr", "optim.lr")),
    "plus_prefix": Case(trains("+optim.lr=0.05"), "ffdist has no '+' prefix",
                        ("override", "optim.lr=0.05")),
    "plus_prefix_no_such_key": Case(trains("+optim.foo=1"), "'optim.foo' is not a recipe key",
                                    ("drop", "+optim.foo=1")),
    "plus_prefix_unknown_key": Case(trains("+optim.lrr=0.05"), "'optim.lrr' is not a recipe key",
                                    ("rename", "optim.lrr", "optim.lr")),
    "image_size_the_model_pools_away": Case(
        trains("data.name=synthetic", "data.image_size=1", "data.synthetic_size=64",
               "data.batch_size=8"),
        "model.name=small_cnn cannot take 1x1 images", ("override", "data.image_size=2")),
    "output_dir_not_writable": Case(not_writable, "is not writable",
                                    ("override", "output_dir=PATH"),
                                    {"PATH": lambda tmp: str(tmp / "elsewhere")}),
    "eval_weights_kind": Case(lambda tmp, run: (cli, ["eval", str(run), "--weights", "ema"]),
                              "trained without an EMA of its weights",
                              ("flag", "--weights", "raw")),
    "image_size_on_a_fixed_size_dataset": Case(
        trains("data.image_size=32"), "does not apply to data.name=digits, whose images are 8x8",
        ("override", "data.image_size=null")),
    "eval_size_on_a_fixed_size_dataset": Case(
        trains("data.eval_image_size=32"), "data.eval_image_size=32 does not apply",
        ("override", "data.eval_image_size=null")),
    "infinite_lr": Case(trains("optim.lr=inf"), "optim.lr=inf is out of range",
                        ("override", "optim.lr=0.1")),
    "infinite_warmup": Case(trains("schedule.warmup_epochs=inf"), "use a finite number",
                            ("override", "schedule.warmup_epochs=0.0")),
    "min_lr_above_lr": Case(trains("schedule.min_lr=0.5"), "cannot exceed optim.lr=0.1",
                            ("override", "schedule.min_lr=0")),
    "milestones_unsorted": Case(trains("schedule.milestones=[60,30]"), "schedule.milestones",
                                ("override", "schedule.milestones=[30,60,80]")),
    "image_side_too_large": Case(launches("data.name=synthetic", "data.image_size=30000"),
                                 "data.image_size=30000 is out of range",
                                 ("override", "data.image_size=224")),
    "nproc_too_many": Case(launches("launch.nproc=100000"), "launch.nproc=100000 is out of range",
                           ("override", "launch.nproc=2")),
    "port_out_of_range": Case(launches("launch.rdzv_endpoint=head:99999"),
                              "port from 1 to 65535",
                              ("override", "launch.rdzv_endpoint=localhost:29500")),
    "image_over_max_pixels": Case(bombed_folder, "more than data.max_image_pixels=89478485",
                                  ("override", "data.bad_images=skip")),
}


def follow(said: tuple[str, ...], argv: list[str], tmp: Path, case: Case) -> list[str]:
    """The command with the advice applied, as a user would."""
    kind, *what = said
    if kind == "override":
        key, value = what[0].split("=", 1)
        for placeholder, make in case.fill.items():
            value = value.replace(placeholder, make(tmp))
        keep = [a for a in argv if not a.lstrip("+").startswith(f"{key}=")]
        return [*keep, f"{key}={value}"]
    if kind == "rename":  # the right key, the value as given
        wrong, right = what
        return [f"{right}={a.split('=', 1)[1]}" if a.lstrip("+").startswith(f"{wrong}=") else a
                for a in argv]
    if kind == "drop":
        return [a for a in argv if a != what[0]]
    if kind == "flag":
        at = argv.index(what[0])
        return [*argv[:at + 1], what[1], *argv[at + 2:]]
    if kind == "class":  # another class folder, under train/ and val/
        root = Path(next(a for a in argv if a.startswith("data.root=")).split("=", 1)[1])
        for split in ("train", "val"):
            shutil.copytree(root / split / "0", root / split / "1")
        return argv
    raise AssertionError(kind)


@pytest.mark.parametrize("name", sorted(CASES))
def test_advice_works_when_followed(name, capfd, tmp_path, existing_run):
    case = CASES[name]
    main, argv = case.argv(tmp_path, existing_run)
    line = refused(in_process(capfd, main, *argv), existing_run)
    assert case.said in line, line
    said = advice(line)
    assert said == case.advice, line
    again = follow(said, argv, tmp_path, case)
    code = main(again)
    out, err = capfd.readouterr()
    assert code == 0, f"followed {said} of\n{line}\nand got exit {code}:\n{out[-2000:]}\n{err[-2000:]}"
