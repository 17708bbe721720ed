"""The FSDP strategy's optimizer step and EMA with 2 real gloo ranks (torch.multiprocessing,
the strategy built in each process as ffdist builds it): an fp16 overflow in ONE rank's
gradient shard skips the step on every rank; a non-finite loss skips it on the device
(fused AdamW) and on the host (foreach SGD); clipping sees the global norm of the sharded
gradients; the EMA of the shards consolidates to what an unsharded EMA holds."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import free_port

pytestmark = pytest.mark.slow


def _strategy(rank: int, world: int, port: int, *overrides: str):
    from ffdist import assemble, dist, recipe_load, strategies

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rcp = recipe_load.load(None, ["model.name=vit_tiny", "strategy.name=fsdp",
                                  "launch.device=cpu", "data.name=synthetic",
                                  "data.batch_size=8", *overrides])
    info = dist.init(rcp.launch)
    model = assemble.build_model(rcp, load_weights=False)
    blocks = assemble.prepare_blocks(model, rcp)
    return strategies.build(model, rcp, assemble.resolve_for(rcp, info), info, blocks=blocks)


def _backward(strategy, rank: int) -> None:
    from ffdist.engine import forward

    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    logits = forward(strategy.model, x, strategy)
    strategy.backward(torch.nn.functional.cross_entropy(logits.float(), y))


def _shards(strategy) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in strategy.unwrap().parameters()]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    from ffdist import dist

    zero = torch.zeros(())
    # 1. fp16: an inf in rank 1's shard only; every rank must skip (the flag is all-reduced)
    s = _strategy(rank, world, port, "precision=fp16", "optim.name=adamw")
    s.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # (2**16 would overflow anyway)
    _backward(s, rank)
    out[f"fp16_clean_{rank}"] = float(s.step(1e-3, zero))  # no overflow: applied
    _backward(s, rank)
    if rank == 1:
        next(p for p in s.unwrap().parameters() if p.grad is not None).grad.to_local()[0] = \
            float("inf")
    before = _shards(s)
    applied = s.step(1e-3, zero)
    out[f"fp16_{rank}"] = (float(applied), all(torch.equal(a, b) for a, b in
                                               zip(before, _shards(s))))
    # 2. a non-finite loss (the skip flag) with fused AdamW and with foreach SGD
    for name in ("adamw", "sgd"):
        s = _strategy(rank, world, port, "precision=fp32", f"optim.name={name}")
        _backward(s, rank)
        before = _shards(s)
        applied = s.step(0.1, torch.ones(()))
        skipped = all(torch.equal(a, b) for a, b in zip(before, _shards(s)))
        _backward(s, rank)
        applied2 = s.step(0.1, zero)
        moved = not all(torch.equal(a, b) for a, b in zip(before, _shards(s)))
        out[f"skip_{name}_{rank}"] = (float(applied), skipped, float(applied2), moved)
    # 3. clipping: the norm of the sharded gradients is the global one
    s = _strategy(rank, world, port, "precision=fp32", "optim.name=sgd", "optim.grad_clip=0.01")
    _backward(s, rank)
    grads = [p.grad.full_tensor() for p in s.unwrap().parameters() if p.grad is not None]
    full = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm = torch.nn.utils.clip_grad_norm_([p for p in s.unwrap().parameters()
                                           if p.grad is not None], 0.01, foreach=True)
    out[f"clip_{rank}"] = (float(norm.full_tensor()), float(full))
    # 4. the EMA of the shards consolidates to the EMA of the full weights
    s = _strategy(rank, world, port, "precision=fp32", "optim.name=sgd")
    ema = s.make_ema(0.5, 1, 0, "average")
    first = s.model_state_dict()
    _backward(s, rank)
    s.step(0.1, zero)
    ema.update(s.unwrap(), 1, torch.ones(()))
    state, now = ema.state_dict(), s.model_state_dict()
    if rank == 0:
        want = {k: 0.5 * first[k] + 0.5 * now[k] for k in now}
        out["ema"] = max((state["shadow"][k] - want[k]).abs().max().item() for k in want)
    else:
        out["ema_other"] = state
    dist.shutdown()


def test_fsdp_step_skips_clips_and_averages_on_the_shards():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):  # rank 0's shards were finite: it skipped because rank 1 overflowed
        assert out[f"fp16_clean_{rank}"] == 1.0 and out[f"fp16_{rank}"] == (0.0, True)
        for name in ("adamw", "sgd"):
            assert out[f"skip_{name}_{rank}"] == (0.0, True, 1.0, True), name
        norm, full = out[f"clip_{rank}"]
        assert norm == pytest.approx(full, rel=1e-5) and norm > 0.01
    assert out["ema"] < 1e-6 and out["ema_other"] is None
