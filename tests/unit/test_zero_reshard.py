"""The conversion of ZeRO shards to a world-size-free state (ffdist.strategies.zero_reshard),
on small folders laid out as DeepSpeed 0.19 writes them: each parameter and each optimizer
state comes back whole, from partitions that split parameters unevenly (ZeRO-1/2) or pad
them (ZeRO-3); the result is written atomically and reused; a folder without optimizer
files is refused in one sentence. (Real DeepSpeed runs resharded end to end:
tests/distributed/test_resume_matrix.py.)"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ffdist.errors import CheckpointError
from ffdist.strategies import zero_reshard


def Fragment(numel: int, start: int):  # noqa: N802  DeepSpeed's own class, as its files hold it
    from deepspeed.utils.tensor_fragment import fragment_address

    return fragment_address(numel=numel, start=start)

FULL = {"a": torch.arange(15.0).view(3, 5), "b": torch.arange(100.0, 107.0),
        "c": torch.arange(200.0, 204.0)}


def momentum(name: str) -> torch.Tensor:
    return -FULL[name]


def write_zero2(folder: Path) -> None:
    """2 ranks; group 0 = a (15) + b (7), 11 elements per rank: rank 0 holds a[:11], rank 1
    a[11:] and b; group 1 = c, 2 per rank."""
    folder.mkdir()
    flat0 = torch.cat([FULL["a"].flatten(), FULL["b"]])
    mom0 = torch.cat([momentum("a").flatten(), momentum("b")])
    maps = [[OrderedDict(a=Fragment(11, 0)), OrderedDict(c=Fragment(2, 0))],
            [OrderedDict(a=Fragment(4, 0), b=Fragment(7, 4)), OrderedDict(c=Fragment(2, 0))]]
    for r in range(2):
        osd = {"zero_stage": 2, "loss_scaler": None,
               "single_partition_of_fp32_groups": [flat0[11 * r:11 * (r + 1)],
                                                   FULL["c"][2 * r:2 * (r + 1)]],
               "param_slice_mappings": maps[r],
               "base_optimizer_state": {"state": {
                   0: {"momentum_buffer": mom0[11 * r:11 * (r + 1)]},
                   1: {"momentum_buffer": momentum("c")[2 * r:2 * (r + 1)]}}}}
        torch.save({"optimizer_state_dict": osd},
                   folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    torch.save({"param_shapes": [OrderedDict(a=torch.Size([3, 5]), b=torch.Size([7])),
                                 OrderedDict(c=torch.Size([4]))],
                "module": {**FULL, "stat": torch.ones(2)}, "buffer_names": ["stat"],
                "frozen_param_shapes": None, "global_steps": 7, "global_samples": 84,
                "skipped_steps": 0, "dp_world_size": 2}, folder / "mp_rank_00_model_states.pt")


def write_zero3(folder: Path) -> None:
    """3 ranks, one sub-group: a (15) -> 5 per rank, b (7) -> 3 per rank (2 padded)."""
    folder.mkdir()
    a = FULL["a"].flatten()
    b = torch.cat([FULL["b"], torch.zeros(2)])
    ma, mb = momentum("a").flatten(), torch.cat([momentum("b"), torch.zeros(2)])
    for r in range(3):
        osd = {"zero_stage": 3, "loss_scaler": None,
               "fp32_flat_groups": [torch.cat([a[5 * r:5 * r + 5], b[3 * r:3 * r + 3]])],
               "optimizer_state_dict": {"state": {0: {
                   "step": torch.tensor(7.0),
                   "exp_avg": torch.cat([ma[5 * r:5 * r + 5], mb[3 * r:3 * r + 3]])}}}}
        torch.save({"optimizer_state_dict": osd},
                   folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"param_shapes": [OrderedDict(a=torch.Size([3, 5]), b=torch.Size([7]))],
                    "module": {}, "buffer_names": [], "frozen_param_shapes": None,
                    "global_steps": 7, "dp_world_size": 3},
                   folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_puts_every_parameter_and_state_back_together(tmp_path, stage) -> None:
    folder = tmp_path / "step_00000007"
    (write_zero3 if stage == 3 else write_zero2)(folder)
    assert zero_reshard.saved_world_size(folder) == (3 if stage == 3 else 2)
    (folder / ".resharded.tmp.999").mkdir()  # what a killed conversion leaves
    path = zero_reshard.convert(folder)
    assert path == folder / "resharded" / "state.pt"
    assert not (folder / ".resharded.tmp.999").exists()
    state = torch.load(path, weights_only=True)  # plain tensors and numbers only
    key = "exp_avg" if stage == 3 else "momentum_buffer"
    names = ("a", "b") if stage == 3 else ("a", "b", "c")
    assert sorted(state["params"]) == list(names)
    for name in names:
        assert torch.equal(state["params"][name]["fp32"], FULL[name]), name
        assert torch.equal(state["params"][name][key], momentum(name)), name
    assert state["stage"] == stage and state["counters"]["global_steps"] == 7
    if stage == 3:
        assert float(state["scalars"][0]["step"]) == 7.0
    else:
        assert torch.equal(state["buffers"]["stat"], torch.ones(2))


def test_a_conversion_is_written_once_and_reused(tmp_path) -> None:
    folder = tmp_path / "step_00000007"
    write_zero2(folder)
    path = zero_reshard.convert(folder)
    before = path.stat().st_mtime_ns
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")  # not read again
    assert zero_reshard.convert(folder) == path and path.stat().st_mtime_ns == before


def test_a_folder_without_all_its_optimizer_files_is_refused(tmp_path) -> None:
    folder = tmp_path / "step_00000007"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="holds no DeepSpeed optimizer files; the "
                                              "checkpoint is incomplete"):
        zero_reshard.convert(folder)
    folder = tmp_path / "step_00000008"
    write_zero3(folder)
    (folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="holds 2 DeepSpeed optimizer files of the 3 "
                                              "ranks that wrote it; the checkpoint is incomplete"):
        zero_reshard.convert(folder)
    assert not (folder / "resharded").exists()
