"""`ffdist plan`: model-state bytes against real tensors, ZeRO sharding, measured
activations, the recommendation, the command's output."""

from __future__ import annotations

import pytest
import torch

from ffdist import plan, recipe
from ffdist.cli import main as cli
from ffdist.finetune import freeze
from ffdist.models import build
from ffdist.optim import build_optimizer


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("opt,frozen", [("sgd", False), ("adamw", True)])
def test_state_bytes_match_real_tensors_after_a_step(opt: str, frozen: bool):
    rcp = recipe.load(None, [f"optim.name={opt}", "model.in_channels=1"])
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
    est = plan.model_state_bytes(n, t, opt, "fp32", "ddp", 0, 1)
    assert est["params"] == _bytes(params)
    assert est["grads"] == _bytes(p.grad for p in params if p.grad is not None)
    assert est["optimizer"] == _bytes(states)
    assert est["total"] == est["params"] + est["grads"] + est["optimizer"]


def test_zero_stages_shard_in_order():
    n = t = 10_000_000
    rows = [plan.model_state_bytes(n, t, "adamw", "bf16", "deepspeed", s, 4) for s in (1, 2, 3)]
    z1, z2, z3 = rows
    # ZeRO paper, mixed-precision Adam: K = 12 bytes (fp32 master, m, v) per parameter
    assert z1["optimizer"] == 12 * t // 4 and z1["grads"] == 2 * t and z1["params"] == 2 * n
    assert z2["grads"] == 2 * t // 4 and z2["params"] == 2 * n
    assert z3["params"] == 2 * n // 4
    assert z1["total"] > z2["total"] > z3["total"]


def test_activations_are_measured_and_scale_with_pixels():
    torch.manual_seed(0)
    model = build(recipe.load(None, ["model.in_channels=1"]).model)
    small = plan.activation_bytes_per_sample(model, 1, 8, "fp32")
    large = plan.activation_bytes_per_sample(model, 1, 16, "fp32")
    assert small > 0 and 3.5 < large / small < 4.5  # conv activations grow with H*W


def test_recommendation():
    def rows(ddp: int, z: list[int]) -> dict:
        return {"DDP": {"total": ddp}, **{f"ZeRO-{i + 1}": {"total": v} for i, v in enumerate(z)}}

    gib = plan.GiB
    p = plan.Plan(rows(31 * gib, [28 * gib, 21 * gib, 18 * gib]), activations=16 * gib,
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
    model = build(recipe.load("recipes/digits.yaml").model)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert f"{total:,} total, {head:,} trainable" in out
    assert "4 device(s) (--world-size)" in out and "global 64 = 16/device" in out
    assert "ZeRO-3" in out and "the smallest GPU has 4 MiB" in out
