"""The recipe schema (ffdist.recipe): every recipe in recipes/ loads and opens with its
command, overrides are coerced to the schema's types and survive the YAML round trip, bad
overrides and files name the key, value and fix (the CLI prints one line, exit 2), and
every key is documented in the generated recipe reference."""

import subprocess
import sys
from pathlib import Path

import pytest

from ffdist import docs, recipe_load
from ffdist.errors import RecipeError
from tests.helpers import RECIPES, REPO, env

ALL_RECIPES = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_opens_with_its_command(path: Path) -> None:
    r = recipe_load.load(path)
    assert r.name and r.data.batch_size >= 1
    head = path.read_text().splitlines()[:20]
    assert head[0].startswith("#"), f"{path.name} must open with a comment"
    assert any("ffdist" in line or "torchrun" in line for line in head if line.startswith("#")), \
        f"{path.name}: the opening comment must give the command that runs it"


def test_overrides_are_coerced_to_schema_types() -> None:
    r = recipe_load.load(RECIPES / "digits.yaml",
                    ["optim.lr=0.05", "schedule.epochs=5", "launch.gpus=[0,2]",
                     "data.micro_batch_size=16", "model.pretrained=null"])
    assert r.optim.lr == 0.05 and isinstance(r.optim.lr, float)
    assert r.schedule.epochs == 5 and isinstance(r.schedule.epochs, int)
    assert r.launch.gpus == [0, 2]
    assert r.data.micro_batch_size == 16
    assert r.model.pretrained is None


def test_recipe_values_survive_the_yaml_round_trip(tmp_path: Path) -> None:
    r = recipe_load.load(RECIPES / "resnet50.yaml", ["optim.lr=0.3"])
    out = tmp_path / "resolved.yaml"
    out.write_text(r.to_yaml())
    assert recipe_load.load(out) == r


@pytest.mark.parametrize("override,must_contain", [
    ("optim.lrr=0.1", ["optim.lrr", "did you mean 'optim.lr'"]),
    ("schedule.epoch=3", ["schedule.epoch", "schedule.epochs"]),
    ("optim.lr=fast", ["optim.lr", "'fast'", "expected a number"]),
    ("data.batch_size=1.5", ["data.batch_size", "int"]),
    ("optim.lr=0", ["optim.lr", "positive"]),
    ("data.batch_size=-4", ["data.batch_size"]),
    ("schedule.epochs=0", ["schedule.epochs"]),
    ("precision=fp8", ["precision", "fp32"]),
    ("strategy.offload_params=true", ["offload_params", "zero_stage=3"]),
    ("lr", ["key=value"]),
])
def test_bad_overrides_name_key_value_and_fix(override: str, must_contain: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_load.load(RECIPES / "digits.yaml", [override])
    msg = str(err.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_unknown_key_in_the_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim:\n  momentun: 0.9\n")
    with pytest.raises(RecipeError, match=r"bad.yaml.*optim.momentun.*optim.momentum"):
        recipe_load.load(bad)


@pytest.mark.parametrize("text,fragment", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(text)
    with pytest.raises(RecipeError, match=fragment):
        recipe_load.load(bad)


def test_missing_file() -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe_load.load("does/not/exist.yaml")


def test_cli_prints_one_line_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "ffdist.train", "recipes/digits.yaml",
                           "optim.lrr=0.1"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "optim.lrr" in lines[0] and "optim.lr'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_every_key_is_documented() -> None:
    rows = docs.field_docs()
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented, f"keys without a docstring: {undocumented}"
    page = (REPO / "docs" / "recipe-reference.md").read_text()
    missing = [key for key, *_ in rows if f"`{key}`" not in page]
    assert not missing, f"docs/recipe-reference.md lacks {missing}; run `python -m ffdist.docs`"
    # Not only every key: the generated table itself, so a changed default or docstring
    # shows too.
    assert docs.generated_part(page) == docs.table(), (
        "docs/recipe-reference.md's table differs from ffdist/recipe.py's docstrings; "
        "run `python -m ffdist.docs`")


def test_docs_command_writes_the_table_between_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "ref.md"
    page.write_text(f"# head\n{docs.BEGIN}\nstale\n{docs.END}\ntail\n")
    proc = subprocess.run([sys.executable, "-m", "ffdist.docs", str(page)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "stale" not in text
    assert docs.generated_part(text) == docs.table()
    page.write_text("# no markers\n")
    proc = subprocess.run([sys.executable, "-m", "ffdist.docs", str(page)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "markers" in proc.stderr and "Traceback" not in proc.stderr
    assert page.read_text() == "# no markers\n"
