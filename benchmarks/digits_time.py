"""c. Time to 98% val top-1 on digits: the whole `python -m ffdist.train recipes/digits.yaml`
process vs benchmarks/tutorial_digits.py (plain loop, fp32, 2 conv + 2 fc, batch 32).

Both clocks start when this benchmark spawns the process (interpreter start and imports
included) and stop at the first evaluation with top-1 >= 0.98: for ffdist the `time` of
that val event in metrics.jsonl, for the tutorial the time it prints. The two run from
this one process, alternating (A B, B A, ...), one at a time; each repetition prints its
figures with the load average, and the summary gives the medians and their ratio. ffdist
then runs its recipe to the end (the tutorial stops at 98%); that whole-process time is
reported too.

    python -m benchmarks.digits_time [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, REPO, env, load, result


def ffdist_run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        subprocess.run([PY, "-m", "ffdist.train", "recipes/digits.yaml", f"output_dir={tmp}"],
                       cwd=REPO, env=env(), check=True, capture_output=True)
        whole = time.time() - start
        events = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    val = [e for e in events if e.get("split") == "val"]
    hit = next((e for e in val if e["top1"] >= 0.98), None)
    return {"to98": hit["time"] - start if hit else float("inf"),
            "epoch": hit["epoch"] if hit else None, "whole": whole, "final": val[-1]["top1"]}


def tutorial_run() -> dict:
    start = time.time()
    out = subprocess.run([PY, "benchmarks/tutorial_digits.py"], cwd=REPO, env=env(),
                         check=True, capture_output=True, text=True).stdout
    whole = time.time() - start
    reached = [line.split() for line in out.splitlines() if line.startswith("reached")]
    if not reached:
        return {"to98": float("inf"), "epoch": None, "whole": whole}
    return {"to98": float(reached[0][3]) - start, "epoch": int(reached[0][5]), "whole": whole}


def _show(side: str, r: dict) -> None:
    print(f"  {side:<8} 98% after {r['to98']:5.1f} s (epoch {r['epoch']}), process "
          f"{r['whole']:5.1f} s   {load()}", flush=True)


def bench_c(reps: int = 5) -> dict:
    ours: list[dict] = []
    theirs: list[dict] = []
    for i in range(reps):
        sides = [("ffdist", ffdist_run, ours), ("tutorial", tutorial_run, theirs)]
        for name, fn, into in sides if i % 2 == 0 else sides[::-1]:  # neither always first
            into.append(fn())
            _show(name, into[-1])
    a = statistics.median(r["to98"] for r in ours)
    b = statistics.median(r["to98"] for r in theirs)
    whole = statistics.median(r["whole"] for r in ours)
    return result("c. time to 98% on digits", "ffdist train", a, "tutorial fp32 script", b, "s",
                  "ffdist no slower (tutorial/ffdist >= 1)", a <= b, ratio=b / a,
                  note=f"ratio = tutorial time / ffdist time, medians of {reps} alternating runs: "
                       f"ffdist {[round(r['to98'], 1) for r in ours]} s (epochs "
                       f"{[r['epoch'] for r in ours]}), tutorial "
                       f"{[round(r['to98'], 1) for r in theirs]} s (epochs "
                       f"{[r['epoch'] for r in theirs]}); ffdist's whole run {whole:.1f} s, final "
                       f"top-1 {[round(r['final'], 4) for r in ours]}; {os.cpu_count()} cores")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each side (5)")
    bench_c(parser.parse_args().reps)
