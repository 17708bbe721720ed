"""Mistaken and hostile recipes (files and command-line overrides): refused before torch is
imported, as real processes (about a second each), with one sentence that names the file
or the command line, the key and the fix; exit 2, no traceback, nothing written: neither an
existing run directory nor the working directory (where runs/<name> would go) changes.

A recipe can come from a stranger on a shared login node: the billion-laughs file below is
541 bytes, and is refused in well under a second and little memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffdist import recipe_load
from tests.fault.user_errors.common import DIGITS, train_cmd
from tests.helpers import env, refused
from tests.unit.test_safe_yaml import laughs


def recipe_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def empty_cwd(tmp_path: Path) -> Path:
    work = tmp_path / "cwd"
    work.mkdir()
    return work


# ------------------------------------------------------------------ recipe files

@pytest.mark.parametrize("case,expect", [
    ("missing", "no such recipe file"),
    ("not_yaml", "recipe.yaml: not valid YAML at line 3, column 1"),
    ("not_mapping", "must be a YAML mapping"),
    ("unknown_key", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("wrong_type", "data.batch_size='big' has the wrong type"),
    ("zero_lr", "optim.lr=0.0 is out of range"),
    ("negative_batch", "data.batch_size=-8 is out of range"),
    ("zero_epochs", "schedule.epochs=0 is out of range"),
])
def test_recipe_mistakes(case, expect, tmp_path, existing_run):
    recipe_path, overrides = DIGITS, [f"output_dir={existing_run}"]
    if case == "missing":
        recipe_path = str(tmp_path / "nope.yaml")
    elif case == "not_yaml":
        recipe_path = recipe_file(tmp_path, "name: x\nmodel: [unclosed\n")
    elif case == "not_mapping":
        recipe_path = recipe_file(tmp_path, "- a\n- list\n")
    else:
        overrides.append({"unknown_key": "optim.lrr=0.1", "wrong_type": "data.batch_size=big",
                          "zero_lr": "optim.lr=0", "negative_batch": "data.batch_size=-8",
                          "zero_epochs": "schedule.epochs=0"}[case])
    assert expect in refused(train_cmd(recipe_path, *overrides), existing_run, timeout=60)


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    path = recipe_file(tmp_path, "name: x\noptim:\n  lr: 0\n")
    work = empty_cwd(tmp_path)
    line = refused(train_cmd(path, "seed=1"), work, cwd=work, timeout=60)
    assert f"{path}: optim.lr=0.0 is out of range" in line


@pytest.mark.parametrize("text,expect", [
    ("name: x\noptim:\n  lr: 0.1\n  momentum: 0.8\n  lr: 0.2\n",
     "recipe.yaml line 5: duplicate key 'lr' at lines 3 and 5"),
    ("name: x\noptim:\n  lr: 0.1\nmodel:\n  name: lenet\noptim:\n  lr: 0.2\n",
     "recipe.yaml line 6: duplicate key 'optim' at lines 2 and 6"),
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", "recipe.yaml line 1: nested deeper than 32 levels"),
    ("name: &a [*a]\n", "recipe.yaml line 1: an alias refers to the mapping or list that contains it"),
    ("name: !!python/object/apply:os.system ['touch pwned']\n",
     "recipe.yaml line 1: the tag !!python/object/apply:os.system is not allowed"),
    ("name: x\ndata:\n  root: ${oc.env:HOME}\n",
     "recipe.yaml: data.root='${oc.env:HOME}' calls an interpolation resolver"),
    ("name: x\noptim: 3\n",
     "'optim' is a section (name, lr, lr_reference_batch, momentum, ...), not a value"),
    ("name: ..\n", "recipe.yaml: name='..' is not valid: use a plain folder name"),
    ("name: /tmp/elsewhere\n", "recipe.yaml: name='/tmp/elsewhere' is not valid"),
], ids=["dup-key", "dup-section", "deep", "recursive", "python-tag", "env", "section-scalar",
        "dotdot", "absolute"])
def test_hostile_file_is_one_sentence(tmp_path, text, expect):
    work = empty_cwd(tmp_path)
    line = refused(train_cmd(recipe_file(tmp_path, text)), work, cwd=work, timeout=60)
    assert expect in line, line


def test_oversized_file(tmp_path):
    work = empty_cwd(tmp_path)
    line = refused(train_cmd(recipe_file(tmp_path, "name: x\n# " + "x" * (1 << 20) + "\n")),
                   work, cwd=work, timeout=60)
    assert "larger than 512 KiB" in line


# Runs one child and reports its peak RSS: RUSAGE_CHILDREN of a fresh parent that has
# exactly one child is that child's maximum.
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "err": p.stderr, "out": p.stdout,
                  "seconds": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def test_billion_laughs_is_refused_in_under_a_second_and_little_memory(tmp_path):
    work = empty_cwd(tmp_path)
    cmd = [sys.executable, "-c", MEASURE, *train_cmd(recipe_file(tmp_path, "name: x\n" + laughs()))]
    measured = {}

    def measure() -> tuple[int, str, str]:
        proc = subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        measured.update(json.loads(proc.stdout))
        return measured["rc"], measured["out"], measured["err"]

    line = refused(measure, work)
    assert re.search(r"recipe.yaml line \d+: aliases expand it by more than 10,000 values", line)
    # the whole process: interpreter start, imports, refusal (the loading itself is ~10 ms)
    assert measured["seconds"] < 3.0, measured["seconds"]
    assert measured["rss_mb"] < 150, measured["rss_mb"]


# ------------------------------------------------------------------ command-line overrides

@pytest.mark.parametrize("overrides,expect", [
    (["optim.name=adamw", "optim.betas=[1.5,0.999]"],
     "command line: optim.betas=[1.5, 0.999] is not valid: give two values in [0, 1), e.g. "
     "[0.9,0.999]."),
    (["data.num_workers=2", "data.prefetch_factor=0"],
     "command line: data.prefetch_factor=0 is out of range: use 1 or more"),
    (["data.list_sep="], "command line: data.list_sep has no value (null); expected a string."),
    (["data.list_sep=a"], "command line: data.list_sep='a' is not valid: use a separator that "
                          "file names and labels do not contain"),
    (["seed=99999999999999999999"], "command line: seed=99999999999999999999 is out of range: "
                                    "use an integer from 0 to 2147483647."),
    (["seed=-1"], "seed=-1 is out of range"),
    (["optim.lr=[0.1"], "command line: the value of optim.lr=[0.1 is not valid YAML"),
    (["optim=3"], "command line: optim=3: 'optim' is a section (name, lr, lr_reference_batch, "
                  "momentum, ...), not a value; set one of its keys, e.g. optim.name=..."),
    (["launch.gpus=[x]"], "command line: launch.gpus[0]='x' has the wrong type; expected a list "
                          "of integers, e.g. launch.gpus=[0,2] (one value alone is a "
                          "one-element list)."),
    (["optim.lr=0"], "command line: optim.lr=0.0 is out of range"),
    (["name=.."], "command line: name='..' is not valid: use a plain folder name"),
    (["name=../../etc"], "command line: name='../../etc' is not valid"),
    (["data.root=${oc.env:HOME}"],
     "command line: data.root='${oc.env:HOME}' calls an interpolation"),
    (["optim.lr=${oc.decode:'0.1'}"], "command line: optim.lr="),
], ids=["betas", "prefetch", "list_sep-empty", "list_sep-odd", "seed-overflow", "seed-negative",
        "not-yaml", "section-scalar", "list-item-type", "blamed-on-command-line", "dotdot",
        "parent-path", "env", "decode-resolver"])
def test_override_slips_are_one_sentence_blaming_the_command_line(tmp_path, overrides, expect):
    """In an empty working directory, where the run directory (runs/digits) would go."""
    work = empty_cwd(tmp_path)
    assert expect in refused(train_cmd(DIGITS, *overrides), work, cwd=work, timeout=60)


# ------------------------------------------------------------------ what is not a mistake

def test_a_list_key_takes_one_value_as_a_one_element_list(tmp_path):
    r = recipe_load.load(None, ["model.freeze=backbone", "launch.gpus=0", "schedule.milestones=30",
                           "data.classes=cat"])
    assert r.model.freeze == ["backbone"] and r.launch.gpus == [0]
    assert r.schedule.milestones == [30] and r.data.classes == ["cat"]
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  freeze: backbone\n")
    assert recipe_load.load(path).model.freeze == ["backbone"]


def test_blank_list_sep_is_kept():
    assert recipe_load.load(None, ["data.list_sep= "]).data.list_sep == " "
    assert recipe_load.load(None, ["data.list_sep=\t"]).data.list_sep == "\t"


def test_a_plain_reference_between_keys_still_interpolates(tmp_path):
    """`${other.key}` reads the recipe itself, not the environment: still allowed."""
    path = tmp_path / "r.yaml"
    path.write_text("name: lr_${optim.lr}\noptim:\n  lr: 0.05\n")
    assert recipe_load.load(path).name == "lr_0.05"
    started = time.perf_counter()
    assert recipe_load.load(path, ["optim.lr=0.2"]).name == "lr_0.2"
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------ numbers that cannot be right

@pytest.mark.parametrize("overrides,expect", [
    (["launch.nproc=100000"], "command line: launch.nproc=100000 is out of range: use 1 to 512 "
                              "processes per node"),
    (["launch.rdzv_endpoint=head:99999"], "command line: launch.rdzv_endpoint='head:99999' is "
                                          "not valid: use host:port with a port from 1 to 65535"),
    (["data.name=synthetic", "data.image_size=30000"],
     "command line: data.image_size=30000 is out of range: use a side from 1 to 4096 pixels"),
    (["optim.lr=inf"], "command line: optim.lr=inf is out of range: use a finite number"),
], ids=["nproc", "port", "image-side", "inf"])
def test_launch_dry_run_refuses_what_cannot_run(tmp_path, overrides, expect):
    """`ffdist launch --dry-run` prints what it would start: never for a recipe that cannot
    run. As a real process, in an empty working directory."""
    work = empty_cwd(tmp_path)
    line = refused([sys.executable, "-m", "ffdist.cli", "launch", "--dry-run", DIGITS, *overrides],
                   work, cwd=work, timeout=60)
    assert expect in line


def test_tilde_in_a_yaml_output_dir_is_home_not_a_folder_named_tilde(tmp_path):
    """`output_dir: ~/x` in a recipe file (no shell expands it): the run goes under $HOME and
    its recipe.yaml says so; no `~` folder appears in the working directory."""
    work, home = empty_cwd(tmp_path), tmp_path / "home"
    path = recipe_file(tmp_path, "name: t\noutput_dir: ~/runs/t\nmodel:\n  in_channels: 1\n")
    proc = subprocess.run(train_cmd(path, "schedule.max_steps=2", "schedule.epochs=1",
                                    "log.tensorboard=false", "log.progress=false"),
                          cwd=work, env=env(HOME=str(home)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (work / "~").exists() and list(work.iterdir()) == []
    saved = (home / "runs" / "t" / "recipe.yaml").read_text()
    assert f"output_dir: {home / 'runs' / 't'}" in saved
