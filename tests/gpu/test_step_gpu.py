"""The steady-state step on CUDA: no host sync between log lines, the skip on the device,
bench's CUDA figures. Marked `gpu` ("no GPU" skips them elsewhere); written after the
PyTorch documentation (torch.cuda.set_sync_debug_mode, CUDA events) on a machine without a
GPU: benchmarks/gpu_check.py runs them where there is one.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, RECIPES, run

pytestmark = pytest.mark.gpu
CUDA = "launch.device=cuda"


def _trainer(tmp_path: Path, *overrides: str):
    from ffdist import bench, dist, recipe_load

    rcp = recipe_load.load(RECIPES / "digits.yaml", [CUDA, *FAST, f"output_dir={tmp_path}",
                                                "log.every_steps=1000", *overrides])
    return bench.setup(rcp, dist.init(rcp.launch))


@pytest.mark.parametrize("overrides", [
    ("precision=bf16", "optim.name=sgd"),
    ("precision=fp16", "optim.name=sgd", "optim.grad_clip=1.0"),
    ("precision=fp16", "optim.name=adamw"),
    ("precision=fp32", "optim.name=adamw", "model.channels_last=true"),
])
def test_steady_state_steps_never_sync_the_host(tmp_path: Path, overrides: tuple) -> None:
    """torch.cuda.set_sync_debug_mode("error") turns every stream/device synchronisation
    and blocking copy into an error: eight Trainer steps on the recipe's own loader and
    prefetcher raise none (the lagged flag read is an event wait, not a sync), then the
    log-line read settles all pending flags."""
    trainer = _trainer(tmp_path, *overrides)
    batches = iter(trainer.train_batches)
    for i in range(3):  # lazy initialisation: cuDNN, GradScaler's scale, optimizer state
        trainer.train_step(batches, trainer.lr_at(i))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [trainer.train_step(batches, trainer.lr_at(3 + i)) for i in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.flags.pending() == 1  # the newest step's flags wait for the next step
    trainer.settle_flags()
    assert trainer.flags.pending() == 0 and trainer.progress.skipped_steps == 0
    assert all(s.applied.device.type == "cuda" for s in stats)
    assert sum(float(s.applied) for s in stats) >= 7  # fp16 may still overflow once


def test_a_nan_step_is_skipped_on_the_device_and_counted_a_step_later(
        tmp_path: Path) -> None:
    """A NaN loss at step 5: the weights do not move on that step (the fused kernel skipped
    it, no host read), applied is 0.0 on the device, and the skip is counted when step 6
    is queued."""
    class NanAtStep5:  # an engine.StepHooks, as ffdist.faults installs under FFDIST_FAULT
        @staticmethod
        def loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
            return loss * float("nan") if step == 5 else loss

        @staticmethod
        def after_step(step: int, rank: int) -> None:
            pass

    trainer = _trainer(tmp_path, "precision=bf16", "schedule.nan_policy=skip")
    trainer.hooks = NanAtStep5()
    batches = iter(trainer.train_batches)
    model = trainer.strategy.unwrap()
    for i in range(4):
        trainer.train_step(batches, trainer.lr_at(i))
        trainer.progress.step += 1
    before = [p.detach().clone() for p in model.parameters()]
    stats = trainer.train_step(batches, trainer.lr_at(4))
    trainer.progress.step += 1
    assert stats.applied.item() == 0.0 and not stats.loss_finite.item()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.progress.skipped_steps == 0  # not read yet
    trainer.train_step(batches, trainer.lr_at(5))
    assert trainer.progress.skipped_steps == 1 and trainer.progress.bad_in_a_row == 1


def test_bench_reports_tflops_mfu_and_the_reference_ratio_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"), CUDA,
                "--synthetic", "--reference", "--precision", "bf16,fp16", "--steps", "10",
                "--warmup", "3", "--reps", "2", "--eval-steps", "2", "--out", str(out),
                f"output_dir={tmp_path / 'run'}"])
    r = json.loads(out.read_text())
    name = torch.cuda.get_device_name()
    from ffdist.flops import peak_tflops

    for x in r["runs"]:
        assert x["gpu_name"] == name and x["tflops_per_device"] > 0
        assert (x["mfu"] is not None) == (peak_tflops(name, x["precision"]) is not None)
        assert 0 < x["ratio_vs_reference"] < 10 and x["reference"]["peak_mem_bytes"] > 0
        assert 0 < x["peak_mem_bytes"] < torch.cuda.get_device_properties(0).total_memory
    assert "bf16 | fp16" in proc.stdout and "CUDA allocated" in proc.stdout


def test_fused_sgd_fp16_resnet_stays_finite(tmp_path: Path) -> None:
    """The failure seen on an H100 (ResNet-50 fp16 + fused SGD: NaN from step 4 on), at a
    small size: ResNet-18, 64 px, 12 steps on device batches from a fresh process."""
    from ffdist import bench, bench_timing, dist, recipe_load

    rcp = recipe_load.load(RECIPES / "resnet50.yaml", [CUDA, "model.name=resnet18", "precision=fp16",
                                                  "data.name=synthetic", "data.image_size=64",
                                                  "data.synthetic_size=200", "data.batch_size=32",
                                                  "data.num_workers=0", f"output_dir={tmp_path}"])
    info = dist.init(rcp.launch)
    trainer = bench.setup(rcp, info)
    batches = itertools.cycle(bench_timing.device_batches(rcp, info, 32, 64))
    losses = [trainer.train_step(batches, trainer.lr_at(i)).loss for i in range(12)]
    trainer.settle_flags()
    assert all(torch.isfinite(v).item() for v in losses), [float(v) for v in losses]
    assert all(torch.isfinite(p).all() for p in trainer.strategy.unwrap().parameters())
