"""`ffdist plan`: model-state bytes against real tensors, ZeRO sharding, measured
activations, the recommendation, the command's output."""

from __future__ import annotations

import json

import pytest
import torch

from ffdist import plan, recipe_load
from ffdist.cli import main as cli
from ffdist.finetune import freeze
from ffdist.models import build
from ffdist.optim import build_optimizer
from ffdist.strategies.deepspeed import DeepSpeed
from ffdist.strategies.single import SingleDevice


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("opt,frozen", [("sgd", False), ("adamw", True)])
def test_state_bytes_match_real_tensors_after_a_step(opt: str, frozen: bool):
    rcp = recipe_load.load(None, [f"optim.name={opt}", "model.in_channels=1"])
    torch.manual_seed(0)
    model = build(rcp.model)
    if frozen:
        freeze(model, ["backbone"])
    optimizer = build_optimizer(model, rcp.optim, torch.device("cpu"))
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    params = list(model.parameters())
    # per-parameter states; AdamW's 0-d `step` counters are bookkeeping, not model states
    states = [v for s in optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]
    n = sum(p.numel() for p in params)
    t = sum(p.numel() for p in params if p.requires_grad)
    assert (t < n) == frozen
    est = SingleDevice.model_state_bytes(n, t, opt, "fp32", 1)
    assert est["params"] == _bytes(params)
    assert est["grads"] == _bytes(p.grad for p in params if p.grad is not None)
    assert est["optimizer"] == _bytes(states)
    assert est["total"] == est["params"] + est["grads"] + est["optimizer"]


def test_zero_stages_shard_in_order():
    n = t = 10_000_000
    rows = [DeepSpeed.model_state_bytes(n, t, "adamw", "bf16", 4, zero_stage=s) for s in (1, 2, 3)]
    z1, z2, z3 = rows
    # ZeRO paper, mixed-precision Adam: K = 12 bytes (fp32 master, m, v) per parameter
    assert z1["optimizer"] == 12 * t // 4 and z1["grads"] == 2 * t and z1["params"] == 2 * n
    assert z2["grads"] == 2 * t // 4 and z2["params"] == 2 * n
    assert z3["params"] == 2 * n // 4
    assert z1["total"] > z2["total"] > z3["total"]


def test_activations_are_measured_and_scale_with_pixels():
    torch.manual_seed(0)
    model = build(recipe_load.load(None, ["model.in_channels=1"]).model)
    small = plan.activation_bytes_per_sample(model, 1, 8, "fp32")
    large = plan.activation_bytes_per_sample(model, 1, 16, "fp32")
    assert small > 0 and 3.5 < large / small < 4.5  # conv activations grow with H*W


