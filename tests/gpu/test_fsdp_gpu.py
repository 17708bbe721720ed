"""FSDP on CUDA (marked `gpu` / `multigpu`: skipped with "no GPU" here; written after the
PyTorch FSDP2 documentation on a machine without a GPU, run by `make gpu-check`): bf16 with
activation checkpointing trains and its DCP checkpoint resumes; the steady-state step
does not sync the host (fused AdamW on DTensors); fp16's loss scaling stays finite; with
2 GPUs (NCCL) FSDP trains like DDP.

Tolerance of the 2-GPU comparison: CUDA picks kernels per shape and reduces some sums
with atomics (TF32 is on for convolutions by default), so fp32 runs differ in the last
bits run to run: 1e-4 relative on each step's loss, far below what a wrong reduction or a
lost update does (1e-2 within these steps).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, RECIPES, end_event, torchrun, train, train_losses

CUDA = "launch.device=cuda"
VIT = ("data.name=synthetic", "data.image_size=64", "model.name=vit_tiny", "model.in_channels=3",
       "data.batch_size=32", "optim.name=adamw", "optim.lr=0.001", "schedule.epochs=1",
       "schedule.max_steps=12", "log.every_steps=1", "strategy.name=fsdp", *FAST)


def _finite(run_dir: Path) -> dict[int, float]:
    losses = train_losses(run_dir)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    return losses


@pytest.mark.gpu
def test_fsdp_bf16_with_activation_checkpointing_trains_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("digits.yaml", CUDA, *VIT, "precision=bf16", "model.activation_checkpointing=blocks",
          "checkpoint.every_steps=6", f"output_dir={out}")
    losses = _finite(out)
    assert sorted(losses) == list(range(1, 13))
    folder = out / "checkpoints" / "step_00000006"
    assert (folder / "__0_0.distcp").is_file() and (folder / "ffdist_state.pt").is_file()
    weights = torch.load(out / "model.pt", weights_only=True)  # default map_location
    assert all(v.device.type == "cpu" and v.dtype == torch.float32
               for v in weights.values() if v.is_floating_point())
    again = tmp_path / "again"  # resumed from step 6: continues where the run was
    import shutil

    shutil.copytree(out, again)
    (again / "model.pt").unlink()
    shutil.rmtree(again / "checkpoints" / "step_00000012")
    (again / "checkpoints" / "latest").write_text("step_00000006\n")
    proc = train("digits.yaml", CUDA, *VIT, "precision=bf16",
                 "model.activation_checkpointing=blocks", "checkpoint.every_steps=6",
                 f"output_dir={again}")
    assert "resumed from step 6" in proc.stdout + proc.stderr
    resumed = _finite(again)
    for step in range(7, 13):  # bf16 on CUDA: not bit-exact, close
        assert resumed[step] == pytest.approx(losses[step], rel=1e-2), step


@pytest.mark.gpu
def test_fsdp_steady_state_steps_never_sync_the_host(tmp_path: Path) -> None:
    """As tests/gpu/test_step_gpu.py for single/DDP: eight FSDP steps (one rank, NCCL,
    fused AdamW on DTensors, bf16) under torch.cuda.set_sync_debug_mode("error")."""
    from ffdist import bench, dist, recipe_load

    rcp = recipe_load.load(RECIPES / "digits.yaml", [CUDA, *VIT, "precision=bf16",
                                                     f"output_dir={tmp_path}",
                                                     "log.every_steps=1000"])
    trainer = bench.setup(rcp, dist.init(rcp.launch))
    batches = iter(trainer.train_batches)
    for i in range(3):
        trainer.train_step(batches, trainer.lr_at(i))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [trainer.train_step(batches, trainer.lr_at(3 + i)) for i in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.settle_flags()
    assert sum(float(s.applied) for s in stats) == 8


@pytest.mark.gpu
def test_fsdp_fp16_loss_scaling_stays_finite(tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    train("digits.yaml", CUDA, *VIT, "precision=fp16", f"output_dir={out}")
    _finite(out)
    assert end_event(out)["step"] == 12


@pytest.mark.multigpu
def test_fsdp_on_two_gpus_trains_like_ddp(tmp_path: Path) -> None:
    common = (CUDA, *VIT, "precision=fp32")
    torchrun("digits.yaml", *common, f"output_dir={tmp_path / 'fsdp'}")
    torchrun("digits.yaml", *common, "strategy.name=ddp", f"output_dir={tmp_path / 'ddp'}")
    a, b = _finite(tmp_path / "fsdp"), _finite(tmp_path / "ddp")
    assert end_event(tmp_path / "fsdp")["world_size"] == 2
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step
