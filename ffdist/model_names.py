"""`ffdist models [TEXT]`: the names `model.name` accepts, one a line, in natural order
(resnet18, resnet34, resnet50, resnet101): ffdist's own small models and every torchvision
classification model; `timm/<name>` for timm's (with the extra installed).
`ffdist models --blocks NAME`: the blocks ffdist finds in model NAME (FSDP's units, what
activation checkpointing wraps), with their parameter counts (this one builds the model).

Listing them imports neither torch nor torchvision (~5 s together): torchvision's
classification builders are the functions decorated `@register_model(...)` in the modules
directly under torchvision/models/ (what `torchvision.models.list_models(module=
torchvision.models)` returns), so the names are read from those files' text (a few ms). A
test compares the two lists; should the files ever stop matching the pattern, the list
comes from torchvision itself. Building a model (ffdist.models) always asks torchvision.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

OWN = ("lenet", "small_cnn", "vit_tiny")
"""ffdist's own models (ffdist.models.OWN; a test keeps the two the same)."""
_BUILDER = re.compile(r"^@register_model\(([^)]*)\)", re.M)
_DEF = re.compile(r"^def (\w+)", re.M)
_NAMED = re.compile(r"""name\s*=\s*["'](\w+)["']""")


def natural(name: str) -> list[str | int]:
    """Sort key: digits compare as numbers (resnet18 < resnet101)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def torchvision_names() -> set[str]:
    """torchvision's classification models, read from its source files (empty when they
    cannot be found or read)."""
    spec = importlib.util.find_spec("torchvision")  # finds the package, imports nothing
    if spec is None or not spec.submodule_search_locations:
        return set()
    names = set()
    for path in Path(list(spec.submodule_search_locations)[0], "models").glob("*.py"):
        try:
            text = path.read_text()
        except OSError:
            return set()
        for found in _BUILDER.finditer(text):
            given, builder = _NAMED.search(found[1]), _DEF.search(text, found.end())
            if given or builder:
                names.add(given[1] if given else builder[1])
    return names


def listed() -> list[str]:
    """Every name model.name accepts (timm's aside), in natural order."""
    names = torchvision_names()
    if not names:  # the source files are not where they were: ask torchvision
        from ffdist.models import available

        return sorted(available(), key=natural)
    return sorted(set(OWN) | names, key=natural)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist models", description=__doc__.split("\n\n")[0],
                                epilog="e.g. ffdist models resnet; then model.name=resnet18 "
                                       "in a recipe or as an override")
    p.add_argument("text", nargs="?", default="",
                   help="show only the names that contain this text (case-insensitive)")
    p.add_argument("--blocks", metavar="NAME", default=None,
                   help="list the blocks of model NAME (model.blocks; FSDP's units and "
                        "activation checkpointing's regions)")
    return p


def show_blocks(name: str) -> int:
    from ffdist import models
    from ffdist.recipe import ModelConfig

    model = models.build(ModelConfig(name=name))
    found = models.blocks(model)
    if not found:
        print(f"{name}: no blocks ffdist knows; name them with model.blocks=[...] (module names "
              f"of the model; its top-level modules: "
              f"{', '.join(n for n, _ in model.named_children())}).")
        return 0
    for block in found:
        count = sum(p.numel() for p in model.get_submodule(block).parameters())
        print(f"{block:<40} {count:>14,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.blocks:
        return show_blocks(args.blocks)
    names = [n for n in listed() if args.text.lower() in n.lower()]
    if not names:
        print(f"ffdist: no model name contains {args.text!r}; `ffdist models` lists them all.",
              file=sys.stderr)
        return 1
    print("\n".join(names))
    if not args.text:
        print("timm/<name>: any of timm.list_models() (pip install 'ffdist[timm]')")
    return 0


if __name__ == "__main__":
    from ffdist.errors import guard

    sys.exit(guard(main))  # the one error printer, as under `ffdist models`