def test_recommendation():
    def rows(ddp: int, z: list[int]) -> dict:
        return {"DDP": {"total": ddp}, **{f"ZeRO-{i + 1}": {"total": v} for i, v in enumerate(z)}}

    gib = plan.GiB
    p = plan.MemoryEstimate(rows(31 * gib, [28 * gib, 21 * gib, 18 * gib]), activations=16 * gib,
                  per_sample=gib // 8)
    text = plan.recommend(p, 24 * gib, per_rank=128, micro=128)
    assert "DDP needs 31 GiB per GPU, the smallest GPU has 24 GiB" in text
    assert "strategy.zero_stage=2" in text  # ZeRO-1 (28 GiB) is over 90% of 24 GiB
    # states 15 GiB + m/8 GiB <= 21.6 GiB -> m <= 52; the largest divisor of 128: 32
    assert "data.micro_batch_size=32 (gradient accumulation 4)" in text
    assert "fits" in plan.recommend(p, 40 * gib, 128, 128)
    assert plan.parse_size("24GiB") == 24 * gib == plan.parse_size("24G")
    assert plan.parse_size("80GB") == 80 * 10**9


def test_plan_command(capsys):
    assert cli(["plan", "recipes/digits.yaml", "model.freeze=[backbone]", "--world-size", "4",
                "--gpu-mem", "4MiB"]) == 0
    out = capsys.readouterr().out
    model = build(recipe_load.load("recipes/digits.yaml").model)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert f"{total:,} total, {head:,} trainable" in out
    assert "4 device(s) (--gpus 4)" in out and "global 64 = 16/device" in out
    assert "ZeRO-3" in out and "the smallest GPU has 4 MiB" in out


def _plan(rows_total: int, per_sample: int) -> plan.MemoryEstimate:
    """A plan whose model states are `rows_total` minus the activations of micro batch 128."""
    acts = per_sample * 128
    rows = {name: {"total": rows_total} for name in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")}
    return plan.MemoryEstimate(rows, activations=acts, per_sample=per_sample)


def test_an_accumulating_recipe_is_told_when_a_larger_micro_batch_fits():
    """The recipe's own micro batch x accumulation is judged: 512 per device as 128 x 4, with
    2 GiB of states and 32 MiB per sample (4 GiB at 128): 16 GiB holds 256 (10 GiB), not 512
    (18 GiB); 80 GiB holds 512 in one step. Where nothing larger fits: no change."""
    gib = plan.GiB
    p = _plan(6 * gib, gib // 32)
    text = plan.recommend(p, 16 * gib, per_rank=512, micro=128)
    assert "(recipe: micro batch 128 x 4 accumulation)" in text
    assert "it fits, and so does micro batch 256: data.micro_batch_size=256 gives 2 " \
           "accumulation step(s) instead of 4" in text
    text = plan.recommend(p, 80 * gib, per_rank=512, micro=128)
    assert "data.micro_batch_size=512 gives 1 accumulation step(s) instead of 4" in text
    assert "no change needed" in plan.recommend(p, 7 * gib, per_rank=512, micro=128)  # 6.3 usable
    assert "no change needed" in plan.recommend(p, 80 * gib, per_rank=128, micro=128)  # no accum


def test_an_accumulating_recipe_that_does_not_fit_gets_a_smaller_micro_batch():
    gib = plan.GiB
    p = _plan(6 * gib, gib // 32)  # 2 GiB states + 32 MiB/sample; 4 GiB x 0.9 = 3.6 GiB usable
    text = plan.recommend(p, 4 * gib, per_rank=512, micro=128)
    assert "(recipe: micro batch 128 x 4 accumulation): use " in text
    assert "data.micro_batch_size=32 (gradient accumulation 16)" in text  # 2 + 1 GiB <= 3.6


def test_a_zero_recipe_is_judged_on_its_own_row():
    gib = plan.GiB
    rows = {"DDP": {"total": 30 * gib}, "ZeRO-1": {"total": 25 * gib},
            "ZeRO-2": {"total": 20 * gib}, "ZeRO-3": {"total": 12 * gib}}
    p = plan.MemoryEstimate(rows, activations=4 * gib, per_sample=gib // 32)
    text = plan.recommend(p, 16 * gib, per_rank=128, micro=128, row="ZeRO-2")
    assert text.startswith("ZeRO-2 needs 20 GiB per GPU") and "zero_stage=3" in text
    assert "zero_stage=1" not in text  # never a stage below the recipe's
    # it fits: the rows that keep more per device and fit too are named, with their overrides
    text = plan.recommend(p, 30 * gib, per_rank=128, micro=128, row="ZeRO-3")
    assert text.endswith("no change needed. ZeRO-1 (strategy.name=deepspeed "
                         "strategy.zero_stage=1) or ZeRO-2 (strategy.name=deepspeed "
                         "strategy.zero_stage=2) would also fit at micro batch 128."), text
    text = plan.recommend(p, 40 * gib, per_rank=128, micro=128, row="ZeRO-2")
    assert "DDP (strategy.name=ddp) or ZeRO-1 (" in text and "ZeRO-3 (" not in text
    assert "would also fit" not in plan.recommend(p, 40 * gib, per_rank=128, micro=128)
    rcp = recipe_load.load("recipes/digits_zero2.yaml")
    from ffdist.assemble import resolve

    assert plan.recipe_row(rcp, resolve(rcp, 2, torch.device("cpu"))) == "ZeRO-2"
    rcp = recipe_load.load("recipes/digits.yaml")
    assert plan.recipe_row(rcp, resolve(rcp, 2, torch.device("cpu"))) == "DDP"


def test_gpus_is_world_size_and_progress_goes_to_stderr(capfd):
    """--gpus N and --world-size N are one flag; what plan is doing goes to stderr, so that
    --json stays one JSON object on stdout."""
    import json

    outs = []
    for flag in ("--gpus", "--world-size"):
        assert cli(["plan", "recipes/digits.yaml", flag, "2", "--json"]) == 0
        out, err = capfd.readouterr()
        outs.append(json.loads(out))
        assert "plan: measuring small_cnn activations at 8x8" in err
        assert err.splitlines()[-1].startswith("plan: done in ")
    assert outs[0] == outs[1] and outs[0]["world_size"] == 2 and outs[0]["per_rank"] == 32
    assert outs[0]["world_source"] == "--gpus 2"
    with pytest.raises(SystemExit) as stop:  # argparse's --help
        cli(["plan", "--help"])
    assert stop.value.code == 0
    text = " ".join(capfd.readouterr().out.split())
    assert "--gpus N, --world-size N" in text and "plan for N devices in total" in text


@pytest.mark.parametrize("nproc,expect", [
    (None, "1 device(s) (no GPU visible: 1 CPU rank(s) (launch.nproc=null: one); for GPUs: --gpus N)"),
    (2, "2 device(s) (no GPU visible: 2 CPU rank(s) (launch.nproc=2); for GPUs: --gpus N)"),
])
def test_without_gpus_plan_says_what_it_plans_for_and_why(nproc, expect):
    """No GPU visible (CUDA_VISIBLE_DEVICES empty): the world is ffdist launch's (launch.nproc
    CPU ranks, null: one), said as such, with the way to plan for GPUs."""
    import sys

    from tests.helpers import run

    args = [] if nproc is None else [f"launch.nproc={nproc}"]
    proc = run([sys.executable, "-m", "ffdist.cli", "plan", "recipes/digits.yaml", *args],
               CUDA_VISIBLE_DEVICES="")
    world = [ln for ln in proc.stdout.splitlines() if ln.startswith("world")]
    assert world == [f"world      {expect}"], proc.stdout


def test_fsdp_row_and_activation_checkpointing_in_the_plan(capsys):
    """The FSDP row (sharded states plus one gathered block: ffdist.strategies.fsdp) is
    printed beside DDP's and ZeRO's, and activations are measured with the recipe's
    activation checkpointing applied: vit_tiny's blocks keep only their input."""
    args = ["plan", "recipes/vit_b16_fsdp.yaml", "data.name=synthetic", "data.image_size=32",
            "model.name=vit_tiny", "model.num_classes=10", "--gpus", "4", "--json"]
    assert cli(args) == 0
    checkpointed = json.loads(capsys.readouterr().out)
    assert checkpointed["judged_row"] == "FSDP" and checkpointed["blocks"] == 6
    rows = checkpointed["rows"]
    assert list(rows) == ["DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP"]
    n, block = checkpointed["params"], 444_864  # vit_tiny: 6 blocks of 444,864
    assert rows["FSDP"]["optimizer"] == -(-8 * n // 4)  # AdamW, fp32 shards over 4
    assert rows["FSDP"]["params"] == -(-4 * n // 4) + 2 * (n - 5 * block)  # + root, a block
    assert rows["FSDP"]["total"] < rows["DDP"]["total"]
    assert cli([*args[:6], "model.activation_checkpointing=none", *args[6:]]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert checkpointed["activations_per_sample"] < plain["activations_per_sample"] / 5


def test_a_recipe_that_does_not_fit_is_told_each_strategy_that_fits():
    """For each strategy after the recipe's own, its first row that fits: a DDP recipe on a
    16 GiB GPU hears of ZeRO-3 and of FSDP (the first ZeRO row that fits, not ZeRO-1/2)."""
    gib = plan.GiB
    rows = {"DDP": {"total": 30 * gib}, "ZeRO-1": {"total": 25 * gib},
            "ZeRO-2": {"total": 20 * gib}, "ZeRO-3": {"total": 12 * gib},
            "FSDP": {"total": 13 * gib}}
    p = plan.MemoryEstimate(rows, activations=4 * gib, per_sample=gib // 32)
    text = plan.recommend(p, 16 * gib, per_rank=128, micro=128)
    assert "use strategy.name=deepspeed strategy.zero_stage=3 or strategy.name=fsdp" in text
    assert "zero_stage=2" not in text
    text = plan.recommend(p, 16 * gib, per_rank=128, micro=128, row="ZeRO-2")
    assert "zero_stage=3 or strategy.name=fsdp" in text  # its own strategy's next row too
