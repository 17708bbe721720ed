"""`ffdist predict RUN_DIR IMAGES... --out preds.csv`: classify image files with a run's
model; one CSV row per image, and a picture of captioned thumbnails next to the CSV.

Folders are searched for the formats ffdist reads (JPEG, PNG, WebP, GIF, BMP, TIFF: by
suffix); the other files there are counted and named in one line, never dropped silently.
A file whose header claims more than --max-image-pixels (default: the run's
data.max_image_pixels) is not decoded: it gets an error row, like a file that cannot be read.

Images get the run's eval preprocessing: folder datasets resize the short side to
data.eval_resize_size (default size/0.875) and center-crop data.eval_image_size (default
image_size) (ffdist.data.transforms.folder_eval); in-memory datasets
(digits, MNIST, CIFAR) were trained at their native size, so an image is resized to that
square. Channels follow the run (grey runs read images as grey), then the run's mean/std.

Uncertainty (the `uncertain` column): a prediction is uncertain when its top probability
is below --uncertain-threshold (default 0.5) OR the normalized entropy of the softmax,
H(p) / log(num_classes) in [0, 1], is above --entropy-threshold (default 0.6). With --tta
the probabilities are the mean over the image and its horizontal mirror (only for classes
that are mirror-invariant: not for digits or text).

The model runs at the precision the run resolves to on this device (ffdist.assemble, as
`ffdist eval` runs it); the image size is the one training resolved.

The picture (preds.png next to preds.csv): the first --grid images as the model saw them,
each captioned with the predicted class, its probability and the file name; uncertain
ones in an orange frame with a "?"; under the grid, every file that could not be read,
with the reason (the CSV's error column has them all).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ffdist import outputs
from ffdist.argv import run_options
from ffdist.data.decode_limits import KINDS, SUFFIXES, TooManyPixels
from ffdist.errors import DataError, guard

if TYPE_CHECKING:
    from PIL import Image

    from ffdist.precision import Numerics

SKIPPED_LISTED = 5  # names in the line about files that are not images; the count is whole


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist predict", parents=[run_options()],
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml, model.pt)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True,
                   help="CSV file to write; the picture goes next to it (preds.csv -> preds.png)")
    p.add_argument("--force", action="store_true",
                   help="replace files at --out (and its picture) that ffdist predict did not write")
    p.add_argument("--topk", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--uncertain-threshold", type=float, default=0.5,
                   help="uncertain when the top probability is below this (default 0.5)")
    p.add_argument("--entropy-threshold", type=float, default=0.6,
                   help="uncertain when normalized entropy is above this (default 0.6; 1 = off)")
    p.add_argument("--tta", action="store_true", help="average with the horizontal mirror")
    p.add_argument("--grid", type=int, default=36,
                   help="thumbnails in the picture next to the CSV (default 36; 0: no picture)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="files whose header claims more pixels (width x height) are not decoded "
                        "but reported (default: the run's data.max_image_pixels)")
    return p


def find_images(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """(images, skipped): files as given (whatever their suffix: a bad one becomes an error
    row) and the files under folders whose suffix is a format ffdist reads, sorted; and the
    other files under those folders, which are not tried."""
    found: list[Path] = []
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            found += [p for p in files if p.suffix.lower() in SUFFIXES]
            skipped += [p for p in files if p.suffix.lower() not in SUFFIXES]
        elif path.exists():
            found.append(path)
        else:
            raise DataError(f"{item}: no such file or folder; give image files or folders.")
    if not found:
        other = f" (only {len(skipped)} other file(s), e.g. {skipped[0].name})" if skipped else ""
        raise DataError(f"no {KINDS} images under {', '.join(inputs)}{other}; give image files "
                        "or folders that hold some.")
    return found, skipped


def skipped_line(skipped: list[Path], inputs: list[str]) -> str:
    """One line: how many files under the folders are not images ffdist reads, and the
    first few names (relative to the folder given)."""
    folders = [Path(i) for i in inputs if Path(i).is_dir()]

    def name(p: Path) -> str:
        root = next((f for f in folders if p.is_relative_to(f)), p.parent)
        return str(p.relative_to(root))
    names = ", ".join(name(p) for p in skipped[:SKIPPED_LISTED])
    more = f" and {len(skipped) - SKIPPED_LISTED} more" if len(skipped) > SKIPPED_LISTED else ""
    return f"skipped {len(skipped)} file(s) that are not {KINDS} images: {names}{more}"


def make_transform(folder_data: bool, size: int, resize: int | None = None,
                   interp: str = "bilinear"):
    from torchvision.transforms import v2

    from ffdist.data import transforms as T

    if folder_data:
        return T.folder_eval(size, resize, interp)
    return v2.Resize((size, size), interpolation=T.interpolation(interp), antialias=True)


@dataclass
class Row:
    path: str
    probs: torch.Tensor | None = None
    error: str = ""
    thumb: torch.Tensor | None = None


def load_batch(paths: list[Path], channels: int, transform, max_pixels: int
               ) -> tuple[list[Row], torch.Tensor | None]:
    from ffdist.data.datasets import decode, decode_error

    rows, tensors = [], []
    for path in paths:
        try:
            image = transform(decode(str(path), channels, max_pixels))
        except TooManyPixels as e:  # refused from its header: nothing was decoded
            rows.append(Row(str(path), error=f"not decoded ({e.describe('--max-image-pixels')})"))
            continue
        except Exception as e:  # corrupt, truncated or not an image: report it, go on
            rows.append(Row(str(path), error=f"unreadable image ({decode_error(e)})"))
            continue
        rows.append(Row(str(path), thumb=image))
        tensors.append(image)
    return rows, torch.stack(tensors) if tensors else None


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor,
                  std: torch.Tensor, tta: bool, numerics: Numerics) -> torch.Tensor:
    from ffdist.engine import forward

    x = (x.float() - mean) / std
    probs = forward(model, x, numerics).float().softmax(dim=1)
    if tta:
        probs = (probs + forward(model, x.flip(-1), numerics).float().softmax(dim=1)) / 2
    return probs.cpu()


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) / log(K): 0 for a one-hot prediction, 1 for a uniform one."""
    h = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
    return h / math.log(probs.shape[1])


