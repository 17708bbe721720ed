"""One place decides each fact: the batch plan, the precision, the strategy (its name, and
what its class refuses) and the image size are derived by ffdist.assemble.resolve only;
image sizes are declared by the data sources only, and no code outside ffdist/strategies/
tests a strategy's name (AST over the package, so comments and strings do not count)."""

from __future__ import annotations

import ast

from tests.helpers import REPO

SOURCES = sorted((REPO / "ffdist").rglob("*.py"))


def callers(name: str) -> list[str]:
    """'path:line' of every call whose callee is spelled `name` (or ends with '.name')."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                callee = ast.unparse(node.func)
                if callee == name or callee.endswith("." + name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_plan_batches_and_precision_resolve_have_one_caller_each():
    assert [c.split(":")[0] for c in callers("plan_batches")] == ["ffdist/assemble.py"]
    assert [c.split(":")[0] for c in callers("precision.resolve")] == ["ffdist/assemble.py"]


def test_strategy_names_and_native_sizes_are_decided_in_resolve_too():
    assert [c.split(":")[0] for c in callers("resolve_name")] == ["ffdist/assemble.py"]
    assert [c.split(":")[0] for c in callers("check_precision")] == ["ffdist/assemble.py"]
    # sizes: asked of the data source by assemble only (image_size, eval_image_size) ...
    for method in ("train_size", "eval_size"):
        outside = [c for c in callers(method) if not c.startswith("ffdist/data/sources/")]
        assert [c.split(":")[0] for c in outside] == ["ffdist/assemble.py"], (method, outside)
    # ... and declared by the sources themselves, a class attribute each, no table elsewhere
    declared = sorted({p.relative_to(REPO).as_posix() for p in SOURCES
                       for node in ast.walk(ast.parse(p.read_text()))
                       if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                           "native_size" in ast.unparse(t) or "NATIVE_SIZE" in ast.unparse(t)
                           for t in (node.targets if isinstance(node, ast.Assign)
                                     else [node.target]))})
    assert declared and all(p.startswith("ffdist/data/sources/") for p in declared), declared


def _constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {c for e in node.elts for c in _constants(e)}
    return set()


def test_no_code_outside_the_strategies_tests_a_strategy_name():
    """A comparison of a strategy-ish value (`resolved.strategy`, `recipe.strategy.name`,
    `ckpt.strategy`) with a registered name belongs in ffdist/strategies/: elsewhere the
    code asks the strategy's declarations."""
    from ffdist import strategies

    names = set(strategies.names())
    found = []
    for path in SOURCES:
        if "strategies" in path.relative_to(REPO).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                named = set().union(*(_constants(o) for o in operands)) & names
                if named and any("strategy" in ast.unparse(o) for o in operands):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"strategy names tested outside ffdist/strategies/: {found}"
