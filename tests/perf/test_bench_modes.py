"""`ffdist bench --synthetic / --reference / --precision`, FLOP counts and the peak table.

Structure and consistency only; speed is never asserted (benchmarks/ prints ratios)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import RECIPES, run

TINY = ("--steps", "3", "--warmup", "1", "--eval-steps", "2")


def _bench(tmp_path: Path, *args: str, recipe: str = "digits.yaml", check: bool = True):
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / recipe), *args,
                "--out", str(out), f"output_dir={tmp_path / 'run'}"], check=check)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_synthetic_never_iterates_a_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--synthetic times the model step alone: device-made batches, no DataLoader (train or
    eval) is ever iterated, and nothing but bench.json is written."""
    from ffdist import bench
    from ffdist.data import prefetch

    def no_loader(self):  # noqa: ANN001
        raise AssertionError("bench --synthetic iterated a DataLoader")

    monkeypatch.setattr(prefetch.DevicePrefetcher, "__iter__", no_loader)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", no_loader)
    out = tmp_path / "b.json"
    r = bench.run(bench.parse([str(RECIPES / "digits.yaml"), "--synthetic", *TINY,
                               "--out", str(out), f"output_dir={tmp_path / 'run'}",
                               "data.eval_batch_size=48"]))
    assert r["synthetic"] and r["data_wait_fraction"] < 0.05  # a list index, not a loader
    assert r["eval_images_per_s"] > 0 and len(r["ranks"][0]["step_ms"]) == 3
    assert r["ranks"][0]["eval_images"] == 2 * 48  # the eval batch size, on the device
    assert json.loads(out.read_text())["train_images_per_s"] == r["train_images_per_s"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reference_and_precisions_side_by_side(tmp_path: Path) -> None:
    """--reference --precision fp32,bf16: both precisions' Trainer and hand-written loop,
    alternating (3 repetitions by default): every side timed steps x reps, a ratio each,
    FLOPs counted, one table with both columns."""
    proc, r = _bench(tmp_path, "--synthetic", "--reference", "--precision", "fp32,bf16", *TINY)
    runs = r["runs"]
    assert [x["precision"] for x in runs] == ["fp32", "bf16"] and r["precision"] == "fp32"
    assert r["reps"] == 3
    for x in runs:
        assert x["reference"]["step_ms_p50"] > 0 and len(x["reference"]["step_ms"]) == 9
        assert x["ratio_vs_reference"] == pytest.approx(
            x["reference"]["step_ms_p50"] / x["step_ms_p50"])
        assert x["flops_per_step"] == runs[0]["flops_per_step"] > 0
        assert x["tflops_per_device"] == pytest.approx(
            x["flops_per_step"] / (x["step_ms_p50"] / 1000) / 1e12)
        assert x["mfu"] is None  # no peak for a CPU
    assert len(r["ranks"][0]["step_ms"]) == 9
    assert "fp32 | bf16" in proc.stdout and "ffdist / loop" in proc.stdout
    assert "TFLOP/s per device" in proc.stdout


def test_reference_loop_trains_the_same_model_with_the_same_optimizer() -> None:
    """The loop is a hand-written copy of the run: same architecture and parameter count,
    ffdist's optimizer (fused, two groups), GradScaler for fp16; it learns on fixed data."""
    from ffdist import assemble, bench_timing, dist, recipe_load
    from ffdist.reference import ReferenceLoop

    rcp = recipe_load.load(RECIPES / "digits.yaml", ["precision=fp32", "data.batch_size=32"])
    info = dist.init()
    resolved = assemble.resolve_for(rcp, info)
    loop = ReferenceLoop(rcp, resolved, info)
    assert assemble.param_counts(loop.raw) == assemble.param_counts(assemble.build_model(rcp))
    assert loop.optimizer.defaults["fused"] and len(loop.optimizer.param_groups) == 2
    batches = bench_timing.device_batches(rcp, info, 32, resolved.image_size, n=1)
    crit = torch.nn.CrossEntropyLoss()
    x, y = batches[0]
    before = crit(loop.model(x), y).item()
    it = iter(batches * 20)
    for _ in range(20):
        loop.train_step(it, 0.05)
    assert crit(loop.model(x), y).item() < 0.9 * before  # random labels: memorised a bit


def test_bad_bench_flags_are_one_sentence(tmp_path: Path) -> None:
    proc, _ = _bench(tmp_path, "--precision", "bf16,fp64", check=False)
    assert proc.returncode == 2 and "'fp64' is not a precision" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc, _ = _bench(tmp_path, "--reference", "strategy.name=deepspeed", *TINY, check=False)
    assert proc.returncode == 2 and "DeepSpeed has none to compare with" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_step_flops_of_resnet50_match_its_published_count() -> None:
    """ResNet-50 at 224 px: 4.09 GMACs forward per image (torchvision's model card: 4.09
    GFLOPS counted as multiply-adds), i.e. 8.18 GFLOPs; backward computes the input and
    weight gradients (2x, minus the first layer's input gradient): ~24.3 GFLOPs per image.
    The count scales with micro-batch and accumulation."""
    from ffdist import recipe_load
    from ffdist.flops import step_flops

    rcp = recipe_load.load(RECIPES / "resnet50.yaml", [])
    one = step_flops(rcp, micro=2, accum=1, image_size=224)
    assert 24.0e9 < one / 2 < 24.6e9
    assert step_flops(rcp, micro=2, accum=3, image_size=224) == 3 * one
    frozen = recipe_load.load(RECIPES / "resnet50.yaml", ["model.freeze=[backbone]"])
    assert step_flops(frozen, micro=2, accum=1, image_size=224) < 0.5 * one  # no backbone grads


def test_flops_on_meta_equal_flops_of_a_real_step() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from ffdist import assemble, recipe_load
    from ffdist.flops import step_flops

    rcp = recipe_load.load(RECIPES / "digits.yaml", [])
    model = assemble.build_model(rcp)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert step_flops(rcp, micro=16, accum=1, image_size=8) == counter.get_total_flops() > 0


@pytest.mark.parametrize("name,precision,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", ("H100 SXM5", 989.4)),
    ("NVIDIA H100 PCIe", "fp16", ("H100 PCIe", 756.5)),
    ("NVIDIA H100 NVL", "bf16", ("H100 NVL", 835.5)),
    ("NVIDIA H200", "bf16", ("H200 SXM", 989.4)),
    ("NVIDIA GH200 480GB", "bf16", ("GH200", 989.4)),
    ("NVIDIA A100-SXM4-80GB", "bf16", ("A100", 312.0)),
    ("NVIDIA A100 80GB PCIe", "fp32", ("A100", 156.0)),
    ("NVIDIA L4", "fp16", ("L4", 121.0)),
    ("NVIDIA L40S", "bf16", ("L40S", 362.05)),
    ("Tesla V100-SXM2-16GB", "fp16", ("V100 SXM2", 125.0)),
    ("Tesla V100-SXM2-16GB", "bf16", None),   # no bf16 tensor cores
    ("Tesla T4", "fp16", ("T4", 65.0)),
    ("NVIDIA A10G", "bf16", None),            # not A10; not in the table
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_table(name: str, precision: str, want) -> None:
    from ffdist.flops import peak_tflops

    assert peak_tflops(name, precision) == want
