"""Where ranks run (launch.device): the decision for any GPU count, injected here so that a
machine without GPUs checks the 1- and 8-GPU answers too; and, in real processes, that
launch.device=cpu makes no CUDA call at all where torch says GPUs exist."""

from __future__ import annotations

import json

import pytest

from ffdist import dist, recipe_load
from ffdist.errors import LaunchError
from tests.helpers import BIN, RECIPES, free_port, run

FIX = "use launch.nproc=N"


@pytest.mark.parametrize("want,nproc,visible,expect", [
    ("auto", 1, 0, "cpu"), ("auto", 4, 0, "cpu"),       # no GPU: CPU ranks
    ("auto", 1, 1, "cuda"), ("auto", 8, 8, "cuda"), ("auto", 2, 8, "cuda"),
    ("cuda", 2, 2, "cuda"),
    ("cpu", 2, 0, "cpu"), ("cpu", 2, 1, "cpu"), ("cpu", 16, 8, "cpu"),  # N CPU ranks anywhere
])
def test_device_for(want: str, nproc: int, visible: int, expect: str) -> None:
    assert dist.device_for(want, nproc, visible, "x", FIX) == expect


@pytest.mark.parametrize("want", ["auto", "cuda"])
def test_more_gpu_processes_than_gpus_names_both_numbers_and_the_fixes(want: str) -> None:
    # auto does not quietly turn a GPU job into a CPU one when GPUs exist but are too few
    with pytest.raises(LaunchError) as e:
        dist.device_for(want, 2, 1, "launch.nproc=2", FIX)
    msg = str(e.value)
    assert "launch.nproc=2 asks for 2 GPU processes" in msg and "only 1 GPU(s)" in msg
    assert FIX in msg and "launch.device=cpu to run 2 CPU ranks" in msg and "\n" not in msg


def test_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(LaunchError, match="launch.device=cuda but no GPU is visible"):
        dist.device_for("cuda", 1, 0, "x", FIX)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "DS_ACCELERATOR"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown also removes what
        monkeypatch.delenv(name)      # dist.init sets (DS_ACCELERATOR) from this process
    return monkeypatch


def _no_cuda_query() -> int:
    raise AssertionError("launch.device=cpu must not ask CUDA anything")


def test_cpu_ranks_never_ask_cuda(env: pytest.MonkeyPatch) -> None:
    env.setattr(dist, "cuda_device_count", _no_cuda_query)
    assert dist.pick_device(1, 2, "cpu").type == "cpu"
    info = dist.init(recipe_load.load(None, ["launch.device=cpu"]).launch)
    assert info.device.type == "cpu" and info.world_size == 1
    assert dist.os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed, imported later, stays on CPU


def test_every_rank_of_an_overfull_node_fails_alike(env: pytest.MonkeyPatch) -> None:
    """Rank 0 fails as well as rank 1 (it has a GPU, but its peer has none): no rank is
    left waiting in the rendezvous for a peer that already exited."""
    env.setattr(dist, "cuda_device_count", lambda: 1)
    for local_rank in (0, 1):
        with pytest.raises(LaunchError, match=r"torchrun \(local world size 2\) asks for 2 GPU "
                                              r"processes.*only 1 GPU.*--nproc_per_node 1"):
            dist.pick_device(local_rank, 2, "auto", launcher="torchrun")


def test_accelerate_use_cpu(env: pytest.MonkeyPatch) -> None:
    env.setattr(dist, "cuda_device_count", _no_cuda_query)
    env.setenv("ACCELERATE_USE_CPU", "1")
    assert dist.pick_device(0, 1, "auto").type == "cpu"
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU.*launch.device=cuda"):
        dist.pick_device(0, 1, "cuda")


def test_ds_accelerator_that_contradicts_cpu_ranks(env: pytest.MonkeyPatch) -> None:
    env.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(LaunchError, match="DS_ACCELERATOR=cuda"):
        dist.init(recipe_load.load(None, ["launch.device=cpu"]).launch)


