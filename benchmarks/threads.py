"""launch.threads on the CPU: 1 and 2 intra-op threads against `auto`, each on a quiet
machine and beside a busy process, for three recipes; ratios against threads=1 measured in
the same run, with the machine named.

Cases (each `python -m ffdist.train` in its own process, OMP_NUM_THREADS unset so that
`auto` decides):
- digits: recipes/digits.yaml as `make train` runs it (whole process, 20 epochs);
- cifar-resnet18: recipes/cifar10_resnet18.yaml on synthetic 32 px images (CIFAR-10 is not
  downloaded), a few optimizer steps of its batch (512, micro-batch 256);
- resnet50: recipes/resnet50.yaml on synthetic 64 px images, batch 16, a few steps.
Conditions: quiet (nothing of ours beside it) and busy (a Python spin loop this script
starts before the run and stops after it: one other process that wants a core).

Figures: the whole process's wall time, and the median optimizer step (metrics.jsonl's
step_ms with log.every_steps=1, the first step left out) for the cases of a few steps.
Settings alternate within each repetition (1, 2, auto; then rotated), medians of --reps.
`speedup` = the threads=1 figure / this setting's (above 1: faster than one thread).

    python -m benchmarks.threads [--reps 3] [--quick] [--cases digits,cifar-resnet18,resnet50]

--quick: digits for 2 epochs instead of 20, 3 steps instead of 6, one repetition: a check
that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, REPO, cpu, env, load

SETTINGS = ("1", "2", "auto")
QUIET = ("log.progress=false", "log.tensorboard=false", "log.images=false")


def cases(quick: bool) -> dict[str, list[str]]:
    steps = 3 if quick else 6
    few = [f"schedule.max_steps={steps}", "log.every_steps=1", "checkpoint.every_epochs=1000"]
    return {
        "digits": ["recipes/digits.yaml", *(["schedule.epochs=2"] if quick else [])],
        "cifar-resnet18": ["recipes/cifar10_resnet18.yaml", "data.name=synthetic",
                           f"data.synthetic_size={512 * steps * 5 // 4 + 64}",
                           "data.eval_batch_size=512", *few],
        "resnet50": ["recipes/resnet50.yaml", "data.name=synthetic", "data.image_size=64",
                     "data.batch_size=16", "data.micro_batch_size=null",
                     "data.eval_batch_size=64", f"data.synthetic_size={16 * steps * 5 // 4 + 32}",
                     "data.num_workers=0", *few],
    }


def machine() -> str:
    import torch

    from ffdist import threads

    cores = threads.usable_cores()
    return (f"{cpu()} ({cores.why} for this process), torch "
            f"{torch.__version__}, Python {platform.python_version()}")


class Busy:
    """One process that keeps a core busy (a Python spin loop), for the `with` block."""

    def __enter__(self) -> Busy:
        self.proc = subprocess.Popen([PY, "-c", "while True:\n    pass"])
        time.sleep(0.5)  # let it reach the scheduler before the run starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def one_run(args: list[str], setting: str) -> dict:
    """Wall seconds, median step ms, the threads the start line names."""
    e = env()
    e.pop("OMP_NUM_THREADS", None)  # auto decides; a number is the recipe's
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc = subprocess.run([PY, "-m", "ffdist.train", *args, *QUIET,
                               f"launch.threads={setting}", f"output_dir={tmp}/run"],
                              cwd=REPO, env=e, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(f"{' '.join(args)} launch.threads={setting} exited "
                             f"{proc.returncode}:\n{proc.stderr[-2000:]}")
        records = [json.loads(x) for x in Path(tmp, "run", "metrics.jsonl").read_text()
                   .splitlines()]
    steps = [r["step_ms"] for r in records if r.get("split") == "train" and r["step"] > 1]
    chosen = re.search(r"(\d+) threads? \(([^)]*)\)", proc.stdout)
    return {"wall": wall, "step_ms": statistics.median(steps) if steps else None,
            "threads": chosen.group(1) if chosen else "?",
            "why": chosen.group(2) if chosen else ""}


def measure(name: str, args: list[str], busy: bool, reps: int) -> None:
    got: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for rep in range(reps):
        order = SETTINGS[rep % 3:] + SETTINGS[:rep % 3]  # neither setting always first
        for setting in order:
            if busy:
                with Busy():
                    got[setting].append(one_run(args, setting))
            else:
                got[setting].append(one_run(args, setting))
    condition = "busy" if busy else "quiet"

    def med(s: str, key: str) -> float | None:
        values = [r[key] for r in got[s] if r[key] is not None]
        return statistics.median(values) if values else None

    base_wall, base_step = med("1", "wall"), med("1", "step_ms")
    for s in SETTINGS:
        wall, step = med(s, "wall"), med(s, "step_ms")
        line = (f"[threads] {name:<15} {condition:<5} launch.threads={s:<4} -> "
                f"{got[s][0]['threads']} thread(s) | process {wall:6.1f} s (x{base_wall / wall:.2f})")
        if step is not None and base_step is not None:
            line += f" | step {step:8.1f} ms (x{base_step / step:.2f})"
        print(f"{line} | {load()}", flush=True)
        if s == "auto":
            print(f"    auto chose: {got[s][0]['why']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each setting (3)")
    parser.add_argument("--quick", action="store_true",
                        help="short runs, one repetition: checks the script, measures nothing")
    parser.add_argument("--cases", default="digits,cifar-resnet18,resnet50",
                        help="comma-separated: digits, cifar-resnet18, resnet50")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    table = cases(args.quick)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; use {', '.join(table)}")
    print(f"machine: {machine()}", flush=True)
    print("x = the threads=1 figure / this one (above 1: faster than one thread)", flush=True)
    for name in names:
        for busy in (False, True):
            measure(name, table[name], busy, reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
