"""Security: checkpoints and recipes are data, never code.

Static checks over the package source (AST, not grep, so that comments and strings do not
count) plus two live attempts: a checkpoint that would run code when unpickled, and a YAML
recipe with a python/object tag. Both must be refused without running anything.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from ffdist import checkpoint, recipe_load
from ffdist.errors import CheckpointError, RecipeError
from tests.helpers import REPO

SOURCES = sorted((REPO / "ffdist").rglob("*.py"))
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def calls() -> list[tuple[Path, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found.append((path, node))
    return found


def name_of(func: ast.expr) -> str:
    return ast.unparse(func)


def kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    loads = [(p, c) for p, c in calls() if name_of(c.func) == "torch.load"]
    assert loads, "expected the checkpoint loader to call torch.load"
    for path, call in loads:
        value = kw(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, \
            f"{path}:{call.lineno}: torch.load without weights_only=True"


def test_yaml_only_through_safe_functions():
    for path, call in calls():
        name = name_of(call.func)
        if name.startswith("yaml.") and path.name != "safe_yaml.py":
            assert name in ("yaml.safe_load", "yaml.safe_dump"), f"{path}:{call.lineno}: {name}"
    # ffdist.safe_yaml builds its loader on SafeLoader; no unsafe loader is named anywhere
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "yaml":
                assert node.attr not in ("load", "load_all", "unsafe_load", "full_load", "Loader",
                                         "FullLoader", "UnsafeLoader", "CLoader"), \
                    f"{path}:{node.lineno}: yaml.{node.attr}"
    from ffdist.safe_yaml import LimitedLoader
    assert issubclass(LimitedLoader, __import__("yaml").SafeLoader)


def test_subprocesses_take_argv_lists_never_a_shell():
    for path, call in calls():
        name = name_of(call.func)
        assert name not in ("os.system", "os.popen"), f"{path}:{call.lineno}: {name}"
        shell = kw(call, "shell")
        assert not (isinstance(shell, ast.Constant) and shell.value), f"{path}:{call.lineno}"
        if name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_CALLS:
            first = call.args[0] if call.args else kw(call, "args")
            assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), \
                f"{path}:{call.lineno}: build an argv list, not a command string"


# Modules that import a module named in a constant table of their own (the commands, the
# registries of the seams), never one named by a recipe: a recipe value only selects an entry.
# ffdist/sinks/base.py's need() imports the optional package a sink file names: every call
# of need() must pass a literal (checked below).
TABLE_IMPORTERS = {"ffdist/cli.py", "ffdist/data/sources/__init__.py",
                   "ffdist/strategies/__init__.py", "ffdist/sinks/__init__.py",
                   "ffdist/sinks/base.py"}


def test_no_dynamic_code_from_recipes():
    for path, call in calls():
        name = name_of(call.func)
        assert name not in ("eval", "exec", "__import__"), f"{path}:{call.lineno}: {name}"
        where = path.relative_to(REPO).as_posix()
        if name in ("importlib.import_module", "import_module") and where not in TABLE_IMPORTERS:
            assert isinstance(call.args[0], ast.Constant), \
                f"{path}:{call.lineno}: a module name from data would let a recipe run code"
        if name == "need" and where.startswith("ffdist/sinks/"):
            assert isinstance(call.args[0], ast.Constant), \
                f"{path}:{call.lineno}: need() imports what it is given: pass a literal"
    from ffdist import sinks, strategies
    from ffdist.data import sources
    from ffdist.errors import RecipeError
    from ffdist.recipe import LogConfig

    # a recipe's data.name, strategy.name and log.sinks pick registered entries, never a module
    for value in ("os:system", "ffdist.data.sources.digits:Digits", "subprocess"):
        with pytest.raises(sources.UnknownSource, match="is not a dataset"):
            sources.get(value)
        with pytest.raises(RecipeError):
            strategies.get(value)
        with pytest.raises(RecipeError, match="is not a log sink"):
            sinks.check(LogConfig(sinks=[value]))


def test_tensorboard_is_never_served_by_ffdist():
    for path in SOURCES:
        text = path.read_text()
        for needle in ("tensorboard.program", "bind_all", "0.0.0.0"):
            assert needle not in text, f"{path}: {needle}"


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    evil = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "x": _Boom()}, evil)
    with pytest.raises(CheckpointError, match="is not a safe checkpoint") as e:
        checkpoint.load_torch(evil)
    assert not marker.exists()
    said = str(e.value)
    assert "torch.save(model.state_dict(), PATH)" in said  # what to do instead
    assert not [p for p in DISARMING if p in said.lower()], said


# Phrases of advice that turns a protection off (torch's own refusal of a pickle says to
# re-run with weights_only=False "if you trust the source"): a refusal never repeats them.
DISARMING = ("weights_only=false", "weights_only set to false", "trust the source",
             "trusted source", "if you trust", "add_safe_globals", "safe_globals(",
             "--no-verify", "allow_pickle")


def test_no_message_suggests_turning_a_protection_off():
    """Every string constant in the package (the messages are built from them): no advice
    to disable weights_only or to trust a file, whatever error a message wraps."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = [p for p in DISARMING if p in node.value.lower()]
                assert not found, f"{path}:{node.lineno}: {found}"


def test_recipe_with_python_tag_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="the tag !!python/object/apply:os.system is not allowed"):
        recipe_load.load(path)
    assert not marker.exists()
