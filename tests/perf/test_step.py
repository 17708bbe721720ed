"""The fast-path pieces: device-side eval counts, percentiles, and model.compile end to end
(aot_eager backend: it traces and runs the same compile path as inductor without spending a
minute generating C++ kernels on a 2-core CI machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffdist.bench_report import combine
from ffdist.bench_timing import percentile
from ffdist.checkpoint import load_torch
from ffdist.errors import RecipeError
from ffdist.metrics import EvalCounts
from ffdist.models.small import SmallCNN
from ffdist.strategies.single import _compiled
from tests.helpers import CPU, FAST, events, torchrun


def test_eval_counts_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    counts = EvalCounts(4, torch.device("cpu"))
    all_logits, all_y = [], []
    for n in (7, 5, 9):  # uneven batches, as the last eval batch is
        logits, y = torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
        counts.update(logits, y, torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        all_logits.append(logits)
        all_y.append(y)
    logits, y = torch.cat(all_logits), torch.cat(all_y)
    result = counts.reduce()
    pred = logits.argmax(1)
    assert result["n"] == 21
    assert result["top1"] == pytest.approx((pred == y).double().mean().item())
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(y.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert torch.equal(counts.confusion, expected)


def test_percentile_and_combine_take_the_slowest_rank() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == 4.6
    fast = {"elapsed_s": 1.0, "step_ms": [10.0, 10.0], "eval_s": 0.5, "eval_images": 50,
            "data_wait_fraction": 0.1, "peak_mem_bytes": 5, "gpu": {}}
    slow = {**fast, "elapsed_s": 2.0, "step_ms": [30.0, 5.0], "eval_s": 1.0, "peak_mem_bytes": 7}
    r = combine([fast, slow], global_batch=8, steps=2)
    assert r["train_images_per_s"] == 8.0  # 16 images when the slower rank is done
    assert r["eval_images_per_s"] == 100.0 and r["peak_mem_bytes"] == 7
    assert r["step_ms_p50"] == 20.0  # per-step max over ranks: 30 and 10


def _assert_plain_keys(state: dict) -> None:
    assert not [k for k in state if "_orig_mod" in k or k.startswith("module.")]
    SmallCNN(num_classes=10, in_channels=1).load_state_dict(state)  # a stock module loads it


def test_compile_before_ddp_checkpoints_have_plain_keys(tmp_path: Path) -> None:
    # DDP(torch.compile(model)) under torchrun: the path model.compile takes with N ranks
    # (the single-device one is its first half, SingleDevice.__init__).
    torchrun("digits.yaml", f"output_dir={tmp_path}", CPU, "model.compile=true",
             "model.compile_backend=aot_eager", "schedule.max_steps=3", "schedule.epochs=1",
             *FAST)
    _assert_plain_keys(load_torch(tmp_path / "model.pt"))
    # the per-interval timing that also goes to TensorBoard (train/data_wait_fraction, ...)
    train_events = events(tmp_path, "train")
    assert train_events and all(0 <= e["data_wait_fraction"] < 1 and e["step_ms"] > 0
                                and e["images_per_s"] > 0 for e in train_events)
    _assert_plain_keys(load_torch(next((tmp_path / "checkpoints").glob("step_*.pt")))["model"])


def test_unknown_compile_backend_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="model.compile_backend='nope'"):
        _compiled(torch.nn.Linear(2, 2), "nope")


@pytest.mark.parametrize("channels_last", [True, False])
def test_prefetcher_normalizes_uint8_batches_in_the_asked_layout(channels_last: bool) -> None:
    from ffdist.data import DevicePrefetcher

    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    y = torch.arange(4)
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    xb, yb = next(iter(DevicePrefetcher([(x, y)], torch.device("cpu"), mean, std, channels_last)))
    expected = (x.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert xb.dtype == torch.float32 and torch.allclose(xb, expected, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert xb.is_contiguous(memory_format=fmt) and torch.equal(yb, y)
