"""One recipe, every launcher on one machine: torchrun (DDP), `accelerate launch` and the
`deepspeed` launcher (ZeRO-2), each with 2 real CPU ranks, give a world of 2 and the same
per-step training losses; a ZeRO-2 run interrupted mid-save resumes from the last complete
checkpoint and continues exactly like the uninterrupted run.

Tolerance of the loss comparison, and why: every run is fp32 (precision=fp32), with no
augmentation, the same seed (same initial weights, same data order: batch k holds the
same 64 images under every launcher), the same micro-batches (16 per rank, 2 accumulation
micro-steps) and the same SGD step at the same lr. What differs is only the order of
floating-point sums: DDP all-reduces gradient buckets, ZeRO-2 reduce-scatters them into
partitions, updates a fp32 copy of each partition and all-gathers the result. Those round
differently in the last bits in general (~1e-7 relative per step, carried forward by
momentum); measured here with 2 ranks the losses are even bit-identical (a 2-way sum has one
order). We allow 1e-4 (relative and absolute), room for other reduction orders (more ranks,
other gloo/DeepSpeed versions), yet far below what a real bug does: gradients scaled twice
by the accumulation count, an lr that is not applied or a rank that sees other data moves
the loss by ~1e-2 within these 10 steps (it falls 2.307 -> 2.269 over them).
"""

from __future__ import annotations

import pytest

from tests.helpers import (
    CPU,
    FAST,
    REPO,
    TWO_RANK_DEVICES,
    accelerate,
    deepspeed_launcher,
    end_event,
    torchrun,
    train_losses,
)

pytestmark = pytest.mark.slow
RECIPE = "digits_zero2.yaml"
STEPS = 10
# lr: linear warmup over half an epoch (11 steps) then constant: it changes at every step
# (so a missing per-step lr shows) and depends on the step only, not on max_steps. CPU
# ranks on any machine: the comparison is exact only there (tests.helpers.CPU).
PARITY = (*FAST, CPU, "precision=fp32", "data.augment=false", "log.every_steps=1",
          "schedule.scheduler=constant", "schedule.warmup_epochs=0.5")
TOL = 1e-4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(RECIPE, *PARITY, "strategy.name=ddp", f"schedule.max_steps={STEPS}",
             f"output_dir={out}")
    return out


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """The deepspeed launcher; `--num_gpus 2` starts 2 CPU ranks on a machine without GPUs."""
    out = tmp_path_factory.mktemp("zero2")
    deepspeed_launcher(RECIPE, *PARITY, f"schedule.max_steps={STEPS}", f"output_dir={out}")
    return out


def _assert_close(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=TOL, abs=TOL), (step, a[step], b[step])


def test_accelerate_config_file_and_deepspeed_launcher_match_torchrun(tmp_path, ddp_run,
                                                                       zero2_run):
    acc = tmp_path / "acc"
    accelerate(RECIPE, *PARITY, "strategy.name=ddp", f"schedule.max_steps={STEPS}",
               f"output_dir={acc}",
               launch_args=("--config_file", str(REPO / "launch/accelerate/cpu_2proc.yaml")))
    for out in (ddp_run, zero2_run, acc):
        assert end_event(out)["world_size"] == 2
    ddp, ds, ac = train_losses(ddp_run), train_losses(zero2_run), train_losses(acc)
    assert sorted(ddp) == sorted(ds) == sorted(ac) == list(range(1, STEPS + 1))
    assert ddp[STEPS] < ddp[1] - 0.01  # it learns, so equal losses mean something
    _assert_close(ac, ddp, range(1, STEPS + 1))
    _assert_close(ds, ddp, range(1, STEPS + 1))


# make test-all only; the fast tier covers its path: the accelerate config-file test below
@pytest.mark.extended
@pytest.mark.parametrize("device", TWO_RANK_DEVICES)
def test_accelerate_multi_gpu_flags_give_a_real_world_of_two(tmp_path, device):
    """accelerate's --multi_gpu launcher is torchrun underneath and ffdist joins the process
    group itself: gloo for CPU ranks (a plain Accelerator() would give 2 separate worlds of
    1 there), NCCL on 2 GPUs."""
    out = tmp_path / "acc_flags"
    accelerate("digits.yaml", *FAST, f"launch.device={device}", "schedule.max_steps=3",
               "log.every_steps=1", f"output_dir={out}")
    assert end_event(out)["world_size"] == 2
    assert sorted(train_losses(out)) == [1, 2, 3]


# make test-all only; the fast tier covers its path: test_ema_zero's ZeRO-2/3 resumes,
# test_resume_exact's fallback past an incomplete checkpoint
@pytest.mark.extended
def test_zero2_resumes_from_the_last_complete_checkpoint(tmp_path, zero2_run):
    out = tmp_path / "resume"
    torchrun(RECIPE, *PARITY, "schedule.max_steps=6", "checkpoint.every_steps=3",
             f"output_dir={out}")
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    # As if killed while saving step 6: shards on disk, but rank 0 never wrote the marker
    # (nor, then, the final model.pt: a finished run would not be trained over).
    (ckpts / "step_00000006" / "ffdist_state.pt").unlink()
    (out / "model.pt").unlink()
    torchrun(RECIPE, *PARITY, f"schedule.max_steps={STEPS}", f"output_dir={out}")
    losses = train_losses(out)
    # metrics.jsonl was cut back to step 3, then steps 4..10 were trained once each.
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert end_event(out)["step"] == STEPS
    # Same weights, optimizer partitions, data position and RNG as the straight run.
    _assert_close(losses, train_losses(zero2_run), range(4, STEPS + 1))
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
