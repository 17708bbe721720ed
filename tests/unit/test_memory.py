"""The strategies' memory models (single/DDP, DeepSpeed ZeRO; built from ffdist.memory's
pieces) against real tensors of a small model and the ZeRO paper (one process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffdist.memory import paper_bytes_per_param
from ffdist.strategies.deepspeed import DeepSpeed
from ffdist.strategies.single import SingleDevice


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 10))
    m[0].requires_grad_(False)  # a frozen part: no grads, no optimizer state
    return m


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name, make", [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
])
def test_ddp_formula_equals_the_bytes_of_real_params_grads_and_optimizer_state(name, make):
    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make(trainable)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()  # creates the optimizer state
    state = [t for s in opt.state.values() for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]  # AdamW's scalar `step` aside
    measured = {"params": _nbytes(model.parameters()),
                "grads": _nbytes(p.grad for p in trainable),
                "optimizer": _nbytes(state)}
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    for precision in ("fp32", "bf16"):  # DDP keeps fp32 weights under autocast
        f = SingleDevice.model_state_bytes(n_all, n_train, name, precision, 2)
        assert {k: f[k] for k in measured} == measured
        assert f["total"] == sum(measured.values())


def test_bf16_weights_and_fp32_master_copy_match_deepspeed_stage0():
    """DeepSpeed's bf16 layout: bf16 module weights and grads, fp32 master + AdamW states."""
    model = _model().to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone() for p in trainable]
    states = [torch.zeros_like(m) for m in master for _ in range(2)]
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    f = DeepSpeed.model_state_bytes(n_all, n_train, "adamw", "bf16", 1, zero_stage=0)
    assert f["params"] == _nbytes(model.parameters())
    assert f["grads"] == _nbytes(trainable)  # bf16 gradients have the params' size
    assert f["optimizer"] == _nbytes(master) + _nbytes(states)


def test_zero_stages_partition_what_the_paper_says():
    psi, n = 1_000_000, 4
    base = DeepSpeed.model_state_bytes(psi, psi, "adamw", "bf16", n, zero_stage=0)
    assert base["total"] == 16 * psi  # the paper's 2 + 2 + 12
    for stage in (1, 2, 3):
        f = DeepSpeed.model_state_bytes(psi, psi, "adamw", "bf16", n, zero_stage=stage)
        assert f["total"] == pytest.approx(paper_bytes_per_param(stage, n) * psi, abs=4)
    z1 = DeepSpeed.model_state_bytes(psi, psi, "adamw", "bf16", n, zero_stage=1)
    z2 = DeepSpeed.model_state_bytes(psi, psi, "adamw", "bf16", n, zero_stage=2)
    assert z1["optimizer"] == base["optimizer"] // n and z1["grads"] == base["grads"]
    assert z2["grads"] == base["grads"] // n
    fp32_sgd = DeepSpeed.model_state_bytes(psi, psi, "sgd", "fp32", 2, zero_stage=3)
    assert fp32_sgd == {"params": 2 * psi, "grads": 2 * psi, "optimizer": 4 * psi,
                        "total": 8 * psi}  # (4 + 4 + 4 master + 4 momentum) / 2


def test_unknown_names_are_refused():
    with pytest.raises(ValueError):
        SingleDevice.model_state_bytes(10, 10, "lion", "fp32", 1)
    with pytest.raises(ValueError):
        SingleDevice.model_state_bytes(10, 10, "sgd", "fp8", 1)
    with pytest.raises(ValueError):
        DeepSpeed.model_state_bytes(10, 10, "sgd", "fp8", 1)
