"""`ffdist plan RECIPE [key=value ...] [--gpu-mem 24GiB] [--world-size N]`: what a recipe will
need per device before spending GPU hours.

Model states (parameters, gradients, optimizer states) follow the ZeRO paper's accounting
(Rajbhandari et al. 2020, section 3), per device:
    DDP / single      params 4P, grads 4T, optimizer kT        (fp32 storage: PyTorch
                                                                 autocast keeps fp32 weights)
    DeepSpeed         params wP, grads wT, optimizer (4+k)T    (w = 2 bytes in bf16/fp16,
                                                                 4 in fp32; fp32 master copy
                                                                 + states)
    ZeRO-1 shards the optimizer over N ranks, ZeRO-2 also the gradients, ZeRO-3 also the
    parameters.
P = all parameters, T = trainable ones, k = 4 bytes per state (SGD momentum: 1 state,
AdamW: 2, plain SGD: 0).

Activations are MEASURED, not guessed: forward/backward of real batches of 2 and 4 on the
CPU (at the recipe's image size, under autocast with the recipe's precision), summing the
bytes of every tensor autograd saves for backward (saved_tensors_hooks, each storage once,
parameters excluded); the difference per sample is scaled linearly to the per-device micro
batch. Real tensors (not the meta device) because storages can be deduplicated only when
they exist (in-place ReLU and views share them); batches of 2+ because BatchNorm in
training mode needs more than one sample.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ffdist.errors import RecipeError
from ffdist.memory import model_state_bytes
from ffdist.recipe import Recipe

GiB = 1 << 30
USABLE = 0.9  # of a GPU's memory: the rest goes to the CUDA context, workspaces, fragmentation
NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32,
               "synthetic": 32}



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


def world_size(rcp: Recipe, override: int | None, gpu_count: int) -> tuple[int, str]:
    if override:
        return override, "--world-size"
    per_node, why = (len(rcp.launch.gpus), "launch.gpus") if rcp.launch.gpus else \
        ((gpu_count, "visible GPUs") if gpu_count else (rcp.launch.nproc, "launch.nproc"))
    return per_node * rcp.launch.nnodes, f"{why} x launch.nnodes={rcp.launch.nnodes}"


def image_size(rcp: Recipe) -> int:
    """The training crop, without opening the data (it may not be on this machine)."""
    return rcp.data.image_size or NATIVE_SIZE.get(rcp.data.name, 224)


def saved_bytes(model: nn.Module, batch: int, channels: int, size: int, precision: str) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (each
    storage once: in-place ops and views share theirs), parameters excluded."""
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
class Plan:
    rows: dict[str, dict[str, int]]
    activations: int
    per_sample: int


def estimate(rcp: Recipe, model: nn.Module, world: int, micro: int, precision: str) -> Plan:
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    momentum = rcp.optim.momentum > 0
    per_sample = activation_bytes_per_sample(model, rcp.model.in_channels, image_size(rcp),
                                             precision)
    acts = per_sample * micro
    opt = rcp.optim.name
    rows = {"DDP": model_state_bytes(n, t, opt, precision, "ddp", 0, world, momentum=momentum)}
    for stage in (1, 2, 3):
        rows[f"ZeRO-{stage}"] = model_state_bytes(n, t, opt, precision, "deepspeed", stage, world,
                                                  momentum=momentum)
    for name, r in rows.items():
        r["activations"] = acts
        r["ema"] = ema_bytes(rcp, n, world, sharded=name == "ZeRO-3")
        r["total"] += acts + r["ema"]
    return Plan(rows, acts, per_sample)


def ema_bytes(rcp: Recipe, num_params: int, world: int, sharded: bool) -> int:
    """optim.ema_decay > 0: an fp32 shadow of every parameter (buffers are small) on each
    device; under ZeRO-3 it is sharded like the parameters (1/N each)."""
    if rcp.optim.ema_decay <= 0:
        return 0
    return 4 * num_params // (world if sharded else 1)


def regularization(rcp: Recipe) -> str:
    """One line naming the regularization a recipe turns on ('none' when it has none)."""
    from ffdist import mixup

    d, o, m = rcp.data, rcp.optim, rcp.model
    parts = []
    if o.ema_decay > 0:
        parts.append(f"EMA {o.ema_decay:g} every {o.ema_every_steps} step(s)")
    if mixup.enabled(d):
        group = "" if d.mix_mode != "batch" else f", group {d.mix_group or d.batch_size}"
        parts.append(f"mixup {d.mixup_alpha:g} / cutmix {d.cutmix_alpha:g} ({d.mix_mode}"
                     f"{group}; soft targets)")
    if o.label_smoothing:
        parts.append(f"label smoothing {o.label_smoothing:g}")
    if d.auto_augment:
        parts.append(f"auto_augment {d.auto_augment}")
    if d.random_erase:
        parts.append(f"random erase {d.random_erase:g} ({d.random_erase_mode})")
    if d.repeated_augmentation > 1:
        parts.append(f"repeated augmentation x{d.repeated_augmentation}")
    if m.drop_path_rate:
        parts.append(f"drop path {m.drop_path_rate:g}")
    if d.eval_image_size and d.eval_image_size != image_size(rcp):
        parts.append(f"eval at {d.eval_image_size}px")
    return ", ".join(parts) or "none"


