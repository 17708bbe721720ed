"""`make bench`: benchmarks a-f in one run, then a summary (each line: the two figures,
their ratio, the target, and the load average seen while measuring).

    python -m benchmarks.run_all            # all;  python -m benchmarks.run_all a c
"""

from __future__ import annotations

import json
import platform
import sys
import time

from benchmarks.common import REPO, load


def main(argv: list[str]) -> int:
    from benchmarks.box_path import bench_f
    from benchmarks.digits_time import bench_c
    from benchmarks.pipeline import bench_b
    from benchmarks.scaling import bench_d
    from benchmarks.step import bench_a, bench_e

    which = argv or ["a", "b", "c", "d", "e", "f"]
    table = {"a": bench_a, "b": bench_b, "c": bench_c, "d": bench_d, "e": bench_e,
             "f": bench_f}
    started = time.time()
    print(f"ffdist benchmarks on {platform.machine()}, {load()}", flush=True)
    rows: list[dict] = []
    for w in which:
        print(f"--- {w}", flush=True)
        out = table[w]()
        rows += out if isinstance(out, list) else [out]
    minutes = (time.time() - started) / 60
    print(f"\n=== summary ({minutes:.1f} min, {load()})")
    for r in rows:
        print(f"  {r['name']}: skipped" if r.get("skipped") else "  " + r["line"])
    (REPO / "runs").mkdir(exist_ok=True)
    (REPO / "runs" / "benchmarks.json").write_text(json.dumps(
        {"minutes": minutes, "rows": rows, "machine": platform.machine()}, indent=1))
    print(f"wrote {REPO / 'runs' / 'benchmarks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
