"""Shared by the benchmarks: interleaved repetitions, medians, the load we ran under, and a
one-line result format (the hand-written loop ffdist is compared with is
ffdist.reference.ReferenceLoop, which `ffdist bench --reference` times too).

The machine may be shared, so every comparison alternates its two sides (A B A B ...) and
reports medians: a burst of someone else's load hits both sides alike."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def cpu() -> str:
    """The CPU's model name and core count (Linux: /proc/cpuinfo), for every benchmark's
    report of the machine it ran on."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def alternate(a: Callable[[], float], b: Callable[[], float], reps: int) -> tuple[float, float,
                                                                                    list, list]:
    """Median of `reps` interleaved runs of each side (each returns its figure)."""
    xs, ys = [], []
    for i in range(reps):
        # A B, then B A: neither side always runs first (warm caches, load trends)
        if i % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return statistics.median(xs), statistics.median(ys), xs, ys


def result(name: str, a_label: str, a: float, b_label: str, b: float, unit: str,
           target: str, ok: bool, ratio: float | None = None, note: str = "") -> dict[str, Any]:
    ratio = a / b if ratio is None else ratio
    line = (f"[{name}] {a_label}: {a:.1f} {unit} | {b_label}: {b:.1f} {unit} | "
            f"ratio {ratio:.3f} (target {target}: {'met' if ok else 'MISSED'}) | {load()}")
    print(line + (f"\n    {note}" if note else ""), flush=True)
    return {"name": name, "a": a, "b": b, "ratio": ratio, "target": target, "ok": ok,
            "unit": unit, "line": line, "note": note}


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(extra)
    return e
