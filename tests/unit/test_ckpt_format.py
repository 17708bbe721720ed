"""The checkpoint schema: one writer (encode), one reader (decode), format versions (format
2 files still read, their layout derived), optional sections, the layouts a run refuses to
resume, and what the run directory does with a checkpoint it cannot read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.checkpoint import CheckpointManager, load_torch, read_checkpoint, save_torch
from ffdist.ckpt_format import (
    FORMAT_VERSION,
    ONE_FILE,
    SHARDED_STATE,
    SHARDS,
    WEIGHTS,
    Checkpoint,
    Layout,
    decode,
    encode,
    is_resumable,
)
from ffdist.errors import CheckpointError

DDP_FILE = Layout(ONE_FILE, "torch-file", 2)


def zero(stage: int, world: int = 2) -> Layout:
    return Layout(SHARDS, "deepspeed-zero", world, {"zero_stage": stage})


def _ckpt(**extra) -> Checkpoint:
    model = torch.nn.Linear(3, 2)
    fields = dict(step=7, epoch=1, step_in_epoch=2, layout=DDP_FILE,
                  recipe=recipe_load.load(None).to_dict(), classes=["a", "b"], best_top1=0.5,
                  rng=[{"torch": torch.get_rng_state()}] * 2, model=model.state_dict(),
                  optimizer={"state": {}, "param_groups": []}, scaler={})
    return Checkpoint(**{**fields, **extra})


def encode_v2(ckpt: Checkpoint, strategy: str, zero_stage: int | None) -> dict:
    """A checkpoint as format 2 wrote it: ckpt_format.encode of that version, whose schema
    named the strategy ("strategy", "zero_stage") and had a top-level "world_size" where
    format 3 has "layout"."""
    v2_fields = ("bad_in_a_row", "best_top1", "classes", "epoch", "kind", "model",
                 "optimizer", "recipe", "rng", "scaler", "skipped_steps", "step",
                 "step_in_epoch", "strategy", "world_size", "zero_stage")
    values = {**vars(ckpt), "strategy": strategy, "zero_stage": zero_stage,
              "world_size": ckpt.layout.world_size}
    return {"format": 2, **{name: values[name] for name in sorted(v2_fields)}, **ckpt.sections}


def test_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    ckpt = _ckpt(sections={"ema": {"weight": torch.ones(2, 3)}})
    save_torch(tmp_path / "c.pt", encode(ckpt))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    # the flat layout: a stock model loads raw["model"]; an optional section is a key
    assert raw["format"] == FORMAT_VERSION and set(raw["model"]) == {"weight", "bias"}
    assert torch.equal(raw["ema"]["weight"], torch.ones(2, 3))
    back = read_checkpoint(tmp_path / "c.pt")
    assert raw["layout"] == {"kind": "file", "format": "torch-file", "world_size": 2,
                             "params": {}}
    assert back.step == 7 and back.layout == DDP_FILE and back.classes == ["a", "b"]
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
    sharded = _ckpt(layout=zero(2), model=None, optimizer=None)
    assert not is_resumable(sharded)  # its state is in shards, and none were found
    assert is_resumable(dataclasses.replace(sharded, shards=Path("step_00000007")))
    assert not is_resumable(_ckpt(kind=WEIGHTS, layout=zero(2), rng=[]))  # shards' best.pt


def test_a_folder_of_shards_is_read_from_its_marker(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000007"
    save_torch(folder / SHARDED_STATE, encode(_ckpt(layout=zero(2), model=None,
                                                    optimizer=None)))
    back = read_checkpoint(folder)
    assert back.shards == folder and back.layout == zero(2) and is_resumable(back)
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
    (dict(layout=zero(2)), (), "holds DeepSpeed ZeRO-2 shards of 2 ranks, which "
                               "strategy.name=single cannot resume; resume it with "
                               "strategy.name=deepspeed"),
    (dict(), ("strategy.name=deepspeed",), "holds one file with the whole state "
                                           r"\(single device / DDP, 2 ranks\), which "
                                           "strategy.name=deepspeed cannot resume; resume it "
                                           "with strategy.name=single or ddp"),
    (dict(layout=zero(3)), ("strategy.name=deepspeed",),
     "holds ZeRO-3 shards of 2 ranks, this run is ZeRO-2 on 1"),
    (dict(layout=zero(0)), ("strategy.name=deepspeed", "strategy.zero_stage=0"),
     "holds ZeRO-0 shards of 2 ranks, this run would continue them on 1; ZeRO-0 resumes "
     "only at the world size that wrote it"),
    (dict(layout=Layout(SHARDS, "fsdp-dcp", 4)), (),
     "holds a checkpoint of format 'fsdp-dcp' .4 ranks., which strategy.name=single cannot "
     "resume; no strategy here reads it"),
    (dict(kind=WEIGHTS, rng=[]), (), "holds weights only"),
])
def test_check_compatible_refuses_what_the_run_cannot_resume(saved, run, match) -> None:
    """Before the run directory is touched (ffdist.train checks first, then opens the Monitor)."""
    from ffdist.checkpoint import check_compatible

    rcp, resolved = _resolved(*run)
    ckpt = _ckpt(**saved)
    if ckpt.layout.kind == SHARDS and ckpt.kind != WEIGHTS:
        ckpt = dataclasses.replace(ckpt, model=None, optimizer=None, shards=Path("step_7"))
    with pytest.raises(CheckpointError, match=match):
        check_compatible(ckpt, torch.nn.Linear(3, 2), "ckpt", rcp, resolved)


def test_one_file_and_zero_1_2_3_shards_resume_at_any_world_size() -> None:
    """ZeRO-1/2/3 shards of another world size are converted on load
    (ffdist.strategies.zero_reshard; tests/distributed/test_resume_matrix.py runs it)."""
    from ffdist.checkpoint import check_compatible

    model = torch.nn.Linear(3, 2)
    for world in (1, 2, 4):  # single (1), DDP (2, 4): the whole state is in the file
        rcp, resolved = _resolved("strategy.name=auto", world=world)
        check_compatible(_ckpt(model=model.state_dict()), model, "ckpt", rcp, resolved)
    for stage in (1, 2, 3):
        for world in (1, 2, 4):
            rcp, resolved = _resolved("strategy.name=deepspeed", f"strategy.zero_stage={stage}",
                                      world=world)
            check_compatible(_ckpt(layout=zero(stage), model=None, optimizer=None,
                                   shards=Path("s")), model, "ckpt", rcp, resolved)


def test_format_2_files_are_read_and_their_layout_derived(tmp_path: Path) -> None:
    """Files as format 2 wrote them (strategy names, no layout): a DDP step file and a ZeRO
    folder's marker read as format 3's one-file and shard layouts, resume as they did, and
    are refused where they were refused."""
    from ffdist.checkpoint import check_compatible

    model = torch.nn.Linear(3, 2)
    ddp = _ckpt(model=model.state_dict(), sections={"ema": {"updates": 3}})
    save_torch(tmp_path / "step_00000007.pt", encode_v2(ddp, "ddp", None))
    back = read_checkpoint(tmp_path / "step_00000007.pt")
    assert back.layout == Layout(ONE_FILE, "v2:ddp", 2) and is_resumable(back)
    assert back.sections == {"ema": {"updates": 3}} and back.step == 7
    assert torch.equal(back.model["weight"], model.weight)
    for world in (1, 2):  # the 2 -> 1 resume of format 2 still works
        check_compatible(back, model, "ckpt", *_resolved(world=world))
    with pytest.raises(CheckpointError, match="strategy.name=deepspeed cannot resume; resume "
                                              "it with strategy.name=single or ddp"):
        check_compatible(back, model, "ckpt", *_resolved("strategy.name=deepspeed"))

    folder = tmp_path / "step_00000009"
    sharded = _ckpt(step=9, model=None, optimizer=None)
    save_torch(folder / SHARDED_STATE, encode_v2(sharded, "deepspeed", 2))
    back = read_checkpoint(folder)
    assert back.layout == Layout(SHARDS, "v2:deepspeed", 2, {"zero_stage": 2})
    assert back.shards == folder and is_resumable(back)
    for world in (1, 2):  # ZeRO-2 shards: at any world size (converted on load)
        check_compatible(back, model, "ckpt", *_resolved("strategy.name=deepspeed",
                                                         world=world))
    with pytest.raises(CheckpointError, match="holds ZeRO-2 shards of 2 ranks, this run is "
                                              "ZeRO-3 on 1"):
        check_compatible(back, model, "ckpt", *_resolved("strategy.name=deepspeed",
                                                         "strategy.zero_stage=3"))
    with pytest.raises(CheckpointError, match="holds DeepSpeed ZeRO-2 shards of 2 ranks"):
        check_compatible(back, model, "ckpt", *_resolved(world=2))
    with pytest.raises(CheckpointError, match="lacks strategy"):
        decode({k: v for k, v in encode_v2(ddp, "ddp", None).items() if k != "strategy"}, "x")
