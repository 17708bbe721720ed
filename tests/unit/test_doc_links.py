"""Every relative link in README.md, docs/*.md and benchmarks/RESULTS*.md points at a file
that exists, and every `#anchor` at a heading of its target (GitHub's slugs), so a moved
section or page shows here instead of as a dead link for a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"),
                *(REPO / "benchmarks").glob("RESULTS*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github() -> None:
    assert slug("Try it on one machine: a private one-node Slurm") == (
        "try-it-on-one-machine-a-private-one-node-slurm")
    assert slug("`make gpu-check`") == "make-gpu-check"
    assert slug("Fine-tuning: `model.pretrained`, `model.freeze`") == (
        "fine-tuning-modelpretrained-modelfreeze")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_pages_are_found() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "recipe-reference.md", "deepspeed.md", "RESULTS.md"} <= names


def test_pages_named_by_code_and_recipes_exist() -> None:
    """Error messages, --help texts and recipe headers that send a user to `docs/X.md` (or
    README.md) name a page that exists."""
    sources = [*(REPO / "ffdist").rglob("*.py"), *(REPO / "recipes").glob("*.yaml"),
               *(REPO / "slurm").glob("*.sh"), REPO / "Makefile"]
    missing, named = set(), set()
    for source in sources:
        for page in re.findall(r"\b(docs/[\w.-]+\.md|benchmarks/RESULTS[\w-]*\.md)",
                               source.read_text()):
            named.add(page)
            if not (REPO / page).is_file() and not page.endswith("RESULTS-gpu.md"):
                missing.add(f"{source.relative_to(REPO)}: {page}")
    assert "docs/recipe-reference.md" in named, named  # the unknown-key message names it
    assert not missing, sorted(missing)
