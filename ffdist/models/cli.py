"""`ffdist models [TEXT]`: the names `model.name` accepts, one a line: ffdist's own small
models (lenet, small_cnn) and every torchvision classification model."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist models", description=__doc__.split("\n\n")[0],
                                epilog="e.g. ffdist models resnet; then model.name=resnet18 "
                                       "in a recipe or as an override")
    p.add_argument("text", nargs="?", default="",
                   help="show only the names that contain this text (case-insensitive)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
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
