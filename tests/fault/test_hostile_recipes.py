"""Hostile or careless recipes, as real processes: refused in well under a second with one
sentence (exit 2) that names the file and line, before torch is imported, and nothing is
written anywhere (each process runs in an empty working directory that must stay empty).

A recipe can come from a stranger on a shared login node: the billion-laughs file below is
541 bytes and used to take minutes and gigabytes before it was rejected.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffdist.errors import EXIT_USER_ERROR
from tests.fault.test_bad_input import only_error_line
from tests.helpers import RECIPES, env
from tests.unit.test_safe_yaml import laughs

DIGITS = str(RECIPES / "digits.yaml")

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


def train_in(cwd: Path, recipe: str, *overrides: str) -> dict:
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "ffdist.train", recipe,
           *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refused(tmp_path: Path, text: str | None, *overrides: str) -> tuple[str, dict]:
    work = tmp_path / "cwd"
    work.mkdir()
    recipe = DIGITS
    if text is not None:
        recipe = str(tmp_path / "recipe.yaml")
        Path(recipe).write_text(text)
    result = train_in(work, recipe, *overrides)
    assert result["rc"] == EXIT_USER_ERROR, result
    assert list(work.iterdir()) == [], "a refused recipe wrote into the working directory"
    return only_error_line(result["err"]), result


def test_billion_laughs_is_refused_in_under_a_second_and_little_memory(tmp_path):
    line, result = refused(tmp_path, "name: x\n" + laughs())
    assert re.search(r"recipe.yaml line \d+: aliases expand it by more than 10,000 values", line)
    # the whole process: interpreter start, imports, refusal (the loading itself is ~10 ms)
    assert result["seconds"] < 3.0, result["seconds"]
    assert result["rss_mb"] < 150, result["rss_mb"]


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
    ("name: x\noptim: 3\n", "'optim' is a section (name, lr, momentum, nesterov, ...), not a value"),
    ("name: ..\n", "recipe.yaml: name='..' is not valid: use a plain folder name"),
    ("name: /tmp/elsewhere\n", "recipe.yaml: name='/tmp/elsewhere' is not valid"),
], ids=["dup-key", "dup-section", "deep", "recursive", "python-tag", "env", "section-scalar",
        "dotdot", "absolute"])
def test_hostile_file_is_one_sentence(tmp_path, text, expect):
    line, _ = refused(tmp_path, text)
    assert expect in line, line


def test_oversized_file(tmp_path):
    line, _ = refused(tmp_path, "name: x\n# " + "x" * (1 << 20) + "\n")
    assert "larger than 512 KiB" in line


@pytest.mark.parametrize("override,expect", [
    ("name=..", "command line: name='..' is not valid: use a plain folder name"),
    ("name=../../etc", "command line: name='../../etc' is not valid"),
    ("data.root=${oc.env:HOME}", "command line: data.root='${oc.env:HOME}' calls an interpolation"),
    ("optim.lr=${oc.decode:'0.1'}", "command line: optim.lr="),
    ("optim.lr=[1,", "command line: the value of optim.lr=[1, is not valid YAML"),
    ("optim=3", "command line: optim=3: 'optim' is a section"),
    ("seed=99999999999999999999", "command line: seed=99999999999999999999 is out of range: use "
                                  "an integer from 0 to 2147483647"),
])
def test_hostile_override_is_one_sentence_blaming_the_command_line(tmp_path, override, expect):
    line, _ = refused(tmp_path, None, override)
    assert expect in line, line


def test_a_plain_reference_between_keys_still_interpolates(tmp_path):
    """`${other.key}` reads the recipe itself, not the environment: still allowed."""
    from ffdist import recipe_load

    path = tmp_path / "r.yaml"
    path.write_text("name: lr_${optim.lr}\noptim:\n  lr: 0.05\n")
    assert recipe_load.load(path).name == "lr_0.05"
    started = time.perf_counter()
    assert recipe_load.load(path, ["optim.lr=0.2"]).name == "lr_0.2"
    assert time.perf_counter() - started < 1.0
