"""ffdist.safe_yaml: the limits of the recipe reader, in-process (the real-process checks
of the same inputs are in tests/fault/user_errors/test_recipes.py)."""

from __future__ import annotations

import time

import pytest
import yaml

from ffdist import safe_yaml
from ffdist.safe_yaml import YamlRefused


def laughs(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs document: each level lists the previous one `width` times."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * width)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly():
    text = laughs()
    assert len(text) < 600  # a few hundred bytes: 9**10 = 3.5 billion values expanded
    started = time.perf_counter()
    with pytest.raises(YamlRefused, match="aliases expand it by more than 10,000 values"):
        safe_yaml.load(text)
    assert time.perf_counter() - started < 0.5


def test_a_few_aliases_that_stay_small_are_fine():
    data = safe_yaml.load("base: &b {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *b\n  lr: 0.2\n"
                          "gpus: &g [0, 1]\nalso: *g\n")
    assert data["optim"] == {"lr": 0.2, "momentum": 0.9} and data["also"] == [0, 1]


def test_alias_nesting_depth_is_bounded():
    # every level holds the previous once: no size blow-up, but 40 levels of depth
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 40)]
    with pytest.raises(YamlRefused, match="nest it deeper than 32 levels"):
        safe_yaml.load("\n".join(lines))


def test_deep_brackets_are_refused_before_python_recursion():
    with pytest.raises(YamlRefused, match="nested deeper than 32 levels"):
        safe_yaml.load("[" * 100_000 + "]" * 100_000)


def test_recursive_alias_is_refused():
    with pytest.raises(YamlRefused, match="recursive"):
        safe_yaml.load("a: &a [1, *a]\n")


def test_too_many_aliases():
    text = "a: &a 1\nb: [" + ", ".join(["*a"] * (safe_yaml.MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(YamlRefused, match="alias uses"):
        safe_yaml.load(text)


@pytest.mark.parametrize("text,key,lines", [
    ("a: 1\nb: 2\na: 3\n", "a", (1, 3)),
    ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "lr", (2, 4)),
    ("optim:\n  lr: 0.1\nmodel: {}\noptim:\n  lr: 0.2\n", "optim", (1, 4)),
    ("x: {k: 1, k: 2}\n", "k", (1, 1)),
])
def test_duplicate_keys_name_the_key_and_both_lines(text, key, lines):
    with pytest.raises(YamlRefused) as err:
        safe_yaml.load(text)
    assert f"duplicate key '{key}' at lines {lines[0]} and {lines[1]}" in str(err.value)
    assert err.value.line == lines[1]


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!!binary aGk=",
                                 "!!set {a}", "!!timestamp 2024-01-01", "!custom x",
                                 "!!python/name:os.system"])
def test_tags_beyond_plain_data_are_refused(tag):
    with pytest.raises(YamlRefused, match="is not allowed: a recipe holds plain values only"):
        safe_yaml.load(f"name: {tag}\n")


def test_plain_values_read_like_omegaconf():
    data = safe_yaml.load("a: 1e-3\nb: 10\nc: 2024-01-01\nd: null\ne: [1, two]\nf: true\n")
    assert data == {"a": 0.001, "b": 10, "c": "2024-01-01", "d": None, "e": [1, "two"], "f": True}


def test_syntax_errors_stay_yaml_errors():
    with pytest.raises(yaml.YAMLError):
        safe_yaml.load("name: [unclosed\n")


def test_a_long_plain_list_is_not_an_alias_expansion():
    """ImageNet-21k's class list (21,841 names, ~300 KB) has no aliases: only MAX_BYTES
    bounds it."""
    text = "data:\n  classes:\n" + "".join(f"  - n{i:08d}\n" for i in range(21841))
    assert len(text) < safe_yaml.MAX_BYTES
    assert len(safe_yaml.load(text)["data"]["classes"]) == 21841


def test_aliases_that_add_more_than_the_limit_are_refused_even_when_small():
    lines = ["a0: &a0 [1, 2]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]"
                                  for i in range(1, 9)]  # 2 * 3**8 = 13,122 values
    with pytest.raises(YamlRefused, match="aliases expand it by more than 10,000 values"):
        safe_yaml.load("\n".join(lines))
