"""`ffdist plan RECIPE [key=value ...] [--gpu-mem 24GiB] [--gpus N] [--json]`: what a
recipe will need per device before spending GPU hours.

The batch plan and precision are ffdist.assemble.resolve's for this machine's device (the
one `ffdist train` would use here, `accelerate launch --mixed_precision` included), and the
parameter counts those of ffdist.assemble.build_model (model.freeze applied): the numbers
`ffdist train` and `ffdist bench` will use.

Model states (parameters, gradients, optimizer states) follow the ZeRO paper's accounting
(Rajbhandari et al. 2020, section 3), per device: one row per memory model that a
registered strategy declares (ffdist.strategies: `memory_rows`, `row_bytes`, `ema_bytes`),
in registration order: DDP (single device and DDP: fp32 weights, replicated;
ffdist/strategies/single.py), then ZeRO-1, ZeRO-2, ZeRO-3 (optimizer states, then
gradients, then parameters sharded over the ranks; ffdist/strategies/deepspeed.py), then
FSDP (fp32 parameters, gradients and optimizer states sharded, plus the root's and the
largest block's parameters gathered in the compute dtype; ffdist/strategies/fsdp.py). The
recipe is judged on its own strategy's row; one that does not fit is told, for each
other strategy after its own, the first of its rows that fits.

Activations are MEASURED, not guessed: forward/backward of real batches of 2 and 4 on the
CPU (at the resolved image size, under autocast with the resolved precision), summing the
bytes of every tensor autograd saves for backward (saved_tensors_hooks, each storage once,
parameters excluded); the difference per sample is scaled linearly to the per-device micro
batch. Real tensors (not the meta device) because storages can be deduplicated only when
they exist (in-place ReLU and views share them); batches of 2+ because BatchNorm in
training mode needs more than one sample. The model is measured as it trains: with
model.activation_checkpointing applied (ffdist.assemble.prepare_blocks), a checkpointed
block saves only its input (and, selective, its matmul/conv outputs), and the hooks see
exactly that. (Its recompute in backward briefly holds one block's activations again:
not counted.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ffdist.errors import RecipeError, guard
from ffdist.launchers import local_processes
from ffdist.recipe import Recipe
from ffdist.summary import regularization

if TYPE_CHECKING:  # torch loads in facts() (ffdist.assemble), after the recipe is read
    import torch
    from torch import nn

    from ffdist.resolved import Resolved

GiB = 1 << 30
USABLE = 0.9  # of a GPU's memory: the rest goes to the CUDA context, workspaces, fragmentation


def parse_size(text: str) -> int:
    """'24GiB', '24G', '80 GB', '16000MiB' -> bytes (G/GiB = 2^30, GB = 10^9)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise RecipeError(f"--gpu-mem={text!r} is not a size; write e.g. 24GiB or 80GB.")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    base = 1000 if suffix == "b" else 1024  # GB is decimal; G and GiB are binary
    return int(number * base ** "BKMGT".index(unit or "B")) if unit else int(number)


def gib(n: float) -> str:
    """Bytes for people: KiB/MiB/GiB, whichever reads best."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def nvml_memory(gpus: list[int]) -> list[int] | None:
    """Total memory of the recipe's GPUs (all when gpus == []), None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: the usual case on a laptop or a CPU node
        return None
    try:
        ids = gpus or list(range(pynvml.nvmlDeviceGetCount()))
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
                for i in ids]
    finally:
        pynvml.nvmlShutdown()


def world_size(rcp: Recipe, override: int | None) -> tuple[int, str]:
    """Devices in total and why: --gpus (--world-size), else what `ffdist launch` would start
    per node here (launch.device, launch.gpus, launch.nproc and the visible GPUs: the rules
    of docs/launchers.md) times launch.nnodes."""
    if override:
        return override, f"--gpus {override}"
    node, notes = local_processes(rcp, dry_run=True)
    nodes = rcp.launch.nnodes
    why = notes[0] if nodes == 1 else f"{node.nproc} per node x launch.nnodes={nodes}; {notes[0]}"
    if node.device == "cpu":
        why += "; for GPUs: --gpus N"
    return node.nproc * nodes, why


