"""The optimizer step skipped on the device (ffdist.optim.step_unless, SingleDevice.step).

torch's fused SGD/Adam/AdamW kernels exist on the CPU too (torch >= 2.4), with the same
found_inf early return as on CUDA, so the CPU runs the very path a GPU runs; the `gpu`
parameters repeat it on CUDA. What is proved:

- the root cause: torch's own fused SGD, skipped on its first step, keeps uninitialised
  momentum buffers in its state (so the next applied step is momentum * garbage + g);
- ffdist's skip is exact: with skips at steps 1, 4 and 5 the weights and optimizer state
  equal, bit for bit, the same fused optimizer stepped on the host only at the applied steps;
- fp16: GradScaler overflow steps and NaN-loss steps leave weights, optimizer state and
  momentum untouched, report applied == 0, and the run equals the stock PyTorch AMP recipe
  (GradScaler.step with a non-fused, foreach=False optimizer) to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ffdist import assemble, recipe_load
from ffdist.dist import DistInfo
from ffdist.optim import skips_on_device
from ffdist.strategies.single import SingleDevice

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
OPTIMS = ["sgd", "sgd_nesterov", "adamw"]
LR, WD, STEPS = 0.05, 1e-4, 7


def _model() -> nn.Module:
    # no bias before BatchNorm (as in real nets): its gradient is ~0, rounding noise, which
    # Adam's normalisation turns into full-size steps that differ between any two kernels
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5))


def _batches(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g).to(device, memory_format=torch.channels_last),
             torch.randint(0, 5, (16,), generator=g).to(device)) for _ in range(STEPS)]


def _overrides(name: str, precision: str) -> list[str]:
    return [f"optim.name={name.split('_')[0]}", f"optim.nesterov={'nesterov' in name}",
            f"optim.lr={LR}", f"optim.weight_decay={WD}", f"precision={precision}",
            "model.channels_last=true"]


def _ffdist(device: str, name: str, precision: str) -> SingleDevice:
    rcp = recipe_load.load(None, _overrides(name, precision))
    dev = torch.device(device)
    resolved = assemble.resolve(rcp, 1, dev)
    return SingleDevice(_model(), rcp, resolved, DistInfo(0, 0, 1, 1, dev, "none"))


def _stock(device: str, name: str, fused: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer a user builds by hand (ffdist's param groups: no decay on
    biases and norms), fused or the reference non-fused single-tensor implementation."""
    from ffdist.optim import param_groups

    model = _model().to(device, memory_format=torch.channels_last)
    impl = {"fused": True} if fused else {"foreach": False}
    groups = param_groups(model, WD)
    if name == "adamw":
        return model, torch.optim.AdamW(groups, lr=LR, **impl)
    return model, torch.optim.SGD(groups, lr=LR, momentum=0.9, nesterov=name == "sgd_nesterov",
                                  **impl)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": copy.deepcopy(model.state_dict()),
            "optim": copy.deepcopy(opt.state_dict()["state"])}


def _assert_same(a: dict, b: dict, exact: bool = True) -> None:
    def check(x, y, where):
        if exact:
            assert torch.equal(x.cpu(), y.cpu()), where
        else:  # kernel rounding (fused: double lr*g, stock: float fma), ~1e-8 here
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=1e-5, atol=1e-6, msg=where)

    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        check(a["model"][k], b["model"][k], k)
    assert a["optim"].keys() == b["optim"].keys()
    for i in a["optim"]:
        assert a["optim"][i].keys() == b["optim"][i].keys(), i
        for k in a["optim"][i]:
            check(torch.as_tensor(a["optim"][i][k]).float(),
                  torch.as_tensor(b["optim"][i][k]).float(), f"state {i} {k}")


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    with autocast:
        logits = model(x)
    return nn.functional.cross_entropy(logits.float(), y)