def recommend(plan: Plan, gpu_mem: int | None, per_rank: int, micro: int) -> str:
    ddp = plan.rows["DDP"]["total"]
    if gpu_mem is None:
        return (f"DDP needs {gib(ddp)} per device; pass --gpu-mem (no NVML GPU here) for a "
                "recommendation.")
    budget = USABLE * gpu_mem
    head = f"DDP needs {gib(ddp)} per GPU, the smallest GPU has {gib(gpu_mem)}"
    if ddp <= budget:
        return f"{head}: it fits (under {USABLE:.0%} of the memory); no change needed."
    fixes = []
    for stage in (1, 2, 3):
        if plan.rows[f"ZeRO-{stage}"]["total"] <= budget:
            fixes.append(f"strategy.name=deepspeed strategy.zero_stage={stage}")
            break
    states = plan.rows["DDP"]["total"] - plan.activations
    fitting = [m for m in range(micro - 1, 0, -1)
               if per_rank % m == 0 and states + plan.per_sample * m <= budget]
    if fitting:
        fixes.append(f"data.micro_batch_size={fitting[0]} (gradient accumulation "
                     f"{per_rank // fitting[0]})")
    if not fixes:
        return (f"{head}: even ZeRO-3 with micro batch 1 does not fit; use more GPUs, a smaller "
                "model or smaller images.")
    return f"{head}: use {' or '.join(fixes)}."


def report(rcp: Recipe, args: argparse.Namespace) -> str:
    from ffdist import finetune, models
    from ffdist.data import plan_batches

    sizes = nvml_memory(list(rcp.launch.gpus))
    world, why = world_size(rcp, args.world_size, len(sizes or []))
    bp = plan_batches(rcp.data.batch_size, rcp.data.micro_batch_size, world)
    torch.manual_seed(rcp.seed)
    model = models.build(rcp.model)
    if rcp.model.freeze:  # trainable count and saved activations depend on it
        finetune.prepare(model, rcp.model, load_weights=False)
    # what the recipe's precision means on a GPU (auto: bf16 on Ampere and newer)
    prec = "bf16" if rcp.precision == "auto" else rcp.precision
    plan = estimate(rcp, model, world, bp.micro, prec)
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else (min(sizes) if sizes else None)
    source = "--gpu-mem" if args.gpu_mem else f"NVML, smallest of {len(sizes or [])} GPU(s)"
    size = image_size(rcp)
    ema = rcp.optim.ema_decay > 0
    lines = [
        f"recipe     {rcp.name}: {rcp.model.name} ({rcp.model.in_channels}x{size}x{size}, "
        f"{rcp.model.num_classes} classes), data {rcp.data.name}, {rcp.optim.name} lr "
        f"{rcp.optim.lr:g}, {rcp.schedule.epochs} epochs {rcp.schedule.scheduler}, precision "
        f"{rcp.precision} (-> {prec} on a GPU), strategy {rcp.strategy.name}",
        f"world      {world} device(s) ({why})",
        f"batch      global {bp.global_batch} = {bp.per_rank}/device = {bp.micro} micro x "
        f"{bp.accum} accumulation",
        f"parameters {n:,} total, {t:,} trainable",
        f"regularize {regularization(rcp)}",
        f"activations measured: {gib(plan.per_sample)}/sample x {bp.micro} = "
        f"{gib(plan.activations)} per device",
        f"GPU memory {f'{gib(gpu_mem)} ({source})' if gpu_mem else 'unknown (no NVML GPU, no --gpu-mem)'}",
        "",
        f"{'per device':<10} {'params':>11} {'grads':>11} {'optimizer':>11} {'activations':>12} "
        + (f"{'EMA':>11} " if ema else "") + f"{'total':>11}",
    ]
    for name, r in plan.rows.items():
        lines.append(f"{name:<10} {gib(r['params']):>11} {gib(r['grads']):>11} "
                     f"{gib(r['optimizer']):>11} {gib(r['activations']):>12} "
                     + (f"{gib(r['ema']):>11} " if ema else "") + f"{gib(r['total']):>11}")
    lines += ["", recommend(plan, gpu_mem, bp.per_rank, bp.micro)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ffdist plan", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--gpu-mem", default=None, help="memory of the smallest GPU, e.g. 24GiB")
    p.add_argument("--world-size", type=int, default=None, help="devices in total")
    return p


def main(argv: list[str] | None = None) -> int:
    from ffdist import recipe

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.world_size is not None and args.world_size < 1:
        raise RecipeError(f"--world-size={args.world_size}: use 1 or more.")
    rcp = recipe.load(args.recipe, args.overrides)
    print(report(rcp, args))
    return 0


if __name__ == "__main__":
    from ffdist.cli import main as cli_main  # prints user errors, exit 2

    sys.exit(cli_main(["plan", *sys.argv[1:]]))
