"""d. Data-parallel scaling on this CPU: 2 ranks x 1 thread vs 1 rank x 1 thread, images/s
from `ffdist bench` (per-rank batch fixed at 64, so the global batch doubles), for DDP and
for DeepSpeed ZeRO-2 (strategy.name=deepspeed).

    python -m benchmarks.scaling
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import PY, REPO, alternate, env, result
from tests.helpers import free_port

PER_RANK, STEPS = 64, 10
BASE = ["model.name=small_cnn", "model.in_channels=3", "data.name=synthetic",
        "data.image_size=32", "log.tensorboard=false", "log.progress=false"]


def bench_json(nproc: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        args = ["-m", "ffdist.bench", "recipes/digits.yaml", *BASE, *extra,
                f"data.batch_size={PER_RANK * nproc}", f"output_dir={tmp}",
                "--steps", str(STEPS), "--warmup", "3", "--eval-steps", "0", "--out", str(out)]
        launcher = [PY] if nproc == 1 else [str(Path(PY).parent / "torchrun"),
                                            "--nproc_per_node", str(nproc),
                                            "--master_port", str(free_port())]
        subprocess.run([*launcher, *args], cwd=REPO, env=env(OMP_NUM_THREADS="1"), check=True,
                       capture_output=True)
        r = json.loads(out.read_text())
    assert r["world_size"] == nproc
    return r["train_images_per_s"]


def bench_d(reps: int = 3) -> list[dict]:
    rows = []
    for name, extra in (("DDP", ["strategy.name=auto"]),
                        ("ZeRO-2", ["strategy.name=deepspeed", "strategy.zero_stage=2"])):
        if name == "ZeRO-2" and importlib.util.find_spec("ffdist.strategies.deepspeed") is None:
            print("[d. scaling ZeRO-2] skipped: deepspeed strategy not available", flush=True)
            rows.append({"name": "d. scaling ZeRO-2", "skipped": True, "ok": None})
            continue
        two, one, xs, ys = alternate(lambda e=extra: bench_json(2, e),
                                     lambda e=extra: bench_json(1, e), reps)
        rows.append(result(f"d. scaling {name}", "2 ranks x 1 thread", two, "1 rank x 1 thread",
                           one, "images/s", ">= 1.8", two / one >= 1.8,
                           note=f"small_cnn 3x32x32, {PER_RANK} images/rank/step, {STEPS} steps; "
                                f"{reps} alternating runs: 2x1 {[round(x) for x in xs]}, "
                                f"1x1 {[round(y) for y in ys]}"))
    return rows


if __name__ == "__main__":
    bench_d()