def test_torch_fused_sgd_keeps_uninitialised_momentum_after_a_skipped_first_step() -> None:
    """The root cause, in torch itself (torch/optim/sgd.py `_fused_sgd`, CPU kernel): a
    found_inf first step allocates the momentum buffers with empty_like, the kernel returns
    early, and the buffers stay in the state as if initialised. If this test fails, torch
    has fixed it and ffdist.optim.init_momentum_buffers may go."""
    model, opt = _stock("cpu", "sgd", fused=True)
    x, y = _batches("cpu")[0]
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped
    assert all(opt.state[p].get("momentum_buffer") is not None for p in model.parameters()), \
        "torch no longer leaves momentum buffers behind a skipped first step"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMS)
def test_device_skip_equals_the_fused_optimizer_stepped_only_when_applied(
        device: str, name: str) -> None:
    """fp32, skips at steps 1, 4, 5 (the first step too): every step, bit for bit, the
    weights and optimizer state of torch's fused optimizer stepped on the host only at the
    applied steps."""
    skips = {1, 4, 5}
    ours = _ffdist(device, name, "fp32")
    assert skips_on_device(ours.optimizer) and ours.optimizer.defaults["fused"]
    ref_model, ref_opt = _stock(device, name, fused=True)
    for step, (x, y) in enumerate(_batches(device), start=1):
        ours.backward(_loss(ours.model, x, y, ours.autocast()))
        skip = torch.full((), float(step in skips), device=device)
        applied = ours.step(LR, skip)
        assert applied.device.type == device and applied.item() == float(step not in skips)
        _loss(ref_model, x, y, torch.autocast(device, enabled=False)).backward()
        if step not in skips:
            ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        got, want = _snapshot(ours.raw, ours.optimizer), _snapshot(ref_model, ref_opt)
        if step == 1:  # skipped before any update: torch has no state yet, ours all zeros
            assert not want["optim"] and got["optim"]
            assert all(not torch.as_tensor(t).any() for v in got["optim"].values()
                       for t in v.values())
            got["optim"] = want["optim"] = {}
        _assert_same(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPTIMS)
def test_fp16_overflow_and_nan_steps_touch_nothing_and_the_run_equals_stock_amp(
        device: str, name: str) -> None:
    """fp16 + GradScaler: step 1 overflows (huge loss), step 4 has a NaN loss (skip flag and
    NaN grads, as ffdist.faults injects it); both leave weights, BatchNorm statistics aside
    (the forward ran), optimizer state untouched and applied == 0. The whole run matches
    GradScaler.step over a stock foreach=False optimizer; the scale backs off alike."""
    ours = _ffdist(device, name, "fp16")
    assert ours.scaler is not None
    ref_model, ref_opt = _stock(device, name, fused=False)
    ref_scaler = torch.amp.GradScaler(device)
    autocast = torch.autocast(device, dtype=torch.float16)
    for step, (x, y) in enumerate(_batches(device), start=1):
        scale = {1: 1e30, 4: float("nan")}.get(step, 1.0)
        before = _snapshot(ours.raw, ours.optimizer)
        loss = _loss(ours.model, x, y, ours.autocast()) * scale
        ours.backward(loss)
        applied = ours.step(LR, (~torch.isfinite(loss)).float())
        if step in (1, 4):
            assert applied.item() == 0.0, step
            after = _snapshot(ours.raw, ours.optimizer)
            weights = {k for k in after["model"] if "running" not in k and "num_batches" not in k}
            # AdamW's state is created by its first (skipped) step: all zeros, step 0, as a
            # fresh state is; anything the kernel had written would show
            fresh = {i: v for i, v in after["optim"].items() if i not in before["optim"]}
            assert step == 1 or not fresh
            assert all(not torch.as_tensor(t).any() for v in fresh.values() for t in v.values())
            _assert_same({"model": {k: after["model"][k] for k in weights},
                          "optim": {i: v for i, v in after["optim"].items() if i not in fresh}},
                         {"model": {k: before["model"][k] for k in weights},
                          "optim": before["optim"]})
        else:
            assert applied.item() == 1.0, step
        ref_scaler.scale(_loss(ref_model, x, y, autocast) * scale).backward()
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
        assert ours.scaler.get_scale() == ref_scaler.get_scale(), step
    got, want = _snapshot(ours.raw, ours.optimizer), _snapshot(ref_model, ref_opt)
    _assert_same(got, want, exact=False)
    assert ours.scaler.get_scale() < 2.0**16  # it did back off (twice)
