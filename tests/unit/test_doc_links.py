"""Every relative link in README.md, docs/*.md and benchmarks/RESULTS*.md points at a file
of the repository that exists, and every `#anchor` at a heading of its target (GitHub's
slugs), so a moved section or page shows here instead of as a dead link for a reader. No
page, recipe, module or test links or names a path outside the repository (a reader of a
clone has only the clone): no `../` that climbs out of it, no `shared/` folder (the
repository has none), no Markdown page that exists nowhere in it."""

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
        if path.startswith("/") or not dest.is_relative_to(REPO.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
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
            if not (REPO / page).is_file():
                missing.add(f"{source.relative_to(REPO)}: {page}")
    assert "docs/recipe-reference.md" in named, named  # the unknown-key message names it
    assert not missing, sorted(missing)


# -- paths outside the repository ---------------------------------------------------------

# Every page, benchmark, recipe, module and test (this file holds the patterns themselves).
SOURCES = sorted(p for p in [*PAGES, *(REPO / "benchmarks").iterdir(),
                             *(REPO / "recipes").glob("*.yaml"), *(REPO / "ffdist").rglob("*.py"),
                             *(REPO / "tests").rglob("*.py")]
                 if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".sh")
                 and p.resolve() != Path(__file__).resolve())
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w./-]*")
SHARED = re.compile(r"(?<![\w.-])shared/[\w./-]*")  # a folder `shared/`, however reached
MD_NAME = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
OUTPUTS = ("runs/",)  # folders commands write (gitignored): their files exist after a run


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(REPO.resolve())


def outside_mentions(text: str, source: Path) -> list[str]:
    """The paths outside the repository that `text` (the contents of `source`) names."""
    found = [m.group(0) for m in CLIMB.finditer(text) if not inside(source.parent / m.group(0))]
    found += SHARED.findall(text)
    if source.suffix == ".md":  # pages: every .md they name is one of the repository's
        names = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
        for m in MD_NAME.finditer(text):
            name = m.group(1)
            if "/" in name:
                known = name.startswith(OUTPUTS) or any(
                    inside(p) and p.is_file() for p in (REPO / name, source.parent / name))
            else:
                known = name in names
            if not known:
                found.append(name)
    return list(dict.fromkeys(found))  # each once, in order


def test_the_outside_check_finds_what_it_must() -> None:
    page = REPO / "docs" / "page.md"
    assert outside_mentions("see ../../shared/GPU.md and ENVIRONMENT.md", page) == [
        "../../shared/GPU.md", "shared/GPU.md", "ENVIRONMENT.md"]
    assert outside_mentions("(`/work/shared/GPU.md`)", REPO / "ffdist" / "x.py") == [
        "shared/GPU.md"]
    assert outside_mentions("[perf](../docs/performance.md), README.md, runs/x/r.md, "
                            "../benchmarks/RESULTS.md, tests/shared_fs", page) == []


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_names_a_path_outside_the_repository(source: Path) -> None:
    found = outside_mentions(source.read_text(), source)
    assert not found, f"{source.relative_to(REPO)} names paths outside the repository: {found}"
