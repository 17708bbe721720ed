"""Fuzz the recipe loader: any mapping, any YAML text, any override list either loads into
a Recipe or raises ONE RecipeError sentence, quickly; a loaded recipe survives its own
saved YAML (recipe.yaml must stay re-runnable)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings

from ffdist import recipe, recipe_load, safe_yaml
from ffdist.errors import RecipeError
from tests.fuzz import strategies
from tests.fuzz.conftest import examples

# make test-all only: random cases of paths the fast tier covers with fixed ones
# (tests/fault/user_errors/); `make fuzz` is the long run.
pytestmark = pytest.mark.extended


def loads_or_refuses(load) -> recipe.Recipe | None:
    started = time.perf_counter()
    try:
        result = load()
    except RecipeError as e:
        text = str(e)
        assert text and "\n" not in text, repr(text)
        assert "Traceback" not in text
        result = None
    assert time.perf_counter() - started < 5.0, "slow acceptance or refusal"  # loaded CI: 10x
    return result


def round_trips(r: recipe.Recipe) -> None:
    again = recipe_load.from_dict(safe_yaml.load(r.to_yaml()), source="recipe.yaml")
    assert again == r


@settings(max_examples=examples("recipe_dicts"))
@given(raw=strategies.recipe_dicts(), overrides=strategies.overrides())
def test_any_mapping_and_overrides(raw, overrides):
    r = loads_or_refuses(lambda: recipe_load.from_dict(raw, overrides, source="fuzz.yaml"))
    if r is not None:
        round_trips(r)


@settings(max_examples=examples("recipe_texts"))
@given(text=strategies.recipe_texts())
def test_any_recipe_text(text):
    with tempfile.TemporaryDirectory() as box:
        path = Path(box) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        r = loads_or_refuses(lambda: recipe_load.load(path))
    if r is not None:
        round_trips(r)


@settings(max_examples=examples("overrides"))
@given(overrides=strategies.overrides(max_size=8))
def test_any_overrides_on_a_real_recipe(overrides):
    from tests.helpers import RECIPES

    r = loads_or_refuses(lambda: recipe_load.load(RECIPES / "digits.yaml", overrides))
    if r is not None:
        round_trips(r)
