"""`python -m ffdist.docs`: regenerate README's recipe reference from ffdist/recipe.py.

The schema's docstrings are the single source; this writes them between the README's
`<!-- recipe reference -->` markers so the two cannot drift apart (a test checks)."""

from __future__ import annotations

import sys
from pathlib import Path

from ffdist.recipe import field_docs

BEGIN = "<!-- recipe reference: generated from ffdist/recipe.py -->"
END = "<!-- end of recipe reference -->"


def table() -> str:
    lines = ["### Recipe reference", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in field_docs():
        typ = typ.replace(" | None", " or null")
        default = "null" if default is None else default
        lines.append(f"| `{key}` | {typ} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    readme = Path(argv[0] if argv else "README.md")
    text = readme.read_text()
    if BEGIN not in text:
        print(f"{readme}: marker {BEGIN!r} not found", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
