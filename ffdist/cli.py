"""`ffdist <command> ...`: a thin dispatcher; each command lives in its own module.

Every command's `main(argv) -> int` may raise FfdistError: printed by ffdist.errors.guard
as one sentence on stderr, exit code the error's own (2 for bad input), no traceback (bugs
keep theirs). `python -m ffdist.X` prints through the same guard.
"""

from __future__ import annotations

import importlib
import sys

from ffdist.errors import EXIT_USER_ERROR, guard

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ffdist.train", "train a recipe: ffdist train RECIPE [key=value ...]"),
    "models": ("ffdist.model_names", "list the model names a recipe can use"),
    "eval": ("ffdist.evaluate", "evaluate a run: ffdist eval RUN_DIR [--checkpoint PATH] [--set K=V]"),
    "predict": ("ffdist.predict", "classify images: ffdist predict RUN_DIR IMAGES... --out preds.csv"),
    "export": ("ffdist.export", "export a run: ffdist export RUN_DIR --format torchscript|onnx"),
    "runs": ("ffdist.runs", "list and compare runs: ffdist runs [FOLDER] [--json]"),
    "plan": ("ffdist.plan", "memory/batch plan: ffdist plan RECIPE [key=value ...] [--gpu-mem 24GiB]"),
    "launch": ("ffdist.launch", "run a recipe under torchrun/accelerate/deepspeed/sbatch"),
    "bench": ("ffdist.bench", "throughput of a recipe: ffdist bench RECIPE [k=v ...] [--synthetic]"),
    "samples": ("ffdist.samples", "write digit PNGs to try predict on: ffdist samples [--out samples]"),
    "shard": ("ffdist.shard", "write tar shards: ffdist shard SOURCE --out FOLDER [--max-size PX]"),
}


def usage() -> str:
    lines = ["usage: ffdist <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "ffdist <command> --help: that command's arguments and options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    owns_process = argv is None  # `ffdist ...`: the process ends with the command
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ffdist: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    if owns_process:  # what that means after a finished run: ffdist.signals
        from ffdist import signals

        signals.owns_process()
    module = importlib.import_module(COMMANDS[name][0])
    return guard(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
