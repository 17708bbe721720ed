"""`ffdist samples [--out samples] [--count 12]`: write a few digit images to try
`ffdist predict` on, e.g. `ffdist predict runs/digits samples --out preds.csv`.

The images are scikit-learn digits from ffdist's val split (the 20% that
recipes/digits.yaml evaluates on and never trains on), as 8x8 grey PNG files, the model's
own size, named digit_<index>_true<label>.png (<index>: the image's place among sklearn's
1,797, <label>: the digit it shows), one of each digit in turn. --unreadable adds
not_an_image.png, a text file, to see how predict reports files it cannot read.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from ffdist import outputs
from ffdist.errors import DataError, guard

PLACE = outputs.Place("--out")

NOT_AN_IMAGE = b"This is a text file with a .png name: ffdist predict lists it as unreadable.\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist samples", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--out", default="samples", help="folder to write into (default: samples)")
    p.add_argument("--count", type=int, default=12, help="how many digits (default 12, at most 360)")
    p.add_argument("--unreadable", action="store_true",
                   help="also write not_an_image.png, a file predict cannot read")
    return p


def pick(labels: list[int], val: list[int], count: int) -> list[int]:
    """`count` val indices, cycling through the digits 0, 1, ..., 9, 0, ... in val order."""
    queues = {d: [i for i in val if labels[i] == d] for d in sorted(set(labels))}
    picked: list[int] = []
    while len(picked) < count:
        for queue in queues.values():
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def files(count: int, unreadable: bool) -> dict[str, bytes]:
    """File name -> PNG bytes."""
    from PIL import Image

    from ffdist.data import digits
    from ffdist.recipe import DataConfig

    images, labels = digits.load()
    _, val = digits.split(labels, DataConfig().val_fraction)
    out: dict[str, bytes] = {}
    for i in pick(labels.tolist(), val, count):
        buf = io.BytesIO()
        Image.fromarray(images[i], "L").save(buf, format="PNG")
        out[f"digit_{i:04d}_true{labels[i]}.png"] = buf.getvalue()
    if unreadable:
        out["not_an_image.png"] = NOT_AN_IMAGE
    return out


def write(folder: Path, content: dict[str, bytes]) -> tuple[int, int]:
    """(written, already there). A file of the same name with other bytes is the user's:
    refuse before writing anything. The folder is checked first (ffdist.outputs.check_folder:
    a file in the way, a name too long, a full or read-only disk; the space of all the
    samples, a few KB, whether or not some are there already)."""
    outputs.check_folder(folder, "ffdist samples", PLACE, sum(map(len, content.values())),
                         list(content))
    clash = [n for n, b in content.items() if (folder / n).exists() and (folder / n).read_bytes() != b]
    if clash:
        raise DataError(f"{folder / clash[0]} exists and differs from the sample of that name; "
                        "move it away or write elsewhere with --out.")
    new = [n for n in content if not (folder / n).exists()]
    for name in new:  # each whole or not at all: a torn file would be "a file that differs"
        with outputs.replacing(folder / name, place=PLACE) as tmp:
            tmp.write_bytes(content[name])
    return len(new), len(content) - len(new)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.count <= 360:
        raise DataError(f"--count {args.count}: give 1 to 360 (the size of the val split).")
    folder = Path(args.out)
    written, kept = write(folder, files(args.count, args.unreadable))
    print(f"{folder}: {written} sample image(s) written" + (f", {kept} already there" if kept else "")
          + f"; try: ffdist predict runs/digits {folder} --out preds.csv")
    return 0


if __name__ == "__main__":
    sys.exit(guard(main))  # the one error printer, as under `ffdist samples`