def progress(message: str) -> None:
    """What plan is doing, on stderr (measuring takes seconds; --json keeps stdout clean)."""
    print(f"plan: {message}", file=sys.stderr, flush=True)


def saved_bytes(model: nn.Module, batch: int, channels: int, size: int, precision: str) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (each
    storage once: in-place ops and views share theirs), parameters excluded."""
    import torch

    from ffdist.precision import autocast

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    x = torch.randn(batch, channels, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(precision, torch.device("cpu")):
            out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def activation_bytes_per_sample(model: nn.Module, channels: int, size: int, precision: str) -> int:
    """Measured at batches of 2 and 4: the difference is what one more sample costs, free
    of per-step constants (autocast's low-precision weight copies)."""
    two = saved_bytes(model, 2, channels, size, precision)
    four = saved_bytes(model, 4, channels, size, precision)
    return max(0, four - two) // 2


@dataclass
class MemoryEstimate:
    """Bytes per device: a row of model states (+ activations, EMA, total) per strategy,
    and the measured activations."""

    rows: dict[str, dict[str, int]]
    activations: int
    per_sample: int


def estimate(rcp: Recipe, model: nn.Module, resolved: Resolved,
             blocks: list[str] | None = None) -> MemoryEstimate:
    """Model states of every strategy's rows and measured activations, per device.
    `blocks`: the model's blocks (ffdist.assemble.prepare_blocks), for the rows of a
    strategy that gathers one block at a time."""
    from ffdist import strategies
    from ffdist.assemble import param_counts

    n, t = param_counts(model)
    block_params = tuple(sum(p.numel() for p in model.get_submodule(b).parameters())
                         for b in blocks or [])
    world, micro, precision = resolved.plan.world_size, resolved.plan.micro, resolved.precision
    per_sample = activation_bytes_per_sample(model, rcp.model.in_channels, resolved.image_size,
                                             precision)
    acts = per_sample * micro
    rows = {}
    for name, strategy in strategies.memory_rows().items():
        by_block = {"block_params": block_params} if strategy.uses_blocks else {}
        r = rows[name] = strategy.row_bytes(name, n, t, rcp, resolved, **by_block)
        r["activations"] = acts
        r["ema"] = strategy.ema_bytes(n, t, world) if rcp.optim.ema_decay > 0 else 0
        r["total"] += acts + r["ema"]
    return MemoryEstimate(rows, acts, per_sample)


def recommend(est: MemoryEstimate, gpu_mem: int | None, per_rank: int, micro: int,
              row: str = "DDP") -> str:
    """Judge the recipe's own strategy (`row` of est.rows) and its own micro batch x
    accumulation against the GPU: what to change if it does not fit (for each strategy, the
    first of its rows after `row` that fits: within a strategy rows come in the order of
    less memory, and never one before the recipe's), and whether a larger micro batch (less
    accumulation) would also fit when it does."""
    need, accum = est.rows[row]["total"], per_rank // micro
    recipe_batch = f"micro batch {micro} x {accum} accumulation"
    if gpu_mem is None:
        return (f"{row} needs {gib(need)} per device at the recipe's {recipe_batch}; pass "
                "--gpu-mem (no NVML GPU here) for a recommendation.")
    budget = USABLE * gpu_mem
    head = (f"{row} needs {gib(need)} per GPU, the smallest GPU has {gib(gpu_mem)} "
            f"(recipe: {recipe_batch})")
    states = need - est.activations
    fits = [m for m in range(per_rank, 0, -1)
            if per_rank % m == 0 and states + est.per_sample * m <= budget]
    from ffdist.strategies import row_overrides

    switch = row_overrides()
    if need <= budget:
        also = _also_fit(est, row, budget, micro, switch)
        if fits and fits[0] > micro:
            m = fits[0]
            return (f"{head}: it fits, and so does micro batch {m}: data.micro_batch_size={m} "
                    f"gives {per_rank // m} accumulation step(s) instead of {accum} (the same "
                    f"global batch and schedule, fewer and larger steps).{also}")
        return f"{head}: it fits (under {USABLE:.0%} of the memory); no change needed.{also}"
    from ffdist.strategies import memory_rows

    fixes, names, owner = [], list(est.rows), memory_rows()
    tried: set = set()
    for name in names[names.index(row) + 1:]:  # each other strategy's first row that fits
        if owner.get(name) not in tried and est.rows[name]["total"] <= budget:
            fixes.append(switch.get(name, name))
            tried.add(owner.get(name))
    smaller = [m for m in fits if m < micro]
    if smaller:
        fixes.append(f"data.micro_batch_size={smaller[0]} (gradient accumulation "
                     f"{per_rank // smaller[0]})")
    if not fixes:
        return (f"{head}: even {names[-1]} with micro batch 1 does not fit; use more GPUs, a "
                "smaller model or smaller images.")
    return f"{head}: use {' or '.join(fixes)}."


def _also_fit(est: MemoryEstimate, row: str, budget: float, micro: int,
              switch: dict[str, str]) -> str:
    """The other rows that would fit too although they keep more per device than the
    recipe's (less sharding, less communication), with the overrides that train as them;
    rows that keep less fit anyway and go unsaid."""
    need = est.rows[row]["total"]
    more = [name for name, r in est.rows.items()
            if name != row and need < r["total"] <= budget]
    if not more:
        return ""
    named = [f"{name} ({switch.get(name, name)})" for name in more]
    named = ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0]
    return f" {named} would also fit at micro batch {micro}."