def is_uncertain(probs: torch.Tensor, max_p: float, max_h: float) -> bool:
    return float(probs.max()) < max_p or float(normalized_entropy(probs[None])[0]) > max_h


def write_csv(path: Path, rows: list[Row], classes: list[str], k: int, max_p: float,
              max_h: float) -> int:
    """Returns the number of predicted rows."""
    header = ["path", "prediction", "probability", "uncertain", "entropy"]
    for i in range(1, k + 1):
        header += [f"top{i}", f"top{i}_prob"]
    header.append("error")
    done = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            if r.probs is None:
                w.writerow([r.path, "", "", "", ""] + [""] * (2 * k) + [r.error])
                continue
            p, idx = r.probs.topk(k)
            h = float(normalized_entropy(r.probs[None])[0])
            uncertain = is_uncertain(r.probs, max_p, max_h)
            tops = [v for i, q in zip(idx.tolist(), p.tolist()) for v in (classes[i], f"{q:.4f}")]
            w.writerow([r.path, classes[int(idx[0])], f"{float(p[0]):.4f}", int(uncertain),
                        f"{h:.4f}", *tops, ""])
            done += 1
    return done


def save_picture(path: Path, rows: list[Row], classes: list[str], max_p: float, max_h: float,
                 limit: int, source: str = "") -> Image.Image | None:
    """Thumbnails of the first `limit` predictions, each captioned with its class,
    probability and file name (uncertain ones framed and marked "?"), and below them the
    files that could not be read, with the reason: the picture never drops one silently."""
    import os

    from ffdist.visual import titled_grid

    predicted = [r for r in rows if r.probs is not None]
    shown = [r for r in predicted if r.thumb is not None][:limit]
    bad = [r for r in rows if r.probs is None]
    if not shown:
        return None
    root = os.path.commonpath([str(Path(r.path).parent) for r in shown + bad])
    names = {r.path: os.path.relpath(r.path, root) for r in shown + bad}
    captions, flags = [], []
    for r in shown:
        p, i = r.probs.max(0)
        flags.append(is_uncertain(r.probs, max_p, max_h))
        captions.append(f"{classes[int(i)]}  {float(p):.2f}" + ("  ?" if flags[-1] else "")
                        + "\n" + names[r.path])
    uncertain = sum(is_uncertain(r.probs, max_p, max_h) for r in predicted)
    title = [f"ffdist predict {source}".rstrip(),
             f"{len(predicted)} predicted, {uncertain} uncertain, {len(bad)} unreadable"
             + (f"; the first {len(shown)} shown, all in {path.with_suffix('.csv').name}"
                if len(shown) < len(predicted) else ""),
             f"caption: predicted class, its probability, file (under {root or '.'}); "
             f"orange frame and ?: uncertain (p < {max_p:g} or entropy > {max_h:g})"]
    footer = []
    if bad:
        footer = [f"{len(bad)} unreadable, not predicted:"]
        footer += [f"{names[r.path]}: {r.error}" for r in bad[:UNREADABLE_LISTED]]
        if len(bad) > UNREADABLE_LISTED:
            footer.append(f"... and {len(bad) - UNREADABLE_LISTED} more: see the CSV's error column")
    picture = titled_grid([r.thumb for r in shown], captions, flags, title, footer)
    picture.save(path)
    return picture


