"""ffdist.checkpoint in one process: checkpoints load with weights_only=True and restore
every RNG, a failed write keeps the old file, wrapper prefixes are stripped, keep-last /
latest / best, a corrupt newest checkpoint falls back to the one before, an unreadable file
is a CheckpointError, and model.pt holds compact CPU tensors."""

import os
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.checkpoint import (
    CheckpointManager,
    atomic_write,
    cpu_state,
    load_torch,
    rng_state,
    save_torch,
    set_rng_state,
    write_weights,
)
from ffdist.ckpt_format import ONE_FILE, Checkpoint, Layout
from ffdist.errors import CheckpointError
from ffdist.state_dicts import clean_state_dict
from ffdist.strategies.base import Strategy


def test_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": [rng_state()],
             "epoch": 3, "classes": ["a", "b"]}
    save_torch(tmp_path / "c.pt", state)
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(back["model"]["weight"], model.weight)
    fresh = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(back["optimizer"])
    assert back["epoch"] == 3 and back["classes"] == ["a", "b"]


def test_rng_state_restores_every_generator() -> None:
    import random

    import numpy as np

    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(3) == expected[1]).all() and random.random() == expected[2]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_torch(path, {"v": 1})

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert load_torch(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]  # no temp file left


def test_prefixes_are_stripped() -> None:
    sd = {"module._orig_mod.fc.weight": 1, "_orig_mod.conv.bias": 2, "fc.bias": 3}
    assert clean_state_dict(sd) == {"fc.weight": 1, "conv.bias": 2, "fc.bias": 3}


def _manager(tmp_path: Path, keep: int = 2) -> CheckpointManager:
    cfg = recipe_load.load(None, [f"checkpoint.keep_last={keep}"]).checkpoint
    return CheckpointManager(tmp_path, cfg, is_writer=True)


def _ckpt(step: int) -> Checkpoint:
    return Checkpoint(step=step, epoch=0, step_in_epoch=step,
                      layout=Layout(ONE_FILE, "torch-file", 1), recipe={}, classes=["a", "b"],
                      rng=[{}], model={}, optimizer={})


STRATEGY = Strategy()  # a one-file checkpoint's state is in the file: the manager asks it nothing


def _best(step: int, value: float) -> Checkpoint:
    from ffdist.ckpt_format import WEIGHTS

    best = {"step": step, "split": "val", "weights": "raw", "metric": "top1", "value": value}
    return Checkpoint(step=step, epoch=0, step_in_epoch=step, kind=WEIGHTS,
                      layout=Layout(ONE_FILE, "torch-file", 1), recipe={}, classes=["a", "b"],
                      model={"w": torch.full((2,), float(step))}, sections={"best": best})


