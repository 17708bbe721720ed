"""The part the two sharded EMAs share (ffdist.strategies.sharded_ema: FSDP's ShardEMA and
DeepSpeed ZeRO-2's ZeroEMA), with 2 real gloo ranks and a model with BatchNorm (the runs of
the other tests have no buffers): float buffers are averaged with ema_buffers=average and
copied with ema_buffers=copy, the integer one is copied; the consolidated state gives back
its update count and every tensor bit for bit through restore; `swapped` puts the EMA's
buffers in and the module's own back exactly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import free_port

pytestmark = pytest.mark.slow
STRATEGIES = {"fsdp": ("strategy.name=fsdp",),
              "zero2": ("strategy.name=deepspeed", "strategy.zero_stage=2")}


def _strategy(rank: int, world: int, port: int, overrides: tuple[str, ...]):
    from ffdist import assemble, dist, recipe_load, strategies

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rcp = recipe_load.load(None, ["launch.device=cpu", "data.name=synthetic", "data.batch_size=8",
                                  "precision=fp32", "optim.name=sgd", *overrides])
    info = dist.init(rcp.launch)
    torch.manual_seed(0)  # the same weights on every rank
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return strategies.build(model, rcp, assemble.resolve_for(rcp, info), info, blocks=[])


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _worker(rank: int, world: int, port: int, name: str, out: dict) -> None:
    import torch.distributed as tdist

    from ffdist import dist
    from ffdist.engine import forward

    s = _strategy(rank, world, port, STRATEGIES[name])
    module = s.unwrap()
    averaged, copied = s.make_ema(0.5, 1, 0, "average"), s.make_ema(0.5, 1, 0, "copy")
    before = _buffers(module)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    s.backward(nn.functional.cross_entropy(forward(s.model, x, s).float(), y))
    applied = s.step(0.1, torch.zeros(()))
    for ema in (averaged, copied):
        ema.update(module, 1, applied)
    now = _buffers(module)
    states = [averaged.state_dict(), copied.state_dict()]  # rank 0's; collectives
    shared = [states[0]]
    tdist.broadcast_object_list(shared, src=0)
    resumed = s.make_ema(0.5, 1, 0, "average")
    resumed.restore(shared[0], module)
    with resumed.swapped(module):
        inside = _buffers(module)
    again = resumed.state_dict()
    if rank == 0:
        out.update(before=before, now=now, states=states, again=again, inside=inside,
                   after=_buffers(module), updates=resumed.updates)
    dist.shutdown()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_buffers_and_the_restore_of_a_sharded_ema(name: str) -> None:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), name, out), nprocs=2, join=True)
    before, now = out["before"], out["now"]
    (averaged, copied), again = out["states"], out["again"]
    assert averaged["updates"] == copied["updates"] == again["updates"] == out["updates"] == 1
    for k in now:  # rank 0's buffers, which are what rank 0 saves
        if now[k].is_floating_point():
            assert not torch.equal(now[k], before[k]), k  # training moved the statistics
            torch.testing.assert_close(averaged["shadow"][k], before[k].lerp(now[k], 0.5))
        else:  # num_batches_tracked: copied whatever ema_buffers says
            assert torch.equal(averaged["shadow"][k], now[k]), k
        assert torch.equal(copied["shadow"][k], now[k].float() if now[k].is_floating_point()
                           else now[k]), k
        assert torch.equal(out["inside"][k], averaged["shadow"][k].to(now[k].dtype)), k
        assert torch.equal(out["after"][k], now[k]), k
    assert list(again["shadow"]) == list(averaged["shadow"])
    for k, v in averaged["shadow"].items():  # parameters and buffers, through restore
        assert torch.equal(again["shadow"][k], v), k