UNREADABLE_LISTED = 20  # names under the picture; the CSV lists every one


def run(args: argparse.Namespace) -> int:
    from ffdist.assemble import resolve
    from ffdist.dist import launcher_precision
    from ffdist.loading import load_run
    from ffdist.precision import Autocast

    if args.topk < 1 or args.batch_size < 1:
        raise DataError("--topk and --batch-size must be at least 1.")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise DataError(f"--max-image-pixels {args.max_image_pixels}: give a positive pixel "
                        "count (width x height), or leave it out for the run's "
                        "data.max_image_pixels.")
    loaded = load_run(args.run_dir, args.overrides, args.checkpoint, args.weights)
    # The device is decided once: CUDA when there is one (or asked for), else the CPU.
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda but no CUDA GPU is visible; use --device cpu or auto.")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    resolved = resolve(loaded.recipe, 1, device, launcher_precision(), trains=False,
                       streams=False)
    numerics = Autocast(resolved.precision, device)  # as ffdist eval runs the model
    model = loaded.model.to(device)
    mean = torch.tensor(loaded.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, -1, 1, 1)
    transform = make_transform(loaded.folder_data, resolved.eval_image_size, loaded.eval_resize,
                               loaded.interpolation)
    paths, skipped = find_images(args.images)
    out, picture = _output_paths(args, loaded, paths)
    max_pixels = args.max_image_pixels or loaded.recipe.data.max_image_pixels
    if skipped:
        print(skipped_line(skipped, args.images), flush=True)
    k = min(args.topk, len(loaded.classes))
    rows: list[Row] = []
    thumbs = 0
    for start in range(0, len(paths), args.batch_size):
        batch_rows, x = load_batch(paths[start:start + args.batch_size], loaded.channels,
                                   transform, max_pixels)
        if x is not None:
            probs = probabilities(model, x.to(device), mean, std, args.tta, numerics)
            for r, p in zip([r for r in batch_rows if r.thumb is not None], probs):
                r.probs = p
                thumbs += 1
                if thumbs > args.grid:  # keep only the thumbnails the picture shows
                    r.thumb = None
        rows += batch_rows
    written = [out]
    with outputs.replacing(out) as tmp:  # the picture first: a failure replaces neither file
        done = write_csv(tmp, rows, loaded.classes, k, args.uncertain_threshold,
                         args.entropy_threshold)
        if picture is not None:
            with outputs.replacing(picture, mark="ffdist predict") as png:
                save_picture(png, rows, loaded.classes, args.uncertain_threshold,
                             args.entropy_threshold, args.grid, source=str(args.run_dir))
            written += [picture] if picture.exists() else []
    errors = len(rows) - done
    uncertain = sum(1 for r in rows if r.probs is not None and is_uncertain(
        r.probs, args.uncertain_threshold, args.entropy_threshold))
    print(f"{done} image(s) predicted on {device.type} ({uncertain} uncertain), {errors} "
          f"unreadable -> {', '.join(map(str, written))}")
    if not done:
        print("ffdist: error: no image could be read", file=sys.stderr)
        return 1
    return 0


def _output_paths(args: argparse.Namespace, loaded, images: list[Path]) -> tuple[Path, Path | None]:
    """The CSV and the picture beside it, checked by ffdist.outputs before any work."""
    out = Path(args.out)
    if out.suffix.lower() in SUFFIXES:
        raise outputs.OutputError(f"--out {out}: --out names the CSV file, and the picture is "
                                  f"written next to it; use e.g. --out {out.with_suffix('.csv')}.")
    picture = outputs.picture_path(out) if args.grid else None
    planned = [outputs.Output(out, "predict.csv")]
    planned += [outputs.Output(picture, "predict.png")] if picture is not None else []
    reads = [loaded.weights, Path(args.run_dir) / "recipe.yaml", *images]
    outputs.check(planned, reads, args.force, "ffdist predict", need=csv_bytes(images, args.topk))
    return out, picture


def csv_bytes(images: list[Path], topk: int) -> int:
    """About the CSV's size: each row its path, the numbers, top-k names and probabilities."""
    return sum(len(os.fsencode(str(p))) + 48 + 24 * topk for p in images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(guard(main))  # the one error printer, as under `ffdist predict`