@pytest.mark.parametrize("value,ids", [
    (None, None), ("", []), ("0,2", ["0", "2"]), (" 3 , 5 ", ["3", "5"]), ("-1", []),
    ("1,-1,2", ["1"]),  # CUDA ignores everything from the first invalid id on
    ("GPU-8a1b,GPU-77ce", ["GPU-8a1b", "GPU-77ce"]),
])
def test_visible_ids(env: pytest.MonkeyPatch, value: str | None, ids: list[str] | None) -> None:
    if value is not None:
        env.setenv("CUDA_VISIBLE_DEVICES", value)
    env.setattr(dist, "gpu_count", lambda: 8)
    assert dist.visible_ids() == ids
    assert dist.visible_gpu_count() == (8 if ids is None else len(ids))


def test_visible_count_stops_at_an_id_the_node_lacks(env: pytest.MonkeyPatch) -> None:
    env.setattr(dist, "gpu_count", lambda: 2)
    env.setenv("CUDA_VISIBLE_DEVICES", "1,5,0")  # CUDA sees GPU 1 only
    assert dist.visible_gpu_count() == 1
    env.setattr(dist, "gpu_count", lambda: 0)  # a variable left over on a CPU machine
    env.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert dist.visible_gpu_count() == 0


def test_launch_gpus_are_the_gpus_the_ranks_get(env: pytest.MonkeyPatch) -> None:
    env.setattr(dist, "cuda_device_count", lambda: 4)
    dist.check_gpus([0, 1], ranks=2)  # bare torchrun on GPUs 0 and 1: as asked
    with pytest.raises(LaunchError, match="names GPU 7, but this machine has GPU ids"):
        dist.check_gpus([7])
    # python -m ffdist.train launch.gpus=[2] without CUDA_VISIBLE_DEVICES would use GPU 0
    with pytest.raises(LaunchError, match=r"would run on GPU\(s\) \[0\].*CUDA_VISIBLE_DEVICES=2"):
        dist.check_gpus([2])
    env.setenv("CUDA_VISIBLE_DEVICES", "0,2")  # what `ffdist launch` exports for them
    dist.check_gpus([0, 2], ranks=2)
    env.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1b")  # UUIDs: nothing to compare ids with
    dist.check_gpus([5])


# ------------------------------------------------------------------ real processes

PROBE_RUN = ("launch.device=cpu", "schedule.max_steps=3", "checkpoint.every_steps=2",
             "log.tensorboard=false", "log.progress=false")


def _probe(tmp_path, recipe_name: str) -> list[dict]:
    """tests/cuda_probe.py as 2 ranks under torchrun, pretending 2 GPUs."""
    out = tmp_path / "probe"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "tests.cuda_probe", str(out), "--pretend-gpus", "2", str(RECIPES / recipe_name),
         *PROBE_RUN, f"output_dir={tmp_path / 'run'}"], timeout=300)
    return [json.loads((tmp_path / f"probe.{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("recipe_name", [
    "digits.yaml",
    pytest.param("digits_zero2.yaml", marks=pytest.mark.extended),  # make test-all
], ids=["ddp", "zero2"])
def test_cpu_ranks_where_torch_sees_gpus_call_no_cuda(tmp_path, recipe_name: str) -> None:
    """torch.cuda.is_available() is made to say True (2 GPUs): every check gated on it runs
    as on a GPU machine. Training with checkpoints, under DDP and ZeRO-2, must call nothing
    of torch.cuda beyond such queries (a call that needs CUDA would also fail here), join a
    gloo group, and keep DeepSpeed on its CPU accelerator. (The same on a real GPU machine,
    counting CUDA contexts: tests/gpu/test_cuda_paths.py.)"""
    for rank in _probe(tmp_path, recipe_name):
        assert rank["exit"] == 0 and rank["cuda_calls"] == [], rank
        assert rank["cuda_initialized"] is False
        assert rank["backend"] == "gloo"
        assert rank["ds_accelerator"] == "cpu"
