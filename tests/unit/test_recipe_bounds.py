"""Recipe values that cannot be right are refused when the recipe is read, in one sentence
naming the key, the value and the fix: inf and NaN in every float key of the schema (a
generic check, so a key added later is covered), a final learning rate above the peak,
milestones that are not positive and increasing, image sides, process and node counts
beyond their maxima, ports outside 1..65535. Path keys expand a leading `~` in one place,
from YAML and the command line alike, and the saved recipe records the expanded path.
Hydra's `+key=value` says that ffdist has no `+` prefix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ffdist import recipe_load
from ffdist.docs import field_docs
from ffdist.errors import RecipeError
from ffdist.recipe import MAX_IMAGE_SIDE, MAX_NNODES, MAX_NPROC, Recipe

FLOAT_KEYS = sorted(k for k, t in recipe_load.leaf_types().items()
                    if t.split(" | ")[0] in ("float", "list[float]"))


def refusal(*overrides: str, path: str | Path | None = None) -> str:
    with pytest.raises(RecipeError) as e:
        recipe_load.load(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("value", ["inf", "-inf", ".nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_inf_and_nan(key, value):
    listed = recipe_load.leaf_types()[key].startswith("list")
    said = refusal(f"{key}=[{value},0.5]" if listed else f"{key}={value}")
    assert said.startswith(f"command line: {key}=") and "\n" not in said, said
    assert "out of range" in said or "is not valid" in said, said


def test_the_generic_check_names_a_working_value():
    """Keys whose own range check lets infinity through get the generic sentence, with the
    default as an example to set."""
    for key, default in (("optim.lr", 0.1), ("data.mixup_alpha", 0.0), ("schedule.min_lr", 0.0),
                         ("schedule.warmup_epochs", 0.0), ("optim.ema_warmup_epochs", 0.0),
                         ("optim.grad_clip", "null")):
        assert refusal(f"{key}=inf") == (f"command line: {key}=inf is out of range: use a "
                                         f"finite number, e.g. {key}={default} (the default).")
    assert FLOAT_KEYS and len(FLOAT_KEYS) >= 20  # the walk finds the schema's floats


def test_min_lr_cannot_exceed_lr():
    assert refusal("optim.lr=0.01", "schedule.min_lr=0.02") == (
        "command line: schedule.min_lr=0.02 is out of range: the final learning rate cannot "
        "exceed optim.lr=0.01; set schedule.min_lr=0 or another value up to 0.01.")
    assert recipe_load.load(None, ["optim.lr=0.01", "schedule.min_lr=0.01"]).schedule.min_lr == 0.01


@pytest.mark.parametrize("milestones", ["[30,20]", "[0,10]", "[-5]", "[10,10]"])
def test_milestones_are_positive_and_increasing(milestones):
    assert "schedule.milestones" in refusal(f"schedule.milestones={milestones}")
    assert recipe_load.load(None, ["schedule.milestones=[1,2,90]"]).schedule.milestones == [1, 2, 90]


@pytest.mark.parametrize("override,fragment", [
    (f"data.image_size={MAX_IMAGE_SIDE + 1}", f"use a side from 1 to {MAX_IMAGE_SIDE} pixels"),
    ("data.image_size=30000", "data.image_size=30000 is out of range"),
    ("data.eval_image_size=5000", "data.eval_image_size=5000 is out of range"),
    ("data.eval_resize_size=0", "data.eval_resize_size=0 is out of range"),
    (f"launch.nproc={MAX_NPROC + 1}", f"use 1 to {MAX_NPROC} processes per node"),
    ("launch.nproc=100000", "launch.nproc=100000 is out of range"),
    (f"launch.nnodes={MAX_NNODES + 1}", f"use 1 to {MAX_NNODES} nodes"),
    ("launch.rdzv_endpoint=head:99999", "use host:port with a port from 1 to 65535"),
    ("launch.rdzv_endpoint=head:0", "launch.rdzv_endpoint='head:0' is not valid"),
    ("launch.rdzv_endpoint=head:http", "launch.rdzv_endpoint='head:http' is not valid"),
    ("launch.rdzv_endpoint=:29500", "launch.rdzv_endpoint=':29500' is not valid"),
    ("data.max_image_pixels=0", "data.max_image_pixels=0 is out of range"),
])
def test_maxima_and_ports(override, fragment):
    assert fragment in refusal(override)


def test_the_largest_values_allowed_load():
    r = recipe_load.load(None, ["data.name=synthetic", f"data.image_size={MAX_IMAGE_SIDE}",
                                f"launch.nproc={MAX_NPROC}", f"launch.nnodes={MAX_NNODES}",
                                "launch.rdzv_endpoint=[::1]:65535", "data.max_image_pixels=1"])
    assert r.launch.rdzv_endpoint == "[::1]:65535" and r.data.image_size == MAX_IMAGE_SIDE


# ------------------------------------------------------------------ ~ in paths

def path_like(key: str, doc: str) -> bool:
    return recipe_load.leaf_types()[key].startswith("str") and bool(
        re.search(r"\b(path|file|folder|directory)\b", doc.lower()))


# keys whose docstrings speak of files without naming one
NOT_PATHS = {"data.list_sep", "data.bad_images", "data.decode"}


def test_every_key_that_names_a_file_is_expanded():
    """A new key whose docstring speaks of a path, file or folder must be in PATH_KEYS (or
    here, said not to be one): otherwise `~` in it would make a folder named `~`."""
    docs = {key: doc for key, _, _, doc in field_docs()}
    candidates = {k for k, d in docs.items() if path_like(k, d)} - NOT_PATHS
    assert candidates <= set(recipe_load.PATH_KEYS), candidates - set(recipe_load.PATH_KEYS)
    assert all(recipe_load.leaf_types()[k].startswith("str") for k in recipe_load.PATH_KEYS)


@pytest.mark.parametrize("key", recipe_load.PATH_KEYS)
def test_tilde_is_expanded_from_the_command_line_and_yaml(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    *section, last = key.split(".")
    extra = ["data.name=filelist"] if key.startswith("data.") else []
    r = recipe_load.load(None, [*extra, f"{key}=~/x/y.pt"])
    assert _get(r, key) == os.path.join(home, "x/y.pt")
    text = f"{section[0]}:\n  {last}: ~/x/y.pt\n" if section else f"{last}: ~/x/y.pt\n"
    (tmp_path / "r.yaml").write_text(text)
    r = recipe_load.load(tmp_path / "r.yaml", extra)
    assert _get(r, key) == os.path.join(home, "x/y.pt")
    assert "~" not in r.to_yaml()  # the run's recipe.yaml records the expanded path


def _get(r: Recipe, key: str) -> object:
    obj: object = r
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_tilde_of_an_unknown_user_is_refused():
    assert refusal("output_dir=~no_such_user_here/run") == (
        "command line: output_dir=~no_such_user_here/run: ~no_such_user_here is not a user's "
        "home folder here; write the whole path.")


def test_run_dir_of_a_yaml_tilde_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text("output_dir: ~/runs/x\n")
    assert recipe_load.load(tmp_path / "r.yaml").run_dir == tmp_path / "runs" / "x"


# ------------------------------------------------------------------ Hydra's +key=value

def test_plus_prefix_is_explained():
    assert refusal("+optim.lr=0.05") == (
        "command line: +optim.lr=0.05: ffdist has no '+' prefix (every recipe key exists "
        "already); write optim.lr=0.05.")
    assert refusal("+optim.foo=1") == (
        "command line: +optim.foo=1: ffdist has no '+' prefix (every recipe key exists "
        "already), and 'optim.foo' is not a recipe key; leave out '+optim.foo=1' (every key is "
        "listed in docs/recipe-reference.md).")
    assert refusal("++optim.lrr=1").endswith("'optim.lrr' is not a recipe key; did you mean "
                                             "'optim.lr'?")
