"""DDP, ZeRO-3 and FSDP side by side, measured in the same run: median step time and peak
process memory (RSS) per rank, 2 ranks, the FSDP ViT recipe on synthetic images, as
ratios against DDP.

    python -m benchmarks.strategy_memory                          # vit_tiny, 64 px, CPU
    python -m benchmarks.strategy_memory --steps 6 --reps 1       # a quick look
    python -m benchmarks.strategy_memory --model vit_b_16 --image-size 224 --batch-per-rank 2
    python -m benchmarks.strategy_memory --device cuda            # 2 GPUs (RSS is host memory)

Each side is `torchrun --nproc_per_node 2 -m ffdist.train recipes/vit_b16_fsdp.yaml` with
data.name=synthetic at --image-size, model --model, the recipe's bf16, activation
checkpointing and AdamW, and strategy.name=ddp | deepspeed (zero_stage=3) | fsdp: the same
recipe, only the strategy differs. The sides alternate (DDP, ZeRO-3, FSDP, then the
reverse order, ...: --reps rounds) and the medians are reported, so that load from other
users hits all alike.

What is measured:
  step ms     the median of the logged step_ms (one log line per step) after the first 2
              steps (lazy initialisation); medians over the repetitions
  peak RSS    per rank, the highest resident set size of its process (psutil, sampled every
              20 ms) while training steps are logged: from the first train record to the
              first eval record (checkpoint consolidation and evaluation are left out).
              It includes what every process holds whatever the strategy (the Python
              interpreter, torch, the data), so the ratio of the strategies' own
              memory is larger than the ratio of RSS; `ffdist plan`'s model-state rows
              are printed beside it for that reason.
The machine (CPU model, cores, load, torch) is printed first; results belong in
benchmarks/RESULTS.md with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, cpu, env, load

SIDES = {"DDP": ("strategy.name=ddp",),
         "ZeRO-3": ("strategy.name=deepspeed", "strategy.zero_stage=3"),
         "FSDP": ("strategy.name=fsdp",)}
MiB = 2**20


def machine() -> str:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return (f"{cpu()}, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}, torch {torch.__version__}"
            + (f", GPUs: {', '.join(gpus)}" if gpus else "") + f"; {load()}")


def overrides(args: argparse.Namespace, out: Path, side: str) -> list[str]:
    batch = 2 * args.batch_per_rank
    return [
        "data.name=synthetic", f"data.image_size={args.image_size}", f"model.name={args.model}",
        f"launch.device={args.device}", f"data.batch_size={batch}", "data.mix_group=null",
        f"data.synthetic_size={batch * (args.steps + 2) * 2}", "data.num_workers=0",
        "data.eval_batch_size=" + str(batch), f"schedule.max_steps={args.steps}",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "log.every_steps=1",
        "log.tensorboard=false", "log.progress=false", "log.images=false",
        "checkpoint.every_steps=0", "checkpoint.keep_best=false", f"output_dir={out}",
        *SIDES[side]]


def records(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def watch(proc: subprocess.Popen, run_dir: Path, peaks: dict[int, int]) -> None:
    """Record each rank's highest RSS while training steps are being logged."""
    import psutil

    agent = psutil.Process(proc.pid)
    while proc.poll() is None:
        logged = records(run_dir)
        training = any(r.get("split") == "train" for r in logged) and \
            not any(r.get("split") == "val" for r in logged)
        if training:
            for child in agent.children(recursive=True):
                try:
                    rank = child.environ().get("RANK")
                    if rank is not None and "ffdist.train" in " ".join(child.cmdline()):
                        peaks[int(rank)] = max(peaks.get(int(rank), 0), child.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        time.sleep(0.02)


def run_side(args: argparse.Namespace, side: str, work: Path, rep: int) -> dict[str, Any]:
    out = work / f"{side}_{rep}"
    port = 29700 + (os.getpid() + rep * 7 + len(side)) % 200
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "ffdist.train",
           str(REPO / "recipes" / "vit_b16_fsdp.yaml"), *overrides(args, out, side)]
    peaks: dict[int, int] = {}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(OMP_NUM_THREADS=str(args.threads)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=watch, args=(proc, out, peaks), daemon=True)
    watcher.start()
    text, _ = proc.communicate(timeout=args.timeout)
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{text[-3000:]}")
    steps = [r["step_ms"] for r in records(out) if r.get("split") == "train" and r["step"] > 2]
    return {"step_ms": statistics.median(steps), "rss": [peaks.get(r, 0) for r in (0, 1)]}


def plan_rows(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """`ffdist plan`'s model states per rank for the same recipe (2 devices)."""
    from ffdist import assemble, plan, recipe_load
    from ffdist.resolved import Resolved

    rcp = recipe_load.load(REPO / "recipes" / "vit_b16_fsdp.yaml",
                           overrides(args, Path("/nonexistent"), "FSDP"))
    import torch

    resolved: Resolved = assemble.resolve(rcp, 2, torch.device("cpu"))
    model = assemble.build_model(rcp, load_weights=False)
    blocks = assemble.prepare_blocks(model, rcp)
    est = plan.estimate(rcp, model, resolved, blocks)
    return {side: est.rows[side] for side in SIDES}


def main(argv: list[str] | None = None) -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-per-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"recipe vit_b16_fsdp.yaml: {args.model} at {args.image_size} px, {args.batch_per_rank} "
          f"images per rank, 2 ranks on {args.device}, {args.steps} steps, {args.reps} round(s)")
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(SIDES) if rep % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                results[side].append(run_side(args, side, Path(tmp), rep))
    states = plan_rows(args)
    med = {side: {"step_ms": statistics.median(r["step_ms"] for r in runs),
                  "rss": [statistics.median(r["rss"][k] for r in runs) for k in (0, 1)]}
           for side, runs in results.items()}
    base = med["DDP"]
    print(f"{'strategy':<8} {'step ms':>9} {'x DDP':>7} {'peak RSS rank 0/1 MiB':>24} "
          f"{'x DDP':>7} {'plan: model states MiB':>24}")
    for side, m in med.items():
        rss = max(m["rss"])
        states_mib = (states[side]["total"] - states[side]["activations"] - states[side]["ema"]) / MiB
        print(f"{side:<8} {m['step_ms']:>9.1f} {m['step_ms'] / base['step_ms']:>7.3f} "
              f"{m['rss'][0] / MiB:>11.0f} / {m['rss'][1] / MiB:<10.0f} "
              f"{rss / max(base['rss']):>7.3f} {states_mib:>24.1f}", flush=True)
    print(f"(medians of {args.reps} round(s); each round's runs: "
          + "; ".join(f"{s} " + ", ".join(f"{r['step_ms']:.1f} ms" for r in rs)
                      for s, rs in results.items()) + f"; {load()})")


if __name__ == "__main__":
    main()
