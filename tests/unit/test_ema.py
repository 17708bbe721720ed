"""ffdist.ema: the moving average by hand and against torch.optim.swa_utils.AveragedModel,
warm-up and cadence, exact save/resume, evaluation with the EMA weights."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ffdist.ema import EMA


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    model.train()
    model(torch.randn(8, 3, 8, 8, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_decay_warmup_and_cadence_by_hand():
    model = Scalar()
    ema = EMA(model, decay=0.9, every=2, warmup_steps=4)
    assert ema.shadow["w"].dtype == torch.float32  # fp32 shadow even of fp64 weights
    expect, seen = 0.0, []
    for step in range(1, 13):
        with torch.no_grad():
            model.w.fill_(float(step))
        did = ema.update(model, step)
        assert did == (step % 2 == 0)
        if did:  # steps 2, 4: copies (warm-up); 6, 8, 10, 12: 0.9 * ema + 0.1 * w
            expect = float(step) if step <= 4 else 0.9 * expect + 0.1 * step
        seen.append(float(ema.shadow["w"]))
        assert seen[-1] == pytest.approx(expect, rel=1e-6)
    assert seen[3] == 4.0 and ema.updates == 6
    assert seen[-1] == pytest.approx(0.9 ** 4 * 4 + 0.1 * (0.9 ** 3 * 6 + 0.9 ** 2 * 8 + 0.9 * 10 + 12))


def test_same_as_torch_averaged_model_with_ema_multi_avg_fn():
    model = _bn_net()
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    # AveragedModel's first update copies: a warm-up of one step
    ema = EMA(model, decay=0.8, warmup_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 8):
        _train_step(model, opt, g)
        ref.update_parameters(model)
        ema.update(model, step)
    theirs = ref.module.state_dict()
    for k, v in ema.shadow.items():
        if v.is_floating_point():  # parameters and BatchNorm statistics, bit for bit
            assert torch.equal(v, theirs[k]), k
    # integer buffers are copied (AveragedModel leaves num_batches_tracked at its first value)
    assert int(ema.shadow["1.num_batches_tracked"]) == 7
    assert not torch.equal(ema.shadow["0.weight"], model.state_dict()["0.weight"])


def test_buffers_copy_mode_takes_the_raw_statistics():
    model = _bn_net()
    ema = EMA(model, decay=0.5, buffers="copy")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        _train_step(model, opt, g)
        ema.update(model, step)
    assert torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)
    assert not torch.equal(ema.shadow["1.weight"], model[1].weight.detach())


def _run(steps: int, state: dict | None = None, upto: int = 0):
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = EMA(model, decay=0.7, every=2, warmup_steps=3)
    g = torch.Generator().manual_seed(3)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        g.set_state(state["g"])
    for step in range(upto + 1, steps + 1):
        _train_step(model, opt, g)
        ema.update(model, step)
    return model, opt, ema, g


def test_state_dict_is_plain_and_resumes_bit_exact():
    _, _, full, _ = _run(12)
    model, opt, ema, g = _run(5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                "g": g.get_state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    assert state["ema"]["updates"] == 2 and state["ema"]["decay"] == 0.7
    _, _, resumed, _ = _run(12, state, upto=5)
    assert resumed.updates == full.updates == 6
    for k in full.shadow:
        assert torch.equal(resumed.shadow[k], full.shadow[k]), k


def test_restore_without_a_section_starts_again_from_the_restored_weights():
    """A checkpoint written before the EMA was turned on: the EMA starts as a copy of the
    weights the checkpoint restored (what they are now), not of the initial ones."""
    model = _bn_net()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the restore loaded other weights in place
    assert not ema.restore(None, model)
    assert all(torch.equal(ema.shadow[k], v.float() if v.is_floating_point() else v)
               for k, v in model.state_dict().items())
    saved = ema.state_dict()
    assert EMA(_bn_net(), 0.9).restore(saved, model)


def test_load_refuses_another_model():
    ema = EMA(_bn_net(), 0.9)
    other = EMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(KeyError, match="does not fit"):
        ema.load_state_dict(other.state_dict())


def test_swapped_evaluates_the_ema_and_restores_the_weights_exactly():
    model = _bn_net()
    ema = EMA(model, decay=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(4)
    for step in range(1, 5):
        _train_step(model, opt, g)
        ema.update(model, step)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8, generator=g)
    model.eval()
    with ema.swapped(model) as m:
        assert all(torch.equal(m.state_dict()[k], ema.shadow[k].to(before[k].dtype))
                   for k in before)
        swapped_out = m(x)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    copy = ema.module_copy(model)
    assert not copy.training and copy is not model
    assert torch.equal(copy(x), swapped_out)
    assert not torch.equal(model(x), swapped_out)
    assert set(ema.weights()) == set(before) and all(
        v.device.type == "cpu" for v in ema.weights().values())


def test_wrapper_prefixes_and_low_precision_weights():
    class Wrapper(nn.Module):  # what DDP (module.) and torch.compile (_orig_mod.) add
        def __init__(self, m: nn.Module):
            super().__init__()
            self.module = m

    model = nn.Linear(3, 2)
    ema = EMA(Wrapper(model), 0.5)
    assert set(ema.shadow) == {"weight", "bias"}
    low = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(low, 0.5)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        low.weight.add_(1.0)
    ema.update(Wrapper(low), 1)  # bf16 weights into the fp32 shadow: the mul_ + add_ path
    assert ema.shadow["weight"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["weight"], 0.5 * start + 0.5 * low.weight.float())


def test_a_skipped_step_is_no_update_told_by_the_host_or_masked_on_the_device():
    """applied=False (the host knows), or a 0-dim device tensor (only the device knows):
    1.0 gives the bits of an unmasked update, 0.0 leaves the shadow as it was, warm-up
    copies included; the update count is the same either way."""
    def run(masks: list) -> EMA:
        model = _bn_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ema = EMA(model, decay=0.7, warmup_steps=2)
        g = torch.Generator().manual_seed(5)
        for step, applied in enumerate(masks, start=1):
            if applied is not False and not (isinstance(applied, torch.Tensor) and applied == 0):
                _train_step(model, opt, g)  # a skipped step leaves the weights alone too
            ema.update(model, step, applied)
        return ema

    plain = run([None, None, None, None, None])
    masked = run([torch.tensor(1.0)] * 5)
    for k in plain.shadow:
        assert torch.equal(masked.shadow[k], plain.shadow[k]), k
    host = run([None, False, None, False, None])
    device = run([torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0),
                  torch.tensor(1.0)])
    assert host.updates == device.updates == 5
    for k in host.shadow:
        assert torch.equal(device.shadow[k], host.shadow[k]), k
    assert not torch.equal(host.shadow["0.weight"], plain.shadow["0.weight"])
    low = nn.Linear(3, 2).to(torch.bfloat16)  # bf16 weights into the fp32 shadow, masked
    ema = EMA(low, 0.5)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        low.weight.add_(1.0)
    ema.update(low, 1, torch.tensor(0.0))
    assert torch.equal(ema.shadow["weight"], start)
    ema.update(low, 2, torch.tensor(1.0))
    torch.testing.assert_close(ema.shadow["weight"], 0.5 * start + 0.5 * low.weight.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_update_on_cuda_never_waits_for_the_device():
    model = _bn_net().cuda()
    ema = EMA(model, decay=0.99, warmup_steps=1)
    ema.update(model, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            ema.update(model, step)
        flag = torch.ones((), device="cuda")  # a device-decided skip flag: masked update
        ema.update(model, 6, flag)
        ema.update(model, 7, flag * 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ema.updates == 7
