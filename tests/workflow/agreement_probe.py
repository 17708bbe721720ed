"""What each entry point decides about a run, measured in a fresh process whose environment
is the launcher's (ACCELERATE_MIXED_PRECISION, torchrun's RANK/WORLD_SIZE, ...):

    python -m tests.workflow.agreement_probe CASES.json OUT.json
    torchrun --nproc_per_node 2 -m tests.workflow.agreement_probe CASES.json OUT.json

CASES.json: [{"recipe": path, "overrides": [...]}, ...]. For every case, the outcome of
ffdist.assemble.resolve, `ffdist plan --json`, bench's setup, eval's setup and train's
setup: the exit code and error line they give, or the facts they use (batch plan,
precision, strategy, image size, parameter counts, and what the built objects really do
with them). Rank 0 writes OUT.json. Used by test_agreement.py; asserts nothing itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

CORE = ("global_batch", "world_size", "per_rank", "micro", "accum", "precision", "strategy",
        "image_size")
DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def ours(stderr: str) -> str:
    """ffdist's own lines (libraries log to stderr too)."""
    return "\n".join(ln for ln in stderr.splitlines() if ln.startswith("ffdist: "))


def outcome(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """{"code", "error", "facts"}: through the one error printer, as a command would."""
    from ffdist.errors import guard

    box: dict[str, Any] = {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = guard(lambda: box.update(facts=fn()))
    return {"code": code, "error": ours(err.getvalue()), **box}


def of_resolved(resolved: Any) -> dict[str, Any]:
    return {k: v for k, v in resolved.to_dict().items() if k in CORE}


def counts(model: torch.nn.Module) -> dict[str, int]:
    from ffdist.assemble import param_counts

    params, trainable = param_counts(model)
    return {"params": params, "trainable_params": trainable}


def forward_dtype(numerics: Any) -> str:
    """The dtype a forward pass really computes in, under this strategy's numerics."""
    x = numerics.cast_inputs(torch.ones(1, 4, device=numerics_device(numerics)))
    with numerics.autocast():
        y = torch.nn.functional.linear(x, torch.ones(4, 4, dtype=x.dtype, device=x.device))
    return DTYPE[y.dtype]


def numerics_device(numerics: Any) -> torch.device:
    return next(numerics.unwrap().parameters()).device


def of_trainer(trainer: Any) -> dict[str, Any]:
    """The Trainer's resolved facts, and what its data streams and strategy do with them."""
    s = trainer.strategy
    out = {**of_resolved(trainer.resolved), **counts(s.unwrap()),
           "loader_micro": len(next(iter(trainer.data.train))[1]),
           "loader_plan": trainer.data.train.plan == trainer.resolved.plan,
           "spec_image_size": trainer.data.spec.image_size, "forward_dtype": forward_dtype(s),
           "strategy_class": type(s).__name__}
    if hasattr(s, "config"):  # DeepSpeed: the config it was initialized with
        c = s.config
        out["ds"] = [c["train_batch_size"], c["train_micro_batch_size_per_gpu"],
                     c["gradient_accumulation_steps"], c["bf16"]["enabled"], c["fp16"]["enabled"]]
    else:
        out["scaler"] = s.scaler is not None
    return out


def plan_json(recipe: str, overrides: list[str], world: int) -> dict[str, Any]:
    from ffdist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", recipe, *overrides, "--world-size", str(world), "--json"])
    facts = json.loads(out.getvalue()) if code == 0 else None
    result = {"code": code, "error": ours(err.getvalue())}
    if facts is not None:
        keep = (*CORE, "params", "trainable_params")
        result["facts"] = {k: facts[k] for k in keep}
    return result


def probe(case: dict[str, Any], info: Any) -> dict[str, Any]:
    from ffdist import assemble, bench, bench_report, evaluate, recipe_load, train

    rcp = recipe_load.load(case["recipe"], case["overrides"])
    bench_args = argparse.Namespace(steps=1, warmup=0)

    def bench_setup() -> dict[str, Any]:
        trainer = bench.setup(rcp, info)
        d = bench_report.describe(trainer, bench_args)  # what bench.json reports
        reported = {"global_batch": d["batch_size"], "world_size": d["world_size"],
                    "per_rank": d["per_rank_batch"], "micro": d["micro_batch_size"],
                    "accum": d["accum"], "precision": d["precision"], "strategy": d["strategy"],
                    "image_size": d["image_size"], "params": d["params"],
                    "trainable_params": d["trainable_params"]}
        return {**of_trainer(trainer), "reported": reported}

    def eval_setup() -> dict[str, Any]:
        s = evaluate.setup(rcp, info)
        return {**of_resolved(s.resolved), **counts(s.model),
                "loader_plan": s.data.train.plan == s.resolved.plan}

    def train_setup() -> dict[str, Any]:
        trainer, _ = train.build(rcp, info)  # train.run builds the run with it
        trainer.monitor.close()
        return of_trainer(trainer)

    launcher = info.launcher_precision
    return {
        "resolve": outcome(lambda: of_resolved(
            assemble.resolve(rcp, info.world_size, info.device, launcher))),
        "resolve_eval": outcome(lambda: of_resolved(
            assemble.resolve(rcp, info.world_size, info.device, launcher, trains=False))),
        "plan": plan_json(case["recipe"], case["overrides"], info.world_size),
        "bench": outcome(bench_setup), "eval": outcome(eval_setup),
        "train": outcome(train_setup), "device": info.device.type}


def main(argv: list[str]) -> int:
    from ffdist import dist
    from ffdist.recipe import LaunchConfig

    cases = json.loads(open(argv[0]).read())
    info = dist.init(LaunchConfig(pg_timeout=120))
    # No dist.shutdown between cases: DeepSpeed keeps its process groups in globals, and a
    # second engine after a torn-down group fails; one group serves every case.
    results = [probe(case, info) for case in cases]
    if info.is_primary:
        with open(argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
