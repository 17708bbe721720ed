"""The EMA of the weights under DeepSpeed ZeRO (ffdist.strategies.deepspeed_ema), 2 real CPU ranks: it is
the EMA of the full fp32 weights, the same as DDP's, whether ZeRO-2 fragments or ZeRO-3
partitions hold the master (ZeRO-3 with persistent and partitioned parameters, offloaded);
evaluating it leaves the raw weights as they were; checkpoints and model.pt hold it
consolidated; ZeRO-2's best.pt evaluates to the best top-1 it reported; ZeRO-2 and ZeRO-3 runs
resume it bit for bit; under bf16 it averages the fp32 master, not the bf16 module.

Tolerances: as tests/integration/test_launchers.py (fp32, same data, same micro-batches;
DDP and ZeRO differ only in the order of floating-point sums; measured bit-identical with
2 ranks): losses to 1e-4. An EMA of weights that agree to d agrees to d: 1e-6 absolute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import CPU, FAST, events, torchrun, train_losses

pytestmark = pytest.mark.slow
RECIPE = "digits_zero2.yaml"
STEPS = 30  # an evaluation at the end of epoch 0 (step 22), training goes on after it
EMA = ("optim.ema_decay=0.8", "optim.ema_every_steps=2", "optim.ema_warmup_epochs=0.2",
       "checkpoint.best_weights=ema", "checkpoint.final_weights=ema")
PARITY = (*FAST, CPU, "precision=fp32", "data.augment=false", "log.every_steps=1",
          "schedule.epochs=2", f"schedule.max_steps={STEPS}", "checkpoint.every_steps=10",
          "checkpoint.keep_last=5", *EMA)


def _z3_config(folder: Path) -> Path:
    """ZeRO-3 with its optimizer and parameters offloaded, and a persistence threshold
    that keeps the small parameters gathered and partitions the three large ones."""
    cfg = json.loads(Path("launch/deepspeed/zero3_offload.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    path = folder / "z3.json"
    path.write_text(json.dumps(cfg))
    return path


Z3 = ("strategy.zero_stage=3", "strategy.offload_optimizer=true", "strategy.offload_params=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ema_zero")
    out = {name: root / name for name in ("ddp", "zero2", "zero3")}
    torchrun(RECIPE, *PARITY, "strategy.name=ddp", f"output_dir={out['ddp']}", timeout=300)
    torchrun(RECIPE, *PARITY, f"output_dir={out['zero2']}", timeout=300)
    torchrun(RECIPE, *PARITY, *Z3, f"strategy.deepspeed_config={_z3_config(root)}",
             f"output_dir={out['zero3']}", timeout=300)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_ema_is_ddps_ema_of_the_full_fp32_weights(runs: dict[str, Path], zero: str):
    ddp, ds = runs["ddp"], runs[zero]
    a, b = train_losses(ddp), train_losses(ds)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # after the EMA evaluation at step 22 too: the raw
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), step  # weights came back
    for split in ("val", "val_ema"):
        mine, ref = events(ds, split), events(ddp, split)
        assert [e["step"] for e in mine] == [e["step"] for e in ref] == [22, STEPS]
        for e, r in zip(mine, ref):
            assert e["loss"] == pytest.approx(r["loss"], rel=1e-4) and e["n"] == 360
            assert abs(e["top1"] - r["top1"]) <= 1 / 360
    assert events(ds, "val_ema")[0]["loss"] != events(ds, "val")[0]["loss"]
    want, got = _weights(ddp), _weights(ds)
    assert got.keys() == want.keys()
    for k in want:  # model.pt: the consolidated EMA (checkpoint.final_weights=ema)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    state = torch.load(ds / "checkpoints" / f"step_{STEPS:08d}" / "ffdist_state.pt",
                       weights_only=True)
    assert all(torch.equal(state["ema"]["shadow"][k], got[k]) for k in got)
    best = torch.load(ds / "checkpoints" / "best.pt", weights_only=True)
    assert set(best["ema"]["shadow"]) == set(got)  # ZeRO's best.pt: consolidated, both


def test_zero2_best_pt_gives_back_the_best_value(runs: dict[str, Path]):
    """ZeRO-2's best.pt, gathered from the partitions at the best evaluation (of the EMA:
    checkpoint.best_weights=ema), evaluates in one process to exactly that top-1 and n;
    its raw weights to the raw evaluation of the same step."""
    from ffdist.cli import main as cli

    out = runs["zero2"]
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["best"]
    ema = next(e for e in events(out, "val_ema") if e["step"] == best["step"])
    raw = next(e for e in events(out, "val") if e["step"] == best["step"])
    assert best["value"] == ema["top1"] == end["best_top1"] and best["split"] == "val_ema"
    for args, want in (([], ema), (["--weights", "ema"], ema), (["--weights", "raw"], raw)):
        assert cli(["eval", str(out), "--checkpoint", str(out / "checkpoints" / "best.pt"),
                    "--set", "log.tensorboard=false", *args]) == 0
        report = json.loads((out / "eval" / "report.json").read_text())
        assert (report["top1"], report["n"]) == (want["top1"], 360), args


# make test-all: zero2; the fast tier keeps zero3 (the same resume of the EMA shards)
@pytest.mark.parametrize("zero", [pytest.param("zero2", marks=pytest.mark.extended), "zero3"])
def test_zero_resumes_the_ema_bit_for_bit(runs: dict[str, Path], zero: str, tmp_path: Path):
    """Each rank takes its part (ZeRO-2: fragments, ZeRO-3: partitions) back out of the
    consolidated EMA of the step-20 checkpoint."""
    ref = runs[zero]
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "model.pt").unlink()
    for folder in (out / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > 20:
            shutil.rmtree(folder)
    (out / "checkpoints" / "latest").write_text("step_00000020\n")
    # the reference run's own JSON: a resume keeps the run's DeepSpeed settings (ffdist.resume_rules)
    extra = (*Z3, f"strategy.deepspeed_config={ref.parent / 'z3.json'}") if zero == "zero3" else ()
    proc = torchrun(RECIPE, *PARITY, *extra, f"output_dir={out}", timeout=300)
    assert "resumed from step 20" in proc.stdout
    assert train_losses(out) == train_losses(ref)
    for split in ("val", "val_ema"):
        assert [(e["step"], e["loss"]) for e in events(out, split)] == [
            (e["step"], e["loss"]) for e in events(ref, split)], split
    want, got = _weights(ref), _weights(out)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# make test-all: the EMA of ZeRO shards is in the fast tier through
# test_zero_ema_is_ddps_ema_of_the_full_fp32_weights[zero2], bf16 ZeRO-1 through
# tests/distributed/test_deepspeed.py::test_zero1_bf16_trains_with_accumulation
@pytest.mark.extended
def test_bf16_zero1_averages_the_fp32_master_not_the_bf16_module(tmp_path: Path):
    """During the EMA warm-up every update copies: the EMA is then exactly the fp32
    master (best.pt's consolidated `model`), which the bf16 module only rounds."""
    out = tmp_path / "run"
    torchrun(RECIPE, *FAST, CPU, "precision=bf16", "strategy.zero_stage=1",
             "schedule.max_steps=6", "schedule.epochs=1", "optim.ema_decay=0.5",
             "optim.ema_warmup_epochs=1", "checkpoint.final_weights=ema",
             f"output_dir={out}", timeout=300)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    master, ema = best["model"], best["ema"]["shadow"]
    assert all(torch.equal(ema[k], master[k]) for k in master)
    assert all(torch.equal(_weights(out)[k], master[k]) for k in master)
    # the master is not on bf16's grid: an EMA of the module's weights would be
    off_grid = sum(int((v != v.bfloat16().float()).sum()) for v in master.values())
    assert off_grid > 0.5 * sum(v.numel() for v in master.values())