def test_keep_last_latest_and_best(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    assert m.best_so_far() is None
    for step in (10, 20, 30):
        m.save(_ckpt(step), STRATEGY)
        if step == 20:
            m.save_best(_best(step, 0.75))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "latest", "step_00000020.pt", "step_00000030.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000030.pt"
    assert load_torch(tmp_path / "checkpoints" / "best.pt")["step"] == 20
    assert m.best_so_far() == {"step": 20, "split": "val", "weights": "raw", "metric": "top1",
                               "value": 0.75}  # read without its tensors (ffdist.ckpt_peek)
    assert m.load_latest()[1].step == 30


def test_a_kill_while_best_pt_is_written_leaves_the_previous_one(tmp_path: Path) -> None:
    """best.pt goes through the atomic write: a save that dies mid-write leaves the
    previous best.pt, whole."""
    m = _manager(tmp_path)
    m.save_best(_best(10, 0.5))

    def die(path: Path, data: dict, step: int) -> None:
        def half(f) -> None:
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt  # the process goes away mid-write
        atomic_write(path, half)

    m.before_write = die
    with pytest.raises(KeyboardInterrupt):
        m.save_best(_best(20, 0.9))
    assert load_torch(tmp_path / "checkpoints" / "best.pt")["step"] == 10
    assert m.best_so_far()["value"] == 0.5


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    m = _manager(tmp_path, keep=3)
    m.save(_ckpt(1), STRATEGY)
    path = m.save(_ckpt(2), STRATEGY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn
    found = m.load_latest()
    assert found is not None and found[1].step == 1


@pytest.mark.parametrize("junk", [b"", b"\x80\x02junk", b"PK\x03\x04" + bytes(60),
                                  os.urandom(64)], ids=["empty", "pickle", "zip", "random"])
def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path, junk: bytes) -> None:
    (tmp_path / "junk.pt").write_bytes(junk)
    with pytest.raises(CheckpointError, match="junk.pt cannot be read"):
        load_torch(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch(tmp_path / "nope.pt")


def test_model_pt_holds_compact_cpu_tensors(tmp_path: Path) -> None:
    """write_weights: each tensor its own contiguous CPU storage (a view of a big buffer
    must not drag the buffer into model.pt), dtypes and non-tensor entries as they were."""
    big = torch.arange(10_000, dtype=torch.float32)
    state = {"view": big[:4], "strided": torch.arange(12.0).view(3, 4).t(),
             "half": torch.ones(3, dtype=torch.bfloat16), "count": torch.tensor(7),
             "note": 3}
    write_weights(tmp_path / "model.pt", state)
    back = torch.load(tmp_path / "model.pt", weights_only=True)  # default map_location
    assert (tmp_path / "model.pt").stat().st_size < 10_000  # not the 40 kB buffer
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert back[k].device.type == "cpu" and back[k].is_contiguous(), k
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
        else:
            assert back[k] == v


def test_cpu_state_moves_off_other_devices() -> None:
    """A tensor on another device is copied to the CPU: a meta tensor (no data) shows the
    copy is attempted, since copying it out is what fails; tests/gpu checks real cuda."""
    with pytest.raises(NotImplementedError, match="meta"):
        cpu_state({"w": torch.empty(2, 2, device="meta")})
    cpu = torch.ones(2)
    assert cpu_state({"w": cpu})["w"].data_ptr() == cpu.data_ptr()  # whole on the CPU: no copy


class _Shards(Strategy):
    """A sharded strategy as the manager sees it: it writes its own file into the folder."""

    def __init__(self) -> None:
        self.saved: list[Path] = []
        self.loaded: list[Path] = []

    def save_shards(self, path: Path) -> None:
        assert path.is_dir() and not (path / "ffdist_state.pt").exists()  # the marker comes last
        (path / "rank_0.bin").write_bytes(path.name.encode())
        self.saved.append(path)

    def load_shards(self, path: Path) -> None:
        self.loaded.append(path)

    def model_state_dict(self) -> dict:
        return {"w": torch.ones(2)}


def test_a_layout_of_shards_is_a_folder_the_strategy_fills_and_the_manager_marks(tmp_path):
    """The manager decides when and where (step folder, marker last, latest, keep-last);
    the strategy writes what is inside."""
    from ffdist.ckpt_format import SHARDS

    m, strategy = _manager(tmp_path), _Shards()
    for step in (10, 20, 30):
        ckpt = _ckpt(step)
        ckpt.layout, ckpt.model, ckpt.optimizer = Layout(SHARDS, "test-shards", 1), None, None
        m.save(ckpt, strategy)
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in strategy.saved] == ["step_00000010", "step_00000020",
                                                "step_00000030"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000020",
                                                        "step_00000030"]
    assert sorted(p.name for p in (ckpts / "step_00000030").iterdir()) == [
        "ffdist_state.pt", "rank_0.bin"]
    path, found = m.load_latest()
    assert path == ckpts / "step_00000030" and found.shards == path
    assert found.layout == Layout(SHARDS, "test-shards", 1)
    m.restore(found, strategy)
    assert strategy.loaded == [path]
