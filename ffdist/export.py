"""`ffdist export RUN_DIR --format torchscript|onnx [--out PATH]`: the run's model for
serving, with a JSON sidecar saying how to feed it, verified by running it.

Verification: the exported file is loaded (torch.jit.load / an onnxruntime CPU session)
and run on seeded random batches in the model's normalized input space; its logits are
compared with the PyTorch model's. The check fails (exit 1) when
    max |exported - pytorch| > tolerance * max(1, max |pytorch logits|)
(--tolerance, default 1e-4: fp32 kernels of different runtimes differ by ~1e-6 relative;
a wrong export differs by O(1)). ONNX is checked at two batch sizes, which proves the
dynamic batch axis.

Disk space: the folder of --out is checked before anything is exported (ffdist.outputs:
it takes files, and has room for about the weights' size plus a tenth: both formats store
the fp32 weights once, with a graph that is small beside them). A disk that fills up
anyway (another process, a wrong estimate) is one sentence, not an abort: the TorchScript
file is serialized into a Python file object (torch.jit.save(module, f)), where an ENOSPC is
an OSError; written by torch's C++ writer to a path, it is a c10::Error thrown where
nothing catches it, and the process aborts (SIGABRT, exit 134) with its temp file left
behind. Serializing in a child process would contain the abort too, but costs a second
start of torch for every export and still needs the parent to clean up; the file object
costs nothing. The ONNX exporter writes its bytes from Python already. Either way the temp
file is removed and the previous --out is kept.

ONNX uses the TorchScript-based exporter (dynamo=False), which torch 2.14 still ships
(with a DeprecationWarning): on this project's small CNN it took 1.0 s against 13.3 s for
the torch.export-based default (both verified), it works offline and needs only `onnx`,
and `dynamic_axes` gives the dynamic batch. Switch when the legacy exporter is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ffdist import outputs
from ffdist.argv import refuse_positional, run_options
from ffdist.errors import FfdistError, RecipeError, guard

OPSET = 17
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


class ExportMismatch(Exception):
    """The exported model does not compute what the PyTorch model computes."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist export", parents=[run_options()],
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml, model.pt)")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)  # refused: refuse_positional
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    p.add_argument("--out", default=None,
                   help="output file (default RUN_DIR/export/model.onnx or model.torchscript.pt)")
    p.add_argument("--force", action="store_true",
                   help="replace files at --out (and its .json sidecar) that ffdist export did "
                        "not write")
    p.add_argument("--batch-size", type=int, default=8, help="verification batch (default 8)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="relative to max(1, max |logit|) (default 1e-4)")
    return p


def sidecar(loaded, fmt: str, path: Path) -> dict:
    from ffdist.data.transforms import eval_resize

    mean, std = list(loaded.mean), list(loaded.std)
    return {
        "format": fmt, "file": path.name, "model": loaded.recipe.model.name,
        "classes": loaded.classes, "num_classes": len(loaded.classes),
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32",
                  "shape": ["batch", loaded.channels, loaded.image_size, loaded.image_size],
                  "channels": loaded.channels, "image_size": loaded.image_size},
        "output": {"name": "logits", "shape": ["batch", len(loaded.classes)]},
        "normalization": {"mean_255": mean, "std_255": std,
                          "mean": [m / 255 for m in mean], "std": [s / 255 for s in std],
                          "formula": "x = (pixels_0_255 - mean_255) / std_255 "
                                     "= (pixels_0_1 - mean) / std"},
        "preprocessing": (f"resize the short side to "
                          f"{eval_resize(loaded.image_size, loaded.eval_resize)} "
                          f"({loaded.interpolation}), center crop {loaded.image_size}"
                          if loaded.folder_data else "resize to image_size x image_size"),
        "weights": str(loaded.weights),
    }


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; verified below
        traced = torch.jit.trace(model, example, check_trace=False)
        with open(path, "wb") as f:  # a Python file: a full disk is an OSError, not an abort
            torch.jit.save(traced, f)
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()
    return run


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise FfdistError("--format onnx needs onnx and onnxruntime: pip install "
                          "'ffdist[onnx]' (or onnx onnxruntime).") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input": x})[0]
    return run


def verify(model: nn.Module, run: Callable[[np.ndarray], np.ndarray],
           batches: list[torch.Tensor], tolerance: float) -> float:
    """Max abs logit difference over `batches`; ExportMismatch above the tolerance."""
    worst = 0.0
    for x in batches:
        with torch.no_grad():
            ref = model(x).numpy()
        got = run(x.numpy())
        if got.shape != ref.shape:
            raise ExportMismatch(f"exported model returned shape {got.shape} for a batch of "
                                 f"{len(x)}, expected {ref.shape}")
        diff = float(np.abs(got - ref).max())
        limit = tolerance * max(1.0, float(np.abs(ref).max()))
        worst = max(worst, diff)
        if diff > limit:
            raise ExportMismatch(f"max abs difference {diff:.3g} on a batch of {len(x)} is above "
                                 f"the tolerance {limit:.3g}")
    return worst


def export_bytes(model: nn.Module) -> int:
    """About the size of an export: the fp32 weights and buffers, plus a tenth for the graph."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors) * 1.1) + 64 * 1024


def run(args: argparse.Namespace) -> dict:
    from ffdist.loading import load_run

    if args.batch_size < 2:
        raise RecipeError("--batch-size must be at least 2 (ONNX is checked at two sizes).")
    loaded = load_run(args.run_dir, args.overrides, args.checkpoint, args.weights)
    model = loaded.model.float().to(memory_format=torch.contiguous_format).eval()
    out = Path(args.out) if args.out else \
        Path(args.run_dir) / "export" / f"model{SUFFIX[args.format]}"
    meta_path = out.with_name(out.name + ".json")
    outputs.check([outputs.Output(out, "export.model"), outputs.Output(meta_path, "export.sidecar")],
                  [loaded.weights, Path(args.run_dir) / "recipe.yaml"], args.force, "ffdist export",
                  need=export_bytes(model))
    g = torch.Generator().manual_seed(0)
    shape = (loaded.channels, loaded.image_size, loaded.image_size)
    batches = [torch.randn(n, *shape, generator=g) for n in (args.batch_size, args.batch_size // 2 + 1)]
    exporter = export_onnx if args.format == "onnx" else export_torchscript
    with outputs.replacing(out) as tmp:  # a file that fails verification replaces nothing
        runner = exporter(model, batches[0], tmp)
        diff = verify(model, runner, batches, args.tolerance)
    meta = {**sidecar(loaded, args.format, out), "verified": {
        "max_abs_diff": diff, "tolerance": args.tolerance, "batch_sizes": [len(b) for b in batches]}}
    outputs.write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"{args.format}: {out} ({out.stat().st_size / 1e6:.2f} MB), sidecar {meta_path}")
    print(f"verified against PyTorch on batches of {[len(b) for b in batches]}: "
          f"max abs difference {diff:.3g} (tolerance {args.tolerance:g} x max(1, |logit|))")
    return meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    refuse_positional("ffdist export", args.extra)
    try:
        run(args)
    except ExportMismatch as e:
        print(f"ffdist: export failed verification: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(guard(main))  # the one error printer, as under `ffdist export`
