"""`python -m ffdist.docs [PATH]`: regenerate the recipe reference from ffdist/recipe.py.

The schema's docstrings are the single source (`field_docs` reads them); this writes them
as a table between the `<!-- recipe reference -->` markers of docs/recipe-reference.md
(or PATH), so the two cannot drift apart (tests/unit/test_recipe.py checks the file holds
exactly `table()`)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from ffdist.recipe import Recipe

TARGET = Path("docs") / "recipe-reference.md"
BEGIN = "<!-- recipe reference: generated from ffdist/recipe.py -->"
END = "<!-- end of recipe reference -->"


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every recipe key: docs/recipe-reference.md."""
    rows: list[tuple[str, str, Any, str]] = []

    def docs_of(cls: type) -> dict[str, str]:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        out: dict[str, str] = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(
                    b.value, ast.Constant):
                out[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[attr-defined]
        return out

    def walk(cls: type, prefix: str) -> None:
        docs = docs_of(cls)
        inst = cls()
        for f in dataclasses.fields(cls):
            value = getattr(inst, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, str(f.type), value, docs.get(f.name, "")))

    walk(Recipe, "")
    return rows


def table() -> str:
    """The Markdown table of every recipe key: key, type, default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in field_docs():
        # `str` beside a number or a flag is the word auto (ffdist.recipe.AUTO)
        typ = typ.replace(" | None", " or null").replace(" | str", " or auto")
        default = "null" if default is None else default
        lines.append(f"| `{key}` | {typ} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def generated_part(text: str) -> str | None:
    """What stands between the markers of `text` (None when a marker is missing)."""
    if BEGIN not in text or END not in text.split(BEGIN, 1)[1]:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    target = Path(argv[0]) if argv else TARGET
    if not target.is_file():
        print(f"ffdist: error: {target}: no such file; run `python -m ffdist.docs` from the "
              "ffdist checkout, or give the Markdown file that holds the markers.",
              file=sys.stderr)
        return 2
    text = target.read_text()
    if generated_part(text) is None:
        print(f"ffdist: error: {target}: the markers {BEGIN!r} and {END!r} are missing; "
              "add both where the table belongs.", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    target.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(f"{target}: recipe reference written ({len(field_docs())} keys)")
    return 0


if __name__ == "__main__":
    from ffdist.errors import guard

    sys.exit(guard(main, sys.argv[1:]))  # the one error printer
