"""One place decides each fact: the batch plan and the precision are derived by
ffdist.assemble.resolve only (AST over the package, so comments and strings do not count)."""

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
    tables = [p for p in SOURCES if "NATIVE_SIZE = " in p.read_text()]
    assert [p.name for p in tables] == ["assemble.py"]
