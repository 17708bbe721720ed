import os
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.checkpoint import (
    CheckpointManager,
    atomic_write,
    clean_state_dict,
    cpu_state,
    load_torch,
    rng_state,
    save_torch,
    set_rng_state,
    write_weights,
)
from ffdist.ckpt_format import Checkpoint
from ffdist.errors import CheckpointError
from ffdist.strategies.base import NotSharded


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
    return Checkpoint(step=step, epoch=0, step_in_epoch=step, world_size=1, strategy="single",
                      recipe={}, classes=["a", "b"], rng=[{}], model={}, optimizer={})


ONE_FILE = NotSharded()  # a strategy whose state goes into the checkpoint file


def test_keep_last_latest_and_best(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    for step in (10, 20, 30):
        m.save(_ckpt(step), ONE_FILE, is_best=step == 20)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "latest", "step_00000020.pt", "step_00000030.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000030.pt"
    assert load_torch(tmp_path / "checkpoints" / "best.pt")["step"] == 20
    assert m.load_latest()[1].step == 30


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    m = _manager(tmp_path, keep=3)
    m.save(_ckpt(1), ONE_FILE)
    path = m.save(_ckpt(2), ONE_FILE)
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
