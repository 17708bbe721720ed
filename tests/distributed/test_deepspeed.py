"""DeepSpeed ZeRO with 2 real ranks (torchrun, gloo on the CPU): stages 1 and 3, offload,
sharded checkpoints, the consolidated model.pt, and the derived-config error.
(ZeRO-2 is trained, resumed and compared with DDP in tests/integration/test_launchers.py.)"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import (
    CPU,
    FAST,
    RECIPES,
    TWO_RANK_DEVICES,
    end_event,
    events,
    run,
    torchrun,
    train_losses,
)

pytestmark = pytest.mark.slow
RECIPE = "digits_zero2.yaml"


def _evaluate_model_pt(run_dir, *overrides: str) -> float:
    """Top-1 of <run>/model.pt loaded into a FRESH model (weights_only=True), one process."""
    from ffdist import models, recipe_load
    from ffdist.assemble import build_data, resolve
    from ffdist.data import DevicePrefetcher

    rcp = recipe_load.load(RECIPES / RECIPE, list(overrides))
    cpu = torch.device("cpu")
    streams = build_data(rcp, resolve(rcp, 1, cpu), 0)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = models.build(rcp.model)
    model.load_state_dict(state)  # strict: every key of a stock model, nothing else
    model.eval()
    spec = streams.spec
    hits = n = 0
    with torch.no_grad():
        for x, y in DevicePrefetcher(streams.eval, cpu, spec.mean, spec.std):
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return hits / n


# make test-all: ZeRO-3 with offload is a second configuration; ZeRO-3 itself (training to the
# end, the consolidated model.pt, resume) is in the fast tier through
# tests/distributed/test_ema_zero.py::test_zero_resumes_the_ema_bit_for_bit[zero3]
@pytest.mark.extended
def test_zero3_offload_trains_evaluates_and_writes_a_consolidated_model(tmp_path):
    """ZeRO-3 partitions the parameters themselves, so evaluation must run the forward on
    every rank (uneven eval shards included) and model.pt must gather them."""
    out = tmp_path / "z3"
    overrides = (CPU, "strategy.zero_stage=3", "strategy.offload_optimizer=true",
                 "strategy.offload_params=true", "precision=fp32",
                 "strategy.deepspeed_config=launch/deepspeed/zero3_offload.json")  # the example
    torchrun(RECIPE, *FAST, *overrides, "schedule.max_steps=8", "log.every_steps=1",
             f"output_dir={out}")
    end = end_event(out)
    assert end["world_size"] == 2 and end["step"] == 8
    val = events(out, "val")[-1]
    assert val["n"] == 360  # exact eval sharding: both ranks' shards, nothing padded
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    # Both ranks wrote their shard into the step folder; the marker came last.
    folder = out / "checkpoints" / "step_00000008"
    assert (folder / "ffdist_state.pt").is_file()
    assert len(list(folder.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # The consolidated fp32 weights evaluate like the ZeRO-3 engine did (fp32 both times;
    # a different summation order may flip at most one borderline image of 360).
    top1 = _evaluate_model_pt(out, *overrides)
    assert abs(top1 - end["final_top1"]) <= 1 / 360 + 1e-9, (top1, end["final_top1"])
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert set(best["model"]) == set(torch.load(out / "model.pt", weights_only=True))


@pytest.mark.parametrize("device", TWO_RANK_DEVICES)
def test_zero1_bf16_trains_with_accumulation(tmp_path, device):
    """ZeRO-1 in bf16 (DeepSpeed's bf16: bf16 weights, fp32 master copy), 2 micro-steps per
    optimizer step (micro_batch_size 16 of 32 per rank)."""
    out = tmp_path / "z1"
    torchrun(RECIPE, *FAST, f"launch.device={device}", "strategy.zero_stage=1", "precision=bf16",
             "schedule.max_steps=6", "log.every_steps=1", f"output_dir={out}")
    losses = train_losses(out)
    assert end_event(out)["world_size"] == 2
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    assert len(list((out / "checkpoints" / "step_00000006").glob("*optim_states.pt"))) == 2


def test_json_that_contradicts_the_recipe_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"train_batch_size": 128, "zero_optimization": {"overlap_comm": true}}')
    proc = run([sys.executable, "-m", "ffdist.train", str(RECIPES / RECIPE),
                f"strategy.deepspeed_config={cfg}", f"output_dir={tmp_path / 'run'}", *FAST],
               check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(cfg) in lines[0] and "train_batch_size" in lines[0]
    assert "128" in lines[0] and "64" in lines[0] and "data.batch_size" in lines[0]
