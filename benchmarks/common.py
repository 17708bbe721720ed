"""Shared by the benchmarks: interleaved repetitions, medians, the load we ran under, the
hand-written PyTorch loop that ffdist is compared with, and a one-line result format.

The machine may be shared, so every comparison alternates its two sides (A B A B ...) and
reports medians: a burst of someone else's load hits both sides alike."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


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


# ------------------------------------------------------------------ the hand-written loop

def raw_loop(model_fn: Callable[[], Any], images: Any, labels: Any, batch: int, lr: float,
             precision: str, channels_last: bool, steps: int, warmup: int,
             state: dict | None = None) -> float:
    """The loop a PyTorch user writes by hand, on data already normalized in memory:
    forward under autocast, cross-entropy, backward, SGD step, zero_grad. Images/s.
    `state` (a dict, filled on the first call) keeps model, optimizer and data across
    calls, so repeated timings continue one training run as ffdist's side does."""
    import torch
    import torch.nn.functional as F

    state = {} if state is None else state
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not state:
        torch.manual_seed(0)
        state["model"] = model_fn().to(memory_format=fmt).train()
        x_all = images.float().contiguous(memory_format=fmt)
        state["x"] = (x_all - x_all.mean()) / x_all.std()
        state["opt"] = torch.optim.SGD(state["model"].parameters(), lr=lr, momentum=0.9)
        state["i"] = 0
    model, x_all, opt = state["model"], state["x"], state["opt"]
    n = len(labels) // batch
    use_amp = precision != "fp32"
    for i in range(warmup + steps):
        if i == warmup:
            begin = time.perf_counter()
        j = state["i"] % n
        state["i"] += 1
        x, y = x_all[j * batch:(j + 1) * batch], labels[j * batch:(j + 1) * batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - begin)