def recipe_row(rcp: Recipe, resolved: Resolved) -> str:
    """The row of the strategy the recipe trains with (the strategy says which)."""
    from ffdist import strategies

    return strategies.get(resolved.strategy).row_of(rcp)


def facts(rcp: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """Everything `ffdist plan` reports, as plain values (`--json` prints them). The batch
    plan and precision come from ffdist.assemble.resolve on the device `ffdist train` would
    use here, so they are what training will use on this machine."""
    from ffdist import assemble, dist, preflight

    sizes = nvml_memory(list(rcp.launch.gpus))
    world, why = world_size(rcp, args.world_size)
    device = dist.pick_device(0, 1, rcp.launch.device, rcp.launch.gpus)  # rank 0's, as dist.init
    launcher = dist.launcher_precision()  # accelerate launch --mixed_precision
    resolved = assemble.resolve(rcp, world, device, launcher)
    # after resolve: a refused recipe prints its one sentence and nothing else
    progress(f"{rcp.name}: building {rcp.model.name} for {world} device(s) ...")
    model = assemble.build_model(rcp, load_weights=False)  # model.freeze applied
    preflight.check_sizes(model, rcp, resolved)  # before measuring activations at that size
    blocks = assemble.prepare_blocks(model, rcp)  # activation checkpointing as in training
    n, t = assemble.param_counts(model)
    size = resolved.image_size
    progress(f"measuring {rcp.model.name} activations at {size}x{size} ({resolved.precision}, "
             "forward+backward of batches of 2 and 4 on the CPU) ...")
    est = estimate(rcp, model, resolved, blocks)
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else (min(sizes) if sizes else None)
    source = "--gpu-mem" if args.gpu_mem else f"NVML, smallest of {len(sizes or [])} GPU(s)"
    p = resolved.plan
    return {
        "recipe": rcp.name, "model": rcp.model.name, "in_channels": rcp.model.in_channels,
        "num_classes": rcp.model.num_classes, "data": rcp.data.name, "optimizer": rcp.optim.name,
        "epochs": rcp.schedule.epochs, "scheduler": rcp.schedule.scheduler,
        "recipe_precision": rcp.precision, "launcher_precision": launcher,
        "world_source": why, **resolved.to_dict(), "params": n, "trainable_params": t,
        "activations_per_sample": est.per_sample, "activations": est.activations,
        "activation_checkpointing": rcp.model.activation_checkpointing, "blocks": len(blocks),
        "gpu_mem": gpu_mem, "gpu_mem_source": source if gpu_mem else None,
        "regularization": regularization(rcp, resolved.image_size), "ema": rcp.optim.ema_decay > 0,
        "rows": est.rows, "judged_row": recipe_row(rcp, resolved),
        "recommendation": recommend(est, gpu_mem, p.per_rank, p.micro,
                                    recipe_row(rcp, resolved))}


def cpu_note(f: dict[str, Any]) -> str:
    """Planning GPUs (--gpus) from a machine without one: which precision they would get."""
    if f["device"] != "cpu" or not f["world_source"].startswith("--gpus") \
            or f["recipe_precision"] != "auto" or f["launcher_precision"]:
        return ""
    return "; no GPU here: on GPUs precision=auto is bf16 (fp16 where bf16 is missing)"


def report(f: dict[str, Any]) -> str:
    """`facts` for people."""
    size = f["image_size"]
    ema = f["ema"]
    asked = f"accelerate launch --mixed_precision {f['launcher_precision']}" \
        if f["launcher_precision"] else f"precision {f['recipe_precision']}"
    gpu = f"{gib(f['gpu_mem'])} ({f['gpu_mem_source']})" if f["gpu_mem"] else \
        "unknown (no NVML GPU, no --gpu-mem)"
    lines = [
        f"recipe     {f['recipe']}: {f['model']} ({f['in_channels']}x{size}x{size}, "
        f"{f['num_classes']} classes), data {f['data']}, {f['optimizer']} lr {f['lr']:g}, "
        f"{f['epochs']} epochs {f['scheduler']}, strategy {f['strategy']}",
        f"precision  {f['precision']} on {f['device']} ({asked}){cpu_note(f)}",
        f"world      {f['world_size']} device(s) ({f['world_source']})",
        f"batch      global {f['global_batch']} = {f['per_rank']}/device = {f['micro']} micro x "
        f"{f['accum']} accumulation",
        f"parameters {f['params']:,} total, {f['trainable_params']:,} trainable",
        f"regularize {f['regularization']}",
        f"activations measured: {gib(f['activations_per_sample'])}/sample x {f['micro']} = "
        f"{gib(f['activations'])} per device (activation checkpointing "
        f"{f['activation_checkpointing']}, {f['blocks']} blocks)",
        f"GPU memory {gpu}",
        "",
        f"{'per device':<10} {'params':>11} {'grads':>11} {'optimizer':>11} {'activations':>12} "
        + (f"{'EMA':>11} " if ema else "") + f"{'total':>11}",
    ]
    for name, r in f["rows"].items():
        lines.append(f"{name:<10} {gib(r['params']):>11} {gib(r['grads']):>11} "
                     f"{gib(r['optimizer']):>11} {gib(r['activations']):>12} "
                     + (f"{gib(r['ema']):>11} " if ema else "") + f"{gib(r['total']):>11}")
    lines += ["", f["recommendation"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist plan", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--gpu-mem", default=None, help="memory of the smallest GPU, e.g. 24GiB")
    p.add_argument("--gpus", "--world-size", dest="world_size", type=int, default=None,
                   metavar="N",
                   help="plan for N devices in total, all nodes (--world-size is the same "
                        "flag); default: what `ffdist launch` would start here (launch.device, "
                        "launch.nproc, launch.gpus, the visible GPUs) x launch.nnodes")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    from ffdist import recipe_load

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.world_size is not None and args.world_size < 1:
        raise RecipeError(f"--gpus/--world-size={args.world_size}: use 1 or more.")
    import time

    started = time.perf_counter()
    from ffdist import assemble

    rcp = assemble.settle(recipe_load.load(args.recipe, args.overrides))  # model.* = auto
    found = facts(rcp, args)
    progress(f"done in {time.perf_counter() - started:.1f} s")
    print(json.dumps(found, indent=1) if args.json else report(found))
    return 0


if __name__ == "__main__":
    sys.exit(guard(main))  # the one error printer, as under `ffdist plan`
