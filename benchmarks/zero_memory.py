"""ZeRO memory across ranks, measured: per-rank bytes of parameters, gradients and optimizer
states under DDP and DeepSpeed ZeRO-1/2/3 with N real processes (gloo on the CPU), printed
next to the strategies' formulas (`model_state_bytes` of ffdist.strategies.single and
.deepspeed: the ZeRO paper's, adapted; see those modules and ffdist.memory).

    python -m benchmarks.zero_memory                       # resnet152, bf16, AdamW, N=2,4
    python -m benchmarks.zero_memory --model vit_b_16 --image-size 32 --world-sizes 2
    python -m benchmarks.zero_memory --optimizer sgd --precision fp32

How it counts: at the moment of the optimizer step's peak (after the last backward of
step 3, before engine.step) every rank walks the tensors it holds and adds up their
STORAGES once each (views of one flat buffer count once):
  params     the module's parameters (ZeRO-3: their partitions, p.ds_tensor)
  grads      the parameters' .grad and DeepSpeed's gradient partitions/buffers (attributes
             of its ZeRO optimizer whose name holds "grad")
  optimizer  the client optimizer's state (momentum, exp_avg, exp_avg_sq) and, under
             DeepSpeed, the fp32 master partitions it steps (ZeRO optimizer attributes
             whose name holds "fp32")
  other      every other live tensor storage (communication buckets, activations kept by
             autograd, inputs), reported so that nothing hides
Rank 0's numbers are printed (ranks differ by at most one partition's rounding).
Measured after the reduction: DeepSpeed's ZeRO-1 has by then replaced the full-size
gradients by its partition, so its "grads" column shows the partition; during backward
(and across accumulation micro-steps) they are full size, as the formula counts them.
"""

from __future__ import annotations

import argparse
import gc
import os
import warnings
from typing import Any

import torch

from ffdist.memory import paper_bytes_per_param
from ffdist.strategies.deepspeed import DeepSpeed
from ffdist.strategies.single import SingleDevice

MB = 2**20


def _storage_map(tensors: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _tensors_in(obj: Any, depth: int = 3) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v, depth - 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v, depth - 1)]
    return []


def measure(strategy: Any) -> dict[str, int]:
    module = strategy.unwrap()
    params = _storage_map([getattr(p, "ds_tensor", None) for p in module.parameters()]
                          + [p.data for p in module.parameters()])
    client = strategy.optimizer.optimizer if hasattr(strategy.optimizer, "optimizer") \
        else strategy.optimizer
    opt = _storage_map(_tensors_in(client.state, 2))
    engine = getattr(strategy, "engine", None)  # DeepSpeed's
    if engine is not None:  # the fp32 master partitions ZeRO steps
        opt.update(_storage_map(p for g in client.param_groups for p in g["params"]))
    grad_tensors = [p.grad for p in module.parameters()]
    if engine is not None:
        zero = engine.optimizer
        for name, value in vars(zero).items():
            if "grad" in name.lower():
                grad_tensors += _tensors_in(value)
            elif "fp32" in name.lower():  # master partitions (stage 3 keeps them out of
                opt.update(_storage_map(_tensors_in(value)))  # param_groups between steps)
        grad_tensors += [p.grad for g in client.param_groups for p in g["params"]]
    grads = _storage_map(grad_tensors)
    for k in params:
        grads.pop(k, None)
        opt.pop(k, None)
    for k in opt:
        grads.pop(k, None)
    with warnings.catch_warnings():  # gc walks objects whose attribute access warns
        warnings.simplefilter("ignore")
        everything = _storage_map(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    known = {**params, **grads, **opt}
    other = sum(v for k, v in everything.items() if k not in known)
    return {"params": sum(params.values()), "grads": sum(grads.values()),
            "optimizer": sum(opt.values()), "other": other}


def _recipe(args: argparse.Namespace, strategy: str, stage: int, world: int) -> Any:
    from ffdist import recipe_load

    return recipe_load.from_dict({
        "precision": args.precision, "model": {"name": args.model, "num_classes": 1000,
                                               "channels_last": False},
        "data": {"name": "synthetic", "batch_size": args.batch_per_rank * world},
        "optim": {"name": args.optimizer, "lr": 1e-3},
        "strategy": {"name": strategy, "zero_stage": stage},
    }, source="benchmarks/zero_memory.py")


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str,
          stage: int, queue: Any) -> None:
    # What torchrun would export; ffdist.dist reads it like any launcher's.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ffdist import assemble, dist, models, strategies
    from ffdist.engine import forward

    info = dist.init()
    rcp = _recipe(args, strategy, stage, world)
    torch.manual_seed(0)
    model = models.build(rcp.model)
    n_params, n_train = assemble.param_counts(model)
    strat = strategies.build(model, rcp, assemble.resolve_for(rcp, info), info)
    x = torch.randn(args.batch_per_rank, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch_per_rank,))
    result = None
    for step in range(3):
        with strat.no_sync(boundary=True):
            loss = torch.nn.functional.cross_entropy(forward(strat.model, x, strat).float(), y)
            strat.backward(loss)
        if step == 2:  # states exist (created by the first steps), grads not yet freed
            del loss
            result = measure(strat)
        strat.step(1e-3)
    if rank == 0:
        queue.put({"params_n": n_params, "trainable_n": n_train, **result})
    dist.barrier()
    dist.shutdown()


def run_case(args: argparse.Namespace, strategy: str, stage: int, world: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank, args=(world, port, args, strategy, stage, queue), nprocs=world,
                       join=True, start_method="spawn")
    return queue.get(timeout=60)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet152")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-per-rank", type=int, default=2)
    args = ap.parse_args(argv)
    cases = [("ddp", 0)] + [("deepspeed", s) for s in (1, 2, 3)]
    print(f"model {args.model}, {args.precision}, {args.optimizer}; MiB per rank, measured "
          "(formula = the strategy's model_state_bytes)")
    print(f"{'strategy':<9}{'N':>3}{'params':>16}{'grads':>16}{'optimizer':>16}"
          f"{'total':>16}{'ratio':>7}{'paper':>7}{'other':>8}")
    for world in (int(w) for w in args.world_sizes.split(",")):
        for strategy, stage in cases:
            m = run_case(args, strategy, stage, world)
            counts = (m["params_n"], m["trainable_n"], args.optimizer, args.precision, world)
            f = DeepSpeed.model_state_bytes(*counts, zero_stage=stage) if stage else \
                SingleDevice.model_state_bytes(*counts)
            total = m["params"] + m["grads"] + m["optimizer"]
            cells = "".join(f"{m[k] / MB:>8.0f}/{f[k] / MB:<7.0f}"
                            for k in ("params", "grads", "optimizer"))
            paper = paper_bytes_per_param(stage if strategy == "deepspeed" else 0, world)
            name = "ddp" if strategy == "ddp" else f"zero-{stage}"
            print(f"{name:<9}{world:>3}{cells}{total / MB:>8.0f}/{f['total'] / MB:<7.0f}"
                  f"{total / f['total']:>7.2f}{paper:>6.1f}Ψ{m['other'] / MB:>8.0f}",
                  flush=True)
    print("cells: measured/formula. ratio: measured total / formula total. paper: the ZeRO "
          "paper's bytes per parameter for mixed-precision Adam (K=12).")


if __name__ == "__main__":
    main()
