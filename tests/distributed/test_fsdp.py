"""FSDP (strategy.name=fsdp) with real torchrun ranks on the CPU (gloo): it trains like DDP
and like one process, with activation checkpointing on; its DCP checkpoints resume at
another world size; a save killed at several points falls back to the checkpoint before;
eval, predict and export read an FSDP run as any other.

The runs: vit_tiny (ffdist's small ViT: LayerNorm only, so the result does not depend on
how the global batch is split) on synthetic 32-pixel images, 8 SGD steps of 24 images,
fp32, an EMA of the weights, checkpoints every 3 steps, 61 eval images (odd: the two
ranks' eval shards differ, so FSDP's padded eval forwards run).

Tolerances, and why (measured on the development machine, 2 CPU cores, torch 2.14):
- FSDP vs DDP, 2 ranks, fp32: the same per-rank batches, the same reductions of the same
  2 gradients (a 2-way average has one order): measured bit-identical losses and weights.
  We allow 1e-6 relative on losses and 1e-6 of the total update on the weights.
- FSDP (2 ranks) vs one process, fp32: one 24-image gradient against the average of two
  12-image ones: sums round differently, ~1e-7 relative. Measured: losses within 1.1e-7
  relative, weights within 3e-6 of the total update. We allow 1e-5 relative on losses and
  1e-4 of the update on the weights: a real bug (a gradient averaged twice, a rank's
  shard not updated, a wrong lr) moves them by 1e-2 or more (`||w - w_ref|| / ||w_ref - w0||`
  is the share of the whole training update that differs).
- resumed at another world size: the same bounds as one process vs 2 ranks (the fp32
  sums of the resumed part round as the new world size rounds them).
- resumed at the same world size: exact (the DCP shards hold the fp32 values and every
  rank's RNG state is restored).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fault import kit
from tests.helpers import (
    BIN,
    CPU,
    FAST,
    RECIPES,
    accelerate,
    end_event,
    events,
    free_port,
    run,
)

pytestmark = pytest.mark.slow

STEPS = 8
ARGS = (CPU, *FAST, "data.name=synthetic", "data.synthetic_size=305", "data.image_size=32",
        "model.name=vit_tiny", "model.in_channels=3", "data.batch_size=24", "optim.name=sgd",
        "optim.lr=0.02", "optim.ema_decay=0.9", "precision=fp32", "schedule.epochs=1",
        f"schedule.max_steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=5",
        "log.every_steps=1")
FSDP = ("strategy.name=fsdp", "model.activation_checkpointing=blocks")
VAL = 61  # int(305 * 0.2)


def python_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *ARGS,
            f"output_dir={out}", *overrides]


def torchrun_cmd(out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *ARGS,
            f"output_dir={out}", *overrides]


def trained(cmd: list[str], timeout: float = 300, **env: str) -> None:
    proc = kit.run(cmd, timeout=timeout, **env)
    assert proc.returncode == 0, kit.explain(proc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted runs, each trained once on first use: `fsdp` (2 ranks, activation
    checkpointing), `ddp` (2 ranks), `one` (one process)."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    cmds = {"fsdp": torchrun_cmd(root / "fsdp", *FSDP), "ddp": torchrun_cmd(root / "ddp"),
            "one": python_cmd(root / "one")}

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            trained(cmds[name])
            self[name] = root / name
            return self[name]

    return Lazy()


def assert_close_runs(got: Path, want: Path, loss_rtol: float, weight_tol: float,
                      overrides: tuple[str, ...] = (),
                      steps: range = range(1, STEPS + 1)) -> None:
    """Per-step losses within `loss_rtol` (relative), and model.pt within `weight_tol` of
    the total training update: ||w_got - w_want|| <= weight_tol * ||w_want - w0|| (w0: the
    initial weights of ARGS + `overrides`; BatchNorm statistics left out, they are not
    trained)."""
    from ffdist import recipe_load
    from ffdist.assemble import build_model

    a, b = kit.train_losses(got), kit.train_losses(want)
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=loss_rtol), f"step {step}"
    wa = torch.load(got / "model.pt", weights_only=True)
    wb = torch.load(want / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    assert all(v.dtype == torch.float32 for v in wa.values() if v.is_floating_point())
    rcp = recipe_load.load(RECIPES / "digits.yaml", [o for o in (*ARGS, *overrides) if "=" in o])
    w0 = build_model(rcp, load_weights=False).state_dict()
    params = [k for k in wa if wa[k].is_floating_point() and "running" not in k]
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in params])
    update = torch.cat([(wb[k] - w0[k]).flatten() for k in params])
    assert update.norm() > 0.01, "the runs did not train"
    assert diff.norm() <= weight_tol * update.norm(), (diff.norm(), update.norm())


def test_fsdp_with_activation_checkpointing_trains_like_ddp_and_one_process(runs):
    assert_close_runs(runs["fsdp"], runs["ddp"], loss_rtol=1e-6, weight_tol=1e-6)
    assert_close_runs(runs["fsdp"], runs["one"], loss_rtol=1e-5, weight_tol=1e-4)
    from ffdist import recipe_load
    from ffdist.assemble import build_model

    plain = build_model(recipe_load.load(RECIPES / "digits.yaml", [a for a in ARGS if "=" in a]))
    assert torch.load(runs["fsdp"] / "model.pt", weights_only=True).keys() == \
        plain.state_dict().keys()  # a stock model's keys: no FSDP or checkpointing prefix
    val, val_ema = events(runs["fsdp"], "val")[-1], events(runs["fsdp"], "val_ema")[-1]
    assert val["n"] == val_ema["n"] == VAL and val["world_size"] == 2  # uneven shards, padded
    ddp_ema = events(runs["ddp"], "val_ema")[-1]  # the EMA of the shards is DDP's EMA
    assert val_ema["loss"] == pytest.approx(ddp_ema["loss"], rel=1e-5)
    assert val_ema["top1"] == ddp_ema["top1"]

    folder = runs["fsdp"] / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "ffdist_state.pt"]
    marker = torch.load(folder / "ffdist_state.pt", weights_only=True)
    assert marker["layout"] == {"kind": "shards", "format": "torch-dcp", "world_size": 2,
                                "params": {}}
    model_keys = set(torch.load(runs["fsdp"] / "model.pt", weights_only=True))
    assert marker["model"] is None and set(marker["ema"]["shadow"]) == model_keys
    best = torch.load(runs["fsdp"] / "checkpoints" / "best.pt", weights_only=True)
    assert best["kind"] == "weights" and set(best["model"]) == model_keys


def cut_at(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as it was right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    (dst / "model.pt").unlink()
    (dst / "checkpoints" / "best.pt").unlink(missing_ok=True)
    for folder in (dst / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


def resumed(cmd: list[str], out: Path, at: int) -> None:
    proc = kit.run(cmd, timeout=300)
    assert proc.returncode == 0, kit.explain(proc)
    assert f"resumed from step {at}" in proc.stdout + proc.stderr, kit.explain(proc)
    assert sorted(kit.train_losses(out)) == list(range(1, STEPS + 1))


# make test-all; test_a_save_killed_after_its_shards_falls_back_and_resumes_in_one_process
# covers resharding (2 -> 1) in the fast tier
@pytest.mark.extended
def test_a_two_rank_checkpoint_resumes_on_three_ranks(runs, tmp_path):
    three = tmp_path / "three"
    ema = "checkpoint.final_weights=ema"  # model.pt: the consolidated EMA of the shards
    trained(torchrun_cmd(three, *FSDP, ema, nproc=3), timeout=600)  # uninterrupted, 3 ranks
    out = tmp_path / "to_three"
    cut_at(runs["fsdp"], out, 3)
    resumed(torchrun_cmd(out, *FSDP, ema, nproc=3), out, 3)
    assert_close_runs(out, three, loss_rtol=1e-5, weight_tol=1e-4, steps=range(4, 9))
    assert events(out, "val")[-1]["n"] == VAL  # 21 + 20 + 20 eval images, padded forwards
    ema, want = events(out, "val_ema")[-1], events(three, "val_ema")[-1]
    assert ema["loss"] == pytest.approx(want["loss"], rel=1e-5)


def killed_at_step_6(out: Path, point: str) -> None:
    """A 2-rank run whose save of step 6 is killed at `point`: `latest` still names the
    complete step-3 checkpoint, the step-6 folder has no marker and never counts."""
    killed = kit.run(torchrun_cmd(out, *FSDP), timeout=300,
                     FFDIST_FAULT=f"kill_in_save:step=6:{point}")
    assert killed.returncode != 0, kit.explain(killed)
    assert kit.latest(out) == "step_00000003"
    assert not (out / "checkpoints" / "step_00000006" / "ffdist_state.pt").is_file()


def test_a_save_killed_after_its_shards_falls_back_and_resumes_in_one_process(runs, tmp_path):
    """Rank 1 dies once its DCP shards are on disk, so rank 0 never marks the folder
    complete; the run then continues in ONE process from the 2-rank checkpoint of step 3
    (DCP reshards model, optimizer and the EMA) like the uninterrupted one-process run."""
    out = tmp_path / "run"
    killed_at_step_6(out, "at=shards:rank=1")
    resumed(python_cmd(out, *FSDP), out, 3)
    assert_close_runs(out, runs["one"], loss_rtol=1e-5, weight_tol=1e-4, steps=range(4, 9))
    ema, want = events(out, "val_ema")[-1], events(runs["one"], "val_ema")[-1]
    assert ema["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert {e["world_size"] for e in events(out, "train") if e["step"] > 3} == {1}
    folder = out / "checkpoints" / "step_00000006"  # written again, whole, by one rank
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata", "__0_0.distcp", "ffdist_state.pt"]


# make test-all; the fast tier kills a save after its shards
# (test_a_save_killed_after_its_shards_falls_back_and_resumes_in_one_process)
@pytest.mark.extended
@pytest.mark.parametrize("point", [
    pytest.param("at=start:rank=1", id="during-dcp"),  # rank 0 is inside DCP's collectives
    pytest.param("at=marker", id="torn-marker"),       # half of ffdist_state.pt, then SIGKILL
])
def test_a_save_killed_resumes_exactly_from_the_checkpoint_before(runs, tmp_path, point):
    out = tmp_path / "run"
    killed_at_step_6(out, point)
    resumed(torchrun_cmd(out, *FSDP), out, 3)
    assert kit.train_losses(out) == kit.train_losses(runs["fsdp"])  # same world size: exact
    kit.same_weights(out / "model.pt", runs["fsdp"] / "model.pt")


def test_eval_predict_and_export_read_an_fsdp_run(runs, tmp_path, capsys):
    from PIL import Image

    from ffdist.cli import main as cli

    run_dir = runs["fsdp"]
    assert cli(["eval", str(run_dir)]) == 0
    import json

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    last = events(run_dir, "val")[-1]
    assert report["n"] == VAL and report["top1"] == pytest.approx(last["top1"], abs=1e-9)
    assert report["loss"] == pytest.approx(last["loss"], rel=1e-5)

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            images / f"{i}.png")
    out = tmp_path / "preds.csv"
    assert cli(["predict", str(run_dir), str(images), "--out", str(out), "--grid", "0"]) == 0
    assert len(out.read_text().splitlines()) == 4

    assert cli(["export", str(run_dir), "--format", "torchscript",
                "--out", str(tmp_path / "m.pt")]) == 0
    assert "max abs difference" in capsys.readouterr().out


# make test-all: the real launcher; the fast tier checks the same refusal from the same
# environment (tests/unit/test_launcher_env.py::test_accelerate_use_fsdp_is_refused_in_one_sentence)
@pytest.mark.extended
def test_accelerate_launch_use_fsdp_is_refused_in_one_sentence(tmp_path):
    """ffdist shards the model itself: accelerate's FSDP flags would be silently ignored.
    The process accelerate starts refuses them (exit 2, its one sentence, nothing written;
    accelerate then reports the failed worker as it reports any). The sentence alone:
    tests/unit/test_dist_env.py."""
    out = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--use_fsdp", "--num_processes", "1",
           "--main_process_port", str(free_port()), "-m", "ffdist.train",
           str(RECIPES / "digits.yaml"), CPU, *FAST, f"output_dir={out}"]
    proc = kit.run(cmd, timeout=120)
    sentence = "ffdist: error: accelerate launch --use_fsdp (ACCELERATE_USE_FSDP) has no " \
               "effect on ffdist"
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, kit.explain(proc)
    assert sentence in proc.stderr and not out.exists()


# make test-all: the fast tier trains FSDP under torchrun (the same process group: accelerate
# launch is torchrun underneath, tests/integration/test_launchers.py)
@pytest.mark.extended
def test_fsdp_under_accelerate_launch_and_ffdist_launch(tmp_path):
    acc = tmp_path / "acc"
    accelerate("digits.yaml", *ARGS, *FSDP, f"output_dir={acc}", "schedule.max_steps=3",
               launch_args=("--multi_gpu", "--num_processes", "2"))
    assert end_event(acc)["world_size"] == 2
    launched = tmp_path / "launched"
    run([sys.executable, "-m", "ffdist.cli", "launch", str(RECIPES / "digits.yaml"), *ARGS,
         *FSDP, "launch.nproc=2", f"output_dir={launched}", "schedule.max_steps=3"],
        timeout=300)
    assert end_event(launched)["world_size"] == 2
    assert kit.train_losses(acc) == kit.train_losses(launched)
    assert (launched / "checkpoints" / "step_00000003" / "__1_0.distcp").is_file()


# make test-all: second configurations of
# test_fsdp_with_activation_checkpointing_trains_like_ddp_and_one_process (vit_tiny, fp32)
@pytest.mark.extended
@pytest.mark.parametrize("precision,loss_rtol,weight_tol", [
    # measured: identical losses, weights within 1e-10 of the update (FSDP's bf16 gathered
    # weights compute what DDP's bf16 autocast computes for conv/BN/ReLU nets)
    ("bf16", 1e-4, 1e-3),
    # measured: identical too (the same 2-way reductions); room for other orders
    ("fp32", 1e-5, 1e-4),
])
def test_a_resnet_trains_like_ddp(tmp_path, precision, loss_rtol, weight_tol):
    """A ResNet (BatchNorm units kept in fp32 under bf16) with FSDP and DDP, 2 ranks each:
    the same per-rank batches, so the same BatchNorm statistics (one process would see
    other ones: no comparison with it). channels_last off for both: FSDP gathers weights
    into contiguous buffers, and a ResNet at 32 px (1x1 maps in layer4, BatchNorm over 12
    values) turns the other conv algorithms of NHWC weights into percent differences within
    6 steps, for DDP against itself too."""
    common = ("model.name=resnet18", "model.channels_last=false", f"precision={precision}",
              "optim.lr=0.01", "optim.ema_decay=0", "schedule.max_steps=5",
              "checkpoint.every_steps=0")
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    trained(torchrun_cmd(fsdp, *common, "strategy.name=fsdp"))
    trained(torchrun_cmd(ddp, *common))
    assert_close_runs(fsdp, ddp, loss_rtol, weight_tol, common, steps=range(1, 6))


# make test-all: a second configuration of
# test_fsdp_with_activation_checkpointing_trains_like_ddp_and_one_process (there fp32)
@pytest.mark.extended
def test_vit_in_bf16_trains_like_ddp_and_one_process(tmp_path):
    """bf16: FSDP computes every op of the gathered bf16 weights in bf16, DDP's autocast
    keeps LayerNorm, softmax and GELU in fp32, one process sums one gradient instead of
    two. Measured: losses within 3.3e-4 relative, weights within 1.2e-2 of the update
    (SGD; DDP against one process: 2.6e-4, 1.2e-2); we allow 2e-3 and 1e-1, still below a
    wrong lr or a gradient averaged twice (the loss moves by 1e-2 within these steps)."""
    common = ("precision=bf16", "optim.ema_decay=0", "checkpoint.every_steps=0")
    out = {n: tmp_path / n for n in ("fsdp", "ddp", "one")}
    trained(torchrun_cmd(out["fsdp"], *common, *FSDP))
    trained(torchrun_cmd(out["ddp"], *common))
    trained(python_cmd(out["one"], *common))
    assert_close_runs(out["fsdp"], out["ddp"], 2e-3, 1e-1, common)
    assert_close_runs(out["fsdp"], out["one"], 2e-3, 1e-1, common)



# make test-all: model.compile is a second configuration of the FSDP step
# (test_fsdp_with_activation_checkpointing_trains_like_ddp_and_one_process)
@pytest.mark.extended
def test_compiled_blocks_train_like_the_eager_ones(runs, tmp_path):
    """model.compile under FSDP compiles each block before it is sharded (with activation
    checkpointing inside); aot_eager runs the same kernels, so within fp32 rounding."""
    out = tmp_path / "compiled"
    trained(torchrun_cmd(out, *FSDP, "model.compile=true", "model.compile_backend=aot_eager"),
            timeout=600)
    assert_close_runs(out, runs["fsdp"], loss_rtol=1e-5, weight_tol=1e-4)


# make test-all: activation checkpointing under the other strategies (the fast tier runs it
# under FSDP, test_fsdp_with_activation_checkpointing_trains_like_ddp_and_one_process, and
# its gradients are bit-identical in tests/unit/test_activation_checkpointing.py)
@pytest.mark.extended
def test_activation_checkpointing_under_ddp_and_zero3_trains_like_without(tmp_path):
    """Drop-path on (the recompute must draw the same masks): DDP and ZeRO-3 with every
    block checkpointed log the losses of DDP without checkpointing (measured: identical
    for DDP, within 1e-7 for ZeRO-3's other reduction order)."""
    common = ("model.drop_path_rate=0.1", "optim.ema_decay=0", "checkpoint.every_steps=0",
              "schedule.max_steps=4")
    ac = "model.activation_checkpointing=blocks"
    plain, ddp, zero3 = tmp_path / "plain", tmp_path / "ddp", tmp_path / "zero3"
    trained(torchrun_cmd(plain, *common))
    trained(torchrun_cmd(ddp, *common, ac))
    trained(torchrun_cmd(zero3, *common, ac, "strategy.name=deepspeed", "strategy.zero_stage=3"))
    want = kit.train_losses(plain)
    assert sorted(want) == [1, 2, 3, 4]
    assert kit.train_losses(ddp) == want
    for step, loss in kit.train_losses(zero3).items():
        assert loss == pytest.approx(want[step], rel=1e-5), step
