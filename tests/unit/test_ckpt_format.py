"""The checkpoint schema: one writer (encode), one reader (decode), format versions, optional
sections, and what the run directory does with a checkpoint it cannot read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.checkpoint import CheckpointManager, load_torch, read_checkpoint, save_torch
from ffdist.ckpt_format import (
    FORMAT_VERSION,
    SHARDED_STATE,
    WEIGHTS,
    Checkpoint,
    decode,
    encode,
    is_resumable,
)
from ffdist.errors import CheckpointError


def _ckpt(**extra) -> Checkpoint:
    model = torch.nn.Linear(3, 2)
    fields = dict(step=7, epoch=1, step_in_epoch=2, world_size=2, strategy="ddp",
                  recipe=recipe_load.load(None).to_dict(), classes=["a", "b"], best_top1=0.5,
                  rng=[{"torch": torch.get_rng_state()}] * 2, model=model.state_dict(),
                  optimizer={"state": {}, "param_groups": []}, scaler={})
    return Checkpoint(**{**fields, **extra})


def test_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    ckpt = _ckpt(sections={"ema": {"weight": torch.ones(2, 3)}})
    save_torch(tmp_path / "c.pt", encode(ckpt))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    # the flat layout: a stock model loads raw["model"]; an optional section is a key
    assert raw["format"] == FORMAT_VERSION and set(raw["model"]) == {"weight", "bias"}
    assert torch.equal(raw["ema"]["weight"], torch.ones(2, 3))
    back = read_checkpoint(tmp_path / "c.pt")
    assert back.step == 7 and back.strategy == "ddp" and back.classes == ["a", "b"]
    assert torch.equal(back.model["weight"], ckpt.model["weight"])
    assert set(back.sections) == {"ema"} and back.shards is None
    assert is_resumable(back)


@pytest.mark.parametrize("version,word", [(1, "an older"), (FORMAT_VERSION + 1, "a newer")])
def test_other_format_versions_are_refused_naming_them(tmp_path: Path, version: int,
                                                       word: str) -> None:
    save_torch(tmp_path / "old.pt", {**encode(_ckpt()), "format": version})
    with pytest.raises(CheckpointError, match=f"has checkpoint format {version}, written by "
                                              f"{word}"):
        read_checkpoint(tmp_path / "old.pt")


def test_plain_state_dicts_and_incomplete_files_are_not_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an ffdist checkpoint"):
        decode(torch.nn.Linear(3, 2).state_dict(), "model.pt")
    partial = {k: v for k, v in encode(_ckpt()).items() if k != "classes"}
    with pytest.raises(CheckpointError, match="lacks classes"):
        decode(partial, "x.pt")
    with pytest.raises(ValueError, match="clash"):
        encode(_ckpt(sections={"step": 1}))


def test_what_is_resumable() -> None:
    assert is_resumable(_ckpt())
    assert not is_resumable(_ckpt(rng=[]))
    assert not is_resumable(_ckpt(optimizer=None))
    zero = _ckpt(strategy="deepspeed", zero_stage=2, model=None, optimizer=None)
    assert not is_resumable(zero)  # its state is in shards, and none were found
    assert is_resumable(dataclasses.replace(zero, shards=Path("step_00000007")))
    assert not is_resumable(_ckpt(kind=WEIGHTS, strategy="deepspeed", rng=[]))  # ZeRO best.pt


def test_a_zero_folder_is_read_from_its_marker(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000007"
    save_torch(folder / SHARDED_STATE, encode(_ckpt(strategy="deepspeed", zero_stage=2,
                                                    model=None, optimizer=None)))
    back = read_checkpoint(folder)
    assert back.shards == folder and back.zero_stage == 2 and is_resumable(back)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_torch(folder)


def test_latest_of_another_format_is_an_error_never_skipped(tmp_path: Path) -> None:
    """Torn files are skipped (an older complete one exists); a file of another format is
    not: falling back past it could end at "no checkpoint" and restart over the run."""
    cfg = recipe_load.load(None).checkpoint
    m = CheckpointManager(tmp_path, cfg, is_writer=True)
    ckpts = tmp_path / "checkpoints"
    save_torch(ckpts / "step_00000001.pt", encode(_ckpt(step=1)))
    save_torch(ckpts / "step_00000002.pt", {**encode(_ckpt(step=2)), "format": 1})
    with pytest.raises(CheckpointError, match="format 1"):
        m.load_latest()


def _resolved(*overrides: str, world: int = 1):
    from ffdist.assemble import resolve

    rcp = recipe_load.load(None, ["precision=fp32", *overrides])
    return rcp, resolve(rcp, world, torch.device("cpu"))


@pytest.mark.parametrize("saved,run,match", [
    (dict(strategy="deepspeed", zero_stage=2), (), "holds DeepSpeed ZeRO shards; resume it with "
                                                    "strategy.name=deepspeed"),
    (dict(strategy="ddp"), ("strategy.name=deepspeed",), "was written by a ddp run, not by "
                                                          "DeepSpeed"),
    (dict(strategy="deepspeed", zero_stage=3), ("strategy.name=deepspeed",),
     "holds ZeRO-3 shards of 2 ranks, this run is ZeRO-2 on 1"),
    (dict(kind=WEIGHTS, rng=[]), (), "holds weights only"),
])
def test_check_compatible_refuses_what_the_run_cannot_resume(saved, run, match) -> None:
    """Before the run directory is touched (ffdist.train checks first, then opens the Monitor)."""
    from ffdist.checkpoint import check_compatible

    rcp, resolved = _resolved(*run)
    ckpt = _ckpt(**saved)
    if ckpt.strategy == "deepspeed" and ckpt.kind != WEIGHTS:
        ckpt = dataclasses.replace(ckpt, model=None, optimizer=None, shards=Path("step_7"))
    with pytest.raises(CheckpointError, match=match):
        check_compatible(ckpt, torch.nn.Linear(3, 2), "ckpt", rcp, resolved)
