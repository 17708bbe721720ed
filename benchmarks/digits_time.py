"""c. Time to 98% val top-1 on digits: the whole `python -m ffdist.train recipes/digits.yaml`
process vs benchmarks/tutorial_digits.py (fp32, similar 2 conv + 2 fc model, batch 32).

Both clocks start when the process is spawned (imports included) and stop at the first
evaluation with top-1 >= 0.98: for ffdist the `time` of that val event in metrics.jsonl,
for the tutorial the time it prints. ffdist runs its recipe's 20 epochs to the end; its
whole-process time is reported as well.

    python -m benchmarks.digits_time
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, REPO, alternate, env, result


def ffdist_run() -> tuple[float, float]:
    """(seconds to 98%, seconds for the whole process)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        subprocess.run([PY, "-m", "ffdist.train", "recipes/digits.yaml", f"output_dir={tmp}"],
                       cwd=REPO, env=env(), check=True, capture_output=True)
        whole = time.time() - start
        events = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    hits = [e["time"] for e in events if e.get("split") == "val" and e["top1"] >= 0.98]
    return (hits[0] - start if hits else float("inf")), whole


def tutorial_run() -> float:
    start = time.time()
    out = subprocess.run([PY, "benchmarks/tutorial_digits.py"], cwd=REPO, env=env(),
                         check=True, capture_output=True, text=True).stdout
    reached = [line.split()[3] for line in out.splitlines() if line.startswith("reached")]
    return float(reached[0]) - start if reached else float("inf")


def bench_c(reps: int = 3) -> dict:
    wholes: list[float] = []

    def ours() -> float:
        to98, whole = ffdist_run()
        wholes.append(whole)
        return to98

    a, b, xs, ys = alternate(ours, tutorial_run, reps)
    wholes.sort()
    return result("c. time to 98% on digits", "ffdist train", a, "tutorial fp32 script", b, "s",
                  "ffdist no slower (tutorial/ffdist >= 1)", a <= b, ratio=b / a,
                  note=f"ratio = tutorial time / ffdist time; {reps} alternating runs, ffdist "
                       f"{[round(x, 1) for x in xs]} s, tutorial {[round(y, 1) for y in ys]} s; "
                       f"ffdist's whole 20-epoch process {wholes[len(wholes) // 2]:.1f} s")


if __name__ == "__main__":
    bench_c()
