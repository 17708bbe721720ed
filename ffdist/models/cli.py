"""`ffdist models [TEXT]`: the names `model.name` accepts, one a line: ffdist's own small
models (lenet, small_cnn, vit_tiny) and every torchvision classification model.
`ffdist models --blocks NAME`: the blocks ffdist finds in model NAME (FSDP's units, what
activation checkpointing wraps), with their parameter counts."""

from __future__ import annotations

import argparse
import sys


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
    from ffdist.models import available

    names = [n for n in available() if args.text.lower() in n.lower()]
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
