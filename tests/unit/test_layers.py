"""Imports point down and form no circle: the import-linter contracts of pyproject.toml
(ffdist's layers, every module placed in one; the seams independent of each other) hold
on ffdist/'s import graph, no group of modules imports itself round, and fault injection
is armed by ffdist.train alone. The graph is grimp's (import-linter's own library):
function-level and type-checking imports count like any other."""

from __future__ import annotations

import grimp
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract

from tests.helpers import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

CONTRACT_TYPES = {"layers": LayersContract, "independence": IndependenceContract}

# Circles that the strategy seam's own work removes (checkpoint.clean_state_dict moves below
# both; ema and ema_zero part). Temporary: nothing may be added, and the test fails once one
# of them is gone, so that it is taken off this list.


def graph() -> grimp.ImportGraph:
    return grimp.build_graph("ffdist", cache_dir=None)  # this checkout's ffdist (REPO first)


def circles(g: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(g.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(g.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def broken(g: grimp.ImportGraph) -> list[str]:
    """What the contracts of pyproject.toml refuse in `g`, one line per import or module."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    session = {"root_packages": [config["root_package"]]}
    lines = []
    for spec in config["contracts"]:
        options = {k: str(v).lower() if isinstance(v, bool) else v for k, v in spec.items()
                   if k not in ("id", "name", "type")}  # import-linter reads "true" as text
        contract = CONTRACT_TYPES[spec["type"]](spec["name"], session, options)
        found = contract.check(g, verbose=False)
        if found.kept:
            continue
        meta = found.metadata
        for dep in meta.get("invalid_dependencies", []):
            hops = {f"{h['importer']} -> {h['imported']}" for r in dep["routes"] for h in r["chain"]}
            lines.append(f"{spec['id']}: {dep['importer']} imports {dep['imported']}, a layer "
                         f"above it ({', '.join(sorted(hops))})")
        lines += [f"{spec['id']}: {m} is in no layer" for m in sorted(meta.get("undeclared_modules", ()))]
        for chain in meta.get("invalid_chains", []):
            lines.append(f"{spec['id']}: {chain['downstream_module']} reaches "
                         f"{chain['upstream_module']}")
    return lines


def test_the_contracts_hold() -> None:
    lines = broken(graph())
    assert not lines, "imports against pyproject.toml's contracts:\n" + "\n".join(lines)


def test_no_import_circle() -> None:
    found = circles(graph())
    assert not found, "import circles in ffdist/: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_an_upward_import_a_crossed_seam_and_an_unplaced_module_are_named() -> None:
    g = graph()
    g.add_import(importer="ffdist.recipe", imported="ffdist.engine", line_number=1,
                 line_contents="from ffdist.engine import Trainer")
    g.add_import(importer="ffdist.data.mapstyle", imported="ffdist.models", line_number=1,
                 line_contents="from ffdist import models")
    g.add_module("ffdist.somewhere")
    lines = broken(g)
    assert any(ln.startswith("layers: ffdist.recipe imports ffdist.engine") for ln in lines), lines
    assert "layers: ffdist.somewhere is in no layer" in lines
    assert "seams: ffdist.data reaches ffdist.models" in lines


def test_a_new_circle_is_named() -> None:
    g = graph()
    g.add_import(importer="ffdist.world", imported="ffdist.errors", line_number=1,
                 line_contents="from ffdist.errors import LaunchError")
    assert {"ffdist.world", "ffdist.errors"} in circles(g)


def test_fault_injection_is_armed_by_train_alone() -> None:
    """The Trainer and the checkpoint manager run no faults code: ffdist.train installs the
    hooks when FFDIST_FAULT is set, and nothing else imports ffdist.faults."""
    assert graph().find_modules_that_directly_import("ffdist.faults") == {"ffdist.train"}
