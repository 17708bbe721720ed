"""What `ffdist bench` reports: each rank's figures and the global ones (a step ends when
the slowest rank's does), achieved TFLOP/s and MFU, what was timed (bench.json's
description of the run), and the table printed for people.

Achieved TFLOP/s: the FLOPs of one step (ffdist.flops, FlopCounterMode, forward + backward)
over the median step; MFU: that over the GPU's dense bf16/fp16 (TF32 for fp32) peak, for
GPUs in ffdist.flops.PEAKS.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch

from ffdist.bench_timing import Side, percentile

if TYPE_CHECKING:
    from ffdist.engine import Trainer


def rank_figures(side: Side, eval_images: int, eval_s: float, per_rank_batch: int) -> dict[str, Any]:
    steps, total = len(side.step_s), sum(side.step_s)
    return {"train_images_per_s": per_rank_batch * steps / side.elapsed_s,
            "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
            "eval_images": eval_images, "eval_s": eval_s,
            "data_wait_fraction": min(sum(side.wait_s) / total, 1.0) if total else 0.0,
            "step_ms_p50": 1000 * percentile(side.step_s, 50),
            "step_ms_p90": 1000 * percentile(side.step_s, 90),
            "elapsed_s": side.elapsed_s, "peak_mem_bytes": side.peak_mem,
            "step_ms": [round(1000 * s, 3) for s in side.step_s], "gpu": side.gpu}


def combine(ranks: list[dict[str, Any]], global_batch: int, steps: int) -> dict[str, Any]:
    """Global figures from every rank's: a step ends when the slowest rank's ends."""
    slowest = max(r["elapsed_s"] for r in ranks)
    per_step = [max(r["step_ms"][i] for r in ranks) for i in range(steps)]
    eval_s = max(r["eval_s"] for r in ranks)
    eval_images = sum(r["eval_images"] for r in ranks)
    p50 = percentile(per_step, 50)
    out = {"train_images_per_s": global_batch * steps / slowest,
           "train_images_per_s_p50": global_batch / (p50 / 1000) if p50 > 0 else 0.0,
           "eval_images_per_s": eval_images / eval_s if eval_s > 0 else 0.0,
           "data_wait_fraction": sum(r["data_wait_fraction"] for r in ranks) / len(ranks),
           "step_ms_p50": p50, "step_ms_p90": percentile(per_step, 90),
           "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks)}
    gpus = [r["gpu"] for r in ranks if r["gpu"]]
    if gpus and all("gpu_util_percent" in g for g in gpus):
        out["gpu_util_percent"] = sum(g["gpu_util_percent"] for g in gpus) / len(gpus)
        out["gpu_mem_used_bytes"] = max(g["gpu_mem_used_bytes"] for g in gpus)
    return out


def pipeline(ranks: list[dict[str, Any]], resolved: Any) -> dict[str, Any]:
    """The input pipeline alone against the step alone, over every rank (each rank's
    pipeline feeds its own step, so the slowest one's sets the pace: world x its rate),
    and which of the two bounds the run."""
    world = len(ranks)
    pipe = world * min(r["images_per_s"] for r in ranks)
    step = world * min(r["step_alone_images_per_s"] for r in ranks)
    cores = [r["cores"] for r in ranks]
    counts = [r["counts"] for r in ranks if r["counts"]]
    out = {"images_per_s": pipe, "step_alone_images_per_s": step,
           "cores": sum(cores) if None not in cores else None,
           "bound_by": "input pipeline" if pipe < step else "step",
           "decode": resolved.decode, "decode_why": resolved.decode_why,
           "decoder": ranks[0]["decoder"], "device": resolved.device.type}
    if counts:
        out["decoded"] = {k: sum(c[k] for c in counts) for k in counts[0]}
    other = [r["other"] for r in ranks if "other" in r]
    if other and "refused" in other[0]:
        out["other"] = other[0]
    elif other:
        rate = world * min(o["images_per_s"] for o in other)
        cores = [o["cores"] for o in other]
        out["other"] = {"decode": other[0]["decode"], "images_per_s": rate,
                        "cores": sum(cores) if None not in cores else None,
                        "decoder": other[0]["decoder"], "vs_run": rate / pipe if pipe else 0.0}
    return out


DECODE_WHERE = {"cpu": "loader workers decode + crop",
                "gpu": "workers read bytes + draw boxes, the GPU decodes + crops",
                "boxes": "workers read bytes + draw boxes, the training process decodes + "
                         "crops on the CPU"}


def _pipeline_rows(p: dict[str, Any], workers: int) -> list[tuple[str, str]]:
    cores = f"{p['cores']:.1f} CPU cores busy" if p["cores"] is not None else "CPU use unknown"
    decoded = p.get("decoded")
    host = f"; {decoded['host']} of {decoded['host'] + decoded['device']} images decoded " \
           "by the workers (not baseline RGB JPEGs)" if decoded and decoded["host"] else ""
    rows = [("input pipeline", f"{p['images_per_s']:.1f} images/s alone, data.decode="
                               f"{p['decode']} ({DECODE_WHERE[p['decode']]}), {cores} "
                               f"(training process + {workers} workers per rank){host}"),
            ("step alone", f"{p['step_alone_images_per_s']:.1f} images/s on batches already "
                           "on the device")]
    other = p.get("other")
    if other and "refused" in other:
        rows.append((f"data.decode={other['decode']}", f"not measured: {other['refused']}"))
    elif other:
        busy = f"{other['cores']:.1f} CPU cores busy" if other["cores"] is not None else \
            "CPU use unknown"
        rows.append((f"data.decode={other['decode']}",
                     f"{other['images_per_s']:.1f} images/s alone "
                     f"({DECODE_WHERE[other['decode']]}), {busy}: x{other['vs_run']:.2f} of "
                     f"data.decode={p['decode']}'s, measured in this run"))
    if p["bound_by"] == "input pipeline":
        rows.append(("bound by", f"the input pipeline: {_remedy(p)} (docs/performance.md)"))
    else:
        rows.append(("bound by", "the step (the input pipeline keeps up)"))
    return rows


def _remedy(p: dict[str, Any]) -> str:
    """What speeds up an input pipeline that bounds the run, for its data.decode setting."""
    smaller = "smaller stored images (`ffdist shard --max-size`)"
    if p["decode"] == "boxes":
        return "data.decode=cpu (boxes decodes in the training process, on the CPU)"
    if p["decode"] == "gpu":
        return f"more data.num_workers (they read files and draw boxes) or {smaller}"
    gpu = ", data.decode=gpu" if p.get("device") == "cuda" else ""
    return f"more data.num_workers{gpu} or {smaller}"


def flop_figures(flops_per_rank_step: int, step_ms: float, device: torch.device,
                 precision: str) -> dict[str, Any]:
    """Achieved TFLOP/s per device at the median step, and MFU on a known GPU."""
    from ffdist.flops import peak_tflops

    achieved = flops_per_rank_step / (step_ms / 1000) / 1e12 if step_ms > 0 else 0.0
    out: dict[str, Any] = {"flops_per_step": flops_per_rank_step, "tflops_per_device": achieved,
                           "peak_tflops": None, "mfu": None, "peak_of": None}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["gpu_name"] = name
        peak = peak_tflops(name, precision)
        if peak is not None:
            out["peak_of"], out["peak_tflops"] = f"{peak[0]} {precision} dense", peak[1]
            out["mfu"] = achieved / peak[1]
    return out


def describe(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """What was timed: the resolved run and the model (bench.json's non-figures)."""
    from ffdist.assemble import param_counts
    from ffdist.summary import regularization

    rcp, res, p = trainer.recipe, trainer.resolved, trainer.plan
    params, trainable = param_counts(trainer.strategy.unwrap())
    return {"world_size": trainer.info.world_size, "model": rcp.model.name,
            "params": params, "trainable_params": trainable, "freeze": list(rcp.model.freeze),
            "batch_size": p.global_batch, "per_rank_batch": p.per_rank,
            "micro_batch_size": p.micro, "accum": p.accum, "precision": res.precision,
            "channels_last": rcp.model.channels_last, "compile": rcp.model.compile,
            "optimizer": f"{rcp.optim.name} ({_impl(trainer.strategy.optimizer)})",
            "strategy": res.strategy, "data": rcp.data.name,
            "synthetic": bool(getattr(args, "synthetic", False)),
            "image_size": res.image_size, "device": trainer.info.device.type,
            "steps": args.steps, "warmup": args.warmup, "reps": getattr(args, "reps", 1),
            "num_workers": res.workers,
            # timed inside the step: the mixing of every micro-batch, the EMA update
            "mixup": trainer.mixer is not None, "ema": trainer.ema is not None,
            "ema_every_steps": rcp.optim.ema_every_steps if trainer.ema is not None else None,
            "regularization": regularization(rcp, res.image_size),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _impl(opt: Any) -> str:
    defaults = getattr(opt, "defaults", {})
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else \
        type(opt).__name__  # a strategy's own optimizer (DeepSpeed's ZeRO optimizer)


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures of one precision's run, as table rows."""
    mib = 1 / 2**20
    rows = [("train images/s", f"{r['train_images_per_s']:.1f} (at the median step "
                               f"{r['train_images_per_s_p50']:.1f})"),
            ("eval images/s", f"{r['eval_images_per_s']:.1f}"),
            ("data wait", f"{100 * r['data_wait_fraction']:.1f}% of step time"),
            ("step ms p50 / p90", f"{r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f} "
                                  f"(p90/p50 {r['step_ms_p90'] / r['step_ms_p50']:.3f})"),
            ("peak memory", f"{r['peak_mem_bytes'] * mib:.0f} MiB")]
    if "tflops_per_device" in r:
        mfu = (f", MFU {100 * r['mfu']:.1f}% of {r['peak_of']} {r['peak_tflops']:g}"
               if r.get("mfu") is not None else ", MFU: no peak known for this device")
        rows.append(("TFLOP/s per device", f"{r['tflops_per_device']:.2f} "
                                           f"({r['flops_per_step'] / 1e9:,.1f} GFLOP/step{mfu})"))
    if "reference" in r:
        ref = r["reference"]
        rows.append(("hand-written loop", f"{ref['train_images_per_s']:.1f} images/s, step "
                                          f"p50 {ref['step_ms_p50']:.1f} ms"))
        rows.append(("ffdist / loop", f"{r['ratio_vs_reference']:.3f} (median steps)"))
    if "gpu_util_percent" in r:
        rows.append(("GPU util / memory", f"{r['gpu_util_percent']:.0f}% / "
                                          f"{r['gpu_mem_used_bytes'] * mib:.0f} MiB"))
    return rows


def table(r: dict[str, Any]) -> str:
    head = [("model", f"{r['model']} ({r['strategy']}, "
                      f"{'channels_last' if r['channels_last'] else 'NCHW'}"
                      f"{', compiled' if r['compile'] else ''}, {r['optimizer']})"),
            ("data", f"{'device-made batches' if r['synthetic'] else r['data']} "
                     f"{r['image_size']}px, workers {r['num_workers']}"),
            ("regularize", r["regularization"] + (" (mixing and EMA update timed in the step)"
                                                  if r["mixup"] or r["ema"] else "")),
            ("parameters", f"{r['params']:,} ({r['trainable_params']:,} trainable"
                           f"{', freeze ' + str(r['freeze']) if r['freeze'] else ''})"),
            ("world size x device", f"{r['world_size']} x {r['device']}"
                                    f"{' (' + r['gpu_name'] + ')' if r.get('gpu_name') else ''}"),
            ("batch (global)", f"{r['batch_size']} = {r['per_rank_batch']}/rank "
                               f"({r['micro_batch_size']} x {r['accum']} accum)"),
            ("timed", f"{r['steps']} steps x {r['reps']} repetitions, {r['warmup']} warm-up"),
            ("memory", "CUDA allocated" if r["device"] == "cuda" else "peak RSS")]
    runs = r.get("runs", [r])
    names = [k for k, _ in _rows(runs[0])]
    cols = [dict(_rows(x)) for x in runs]
    if len(runs) == 1:
        body = [("precision", r["precision"]), *_rows(r)]
    else:
        body = [("precision", " | ".join(x["precision"] for x in runs))]
        body += [(k, " | ".join(c.get(k, "-") for c in cols)) for k in names]
    rows = head + body
    if "pipeline" in r:
        rows += _pipeline_rows(r["pipeline"], r["num_workers"])
    if r["world_size"] > 1:
        rows.append(("per-rank images/s",
                     ", ".join(f"{x['train_images_per_s']:.1f}" for x in r["ranks"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
