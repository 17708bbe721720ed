"""DDP with 2 real gloo ranks: gradients equal across ranks after backward, evaluation of
an odd-sized set counts exactly n, 1 and 2 processes train the same steps, and digits under
torchrun reaches 98% (torch.multiprocessing for the mechanics, torchrun for runs)."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import CPU, FAST, TWO_RANK_DEVICES, end_event, events, free_port, torchrun, train


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _grads_worker(rank: int, world: int, port: int, out: dict) -> None:
    from ffdist import models, recipe_load
    from ffdist.assemble import resolve
    from ffdist.dist import DistInfo
    from ffdist.strategies.ddp import DDP

    _init(rank, world, port)
    r = recipe_load.load(None, ["model.in_channels=1", "precision=fp32"])
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    cpu = torch.device("cpu")
    info = DistInfo(rank, rank, world, world, cpu, "test")
    strategy = DDP(models.build(r.model), r, resolve(r, world, cpu), info)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    torch.nn.functional.cross_entropy(strategy.model(x), y).backward()
    grads = torch.cat([p.grad.flatten() for p in strategy.unwrap().parameters()])
    weights = torch.cat([p.detach().flatten() for p in strategy.unwrap().parameters()])
    out[rank] = (grads.clone(), weights.clone())
    dist.destroy_process_group()


def test_gradients_are_equal_across_ranks_after_backward() -> None:
    out = mp.Manager().dict()
    mp.spawn(_grads_worker, args=(2, free_port(), out), nprocs=2, join=True)
    (g0, w0), (g1, w1) = out[0], out[1]
    assert torch.equal(w0, w1)  # rank 0's initial weights were broadcast
    assert torch.allclose(g0, g1, rtol=0, atol=1e-7)  # the all-reduced (averaged) gradient
    assert g0.abs().sum() > 0


def _eval_worker(rank: int, world: int, port: int, n: int, out: dict) -> None:
    from ffdist.data.mapstyle import ShardSampler
    from ffdist.metrics import EvalCounts

    _init(rank, world, port)
    g = torch.Generator().manual_seed(0)  # the same "dataset" on every rank
    logits, target = torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
    idx = torch.tensor(list(ShardSampler(n, rank, world)), dtype=torch.long)
    counts = EvalCounts(5, torch.device("cpu"))
    for chunk in idx.split(16):
        counts.update(logits[chunk], target[chunk], torch.tensor(0.0))
    out[rank] = (counts.reduce(), counts.confusion.clone())
    dist.destroy_process_group()


def test_evaluation_over_an_odd_sized_set_counts_exactly_n() -> None:
    n, out = 361, mp.Manager().dict()
    mp.spawn(_eval_worker, args=(2, free_port(), n, out), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
    expected_top1 = (logits.argmax(1) == target).double().mean().item()
    for rank in (0, 1):
        result, confusion = out[rank]
        assert result["n"] == n and int(confusion.sum()) == n
        assert result["top1"] == pytest.approx(expected_top1, abs=1e-12)


@pytest.mark.slow
# make test-all only; the fast tier covers its path: test_resume_regularization's 1 vs 2
# ranks on the same batches, test_world_size_resume
@pytest.mark.extended
def test_one_and_two_processes_train_the_same_steps(tmp_path: Path) -> None:
    """Digits (BatchNorm-free model), fp32: the global batch of each step is the same set of
    images whatever the world size, so per-step losses agree up to float summation order."""
    common = (*FAST, CPU, "precision=fp32", "log.every_steps=1", "schedule.max_steps=20",
              "data.val_fraction=0.2006")  # 361 val images: odd, split unevenly over 2 ranks
    train("digits.yaml", f"output_dir={tmp_path / 'one'}", *common)
    torchrun("digits.yaml", f"output_dir={tmp_path / 'two'}", *common)
    one, two = events(tmp_path / "one", "train"), events(tmp_path / "two", "train")
    assert [e["step"] for e in one] == [e["step"] for e in two] == list(range(1, 21))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), f"step {a['step']}"
    assert two[0]["world_size"] == 2 and one[0]["world_size"] == 1
    for run, world in (("one", 1), ("two", 2)):
        val = events(tmp_path / run, "val")[-1]
        assert val["n"] == 361 and val["world_size"] == world
    assert events(tmp_path / "two", "val")[-1]["top1"] == pytest.approx(
        events(tmp_path / "one", "val")[-1]["top1"], abs=1 / 361 + 1e-9)


@pytest.mark.slow
# make test-all only; the fast tier covers its path:
# test_one_and_two_processes_train_the_same_steps, the README tour's 2-rank torchrun
@pytest.mark.extended
@pytest.mark.parametrize("device", TWO_RANK_DEVICES)
def test_torchrun_digits_reaches_98_percent_with_world_size_2(tmp_path: Path, device: str) -> None:
    torchrun("digits.yaml", f"output_dir={tmp_path}", f"launch.device={device}", *FAST)
    end = end_event(tmp_path)
    val = events(tmp_path, "val")[-1]
    assert end["world_size"] == 2 and val["n"] == 360
    assert end["final_top1"] >= 0.98, end
    assert (tmp_path / "model.pt").is_file()
