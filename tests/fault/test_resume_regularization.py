"""Exact resume and world-size invariance with the whole regularization set on: RandAugment,
random erasing, the repeated-augmentation sampler, mixup + cutmix with label smoothing
(soft targets) and the EMA of the weights (evaluated, picking best.pt, written to model.pt).

1. A run resumed from its mid-epoch checkpoint of step 15 logs the same losses, the same
   raw and EMA evaluations and writes the same weights (raw and EMA), bit for bit, as the
   run that never stopped. Step 15 is odd and the EMA updates every 2 steps: the cadence
   is kept across the resume, and the EMA warm-up (4 steps) is over by then.
2. Two DDP ranks train the same schedule as one process: every augmented image is keyed
   by (seed, epoch, index, copy), every mixing draw by (seed, step, position in the global
   batch), the mixing partners are fixed by the global batch; none of it depends on the
   rank. Losses agree to rtol 1e-5, the tolerance test_world_size_resume.py derives for
   fp32 all-reduce rounding; a rank-dependent augmentation or draw changes a step's loss by
   ~1e-2. The EMA (a function of the weights only) follows: the same evaluations.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.fault import kit

AUG = ("data.auto_augment=ra", "data.ra_magnitude=7", "data.random_erase=0.25",
       "data.repeated_augmentation=3")
MIX = ("data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.mix_prob=0.8",
       "data.mix_group=16", "optim.label_smoothing=0.1")
EMA = ("optim.ema_decay=0.9", "optim.ema_every_steps=2", "optim.ema_warmup_epochs=0.2",
       "checkpoint.best_weights=ema", "checkpoint.final_weights=ema")
ALL = (*AUG, *MIX, *EMA)


def _evals(run_dir: Path, split: str) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["top1"]) for e in kit.metrics(run_dir)
            if e.get("split") == split]


@pytest.fixture(scope="module")
def all_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("all_ref") / "run"
    proc = kit.run(kit.python_cmd(out, *ALL))
    assert proc.returncode == 0, kit.explain(proc)
    return out


def test_resume_with_everything_on_is_bit_exact(all_ref: Path, ref1: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(all_ref, out)
    (out / "model.pt").unlink()
    for ckpt in (out / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > 15:
            ckpt.unlink()
    (out / "checkpoints" / "latest").write_text("step_00000015.pt\n")
    proc = kit.run(kit.python_cmd(out, *ALL))
    assert proc.returncode == 0, kit.explain(proc)
    assert "resumed from step 15" in proc.stdout
    want, got = kit.train_losses(all_ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, kit.STEPS + 1))
    assert got == want
    for split in ("val", "val_ema"):
        assert _evals(out, split) == _evals(all_ref, split) and _evals(out, split), split
    kit.same_weights(out / "model.pt", all_ref / "model.pt")  # the EMA (final_weights=ema)
    last = f"step_{kit.STEPS:08d}.pt"
    a = torch.load(out / "checkpoints" / last, weights_only=True)
    b = torch.load(all_ref / "checkpoints" / last, weights_only=True)
    for k in a["model"]:  # the raw weights too, and the EMA state
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    assert a["ema"]["updates"] == b["ema"]["updates"] == kit.STEPS // 2
    model_pt = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model_pt[k], a["ema"]["shadow"][k]) for k in model_pt)
    assert not torch.equal(model_pt["head.weight"], a["model"]["head.weight"])
    # the regularization is really on: the plain digits run sees other images, other losses
    plain = kit.train_losses(ref1)
    assert all(got[s] != plain[s] for s in range(2, kit.STEPS + 1))


def test_two_ranks_train_on_the_same_augmented_and_mixed_batches(all_ref: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, *ALL), timeout=240)
    assert proc.returncode == 0, kit.explain(proc)
    want, got = kit.train_losses(all_ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, kit.STEPS + 1))
    for step in range(1, kit.STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    for split in ("val", "val_ema"):
        one, two = _evals(all_ref, split), _evals(out, split)
        assert [s for s, _, _ in one] == [s for s, _, _ in two] and one, split
        for (_, loss1, top1), (_, loss2, top2) in zip(one, two):
            assert loss2 == pytest.approx(loss1, rel=1e-4) and abs(top1 - top2) <= 1 / 360
    # The EMA of the full weights is the same for 1 and 2 ranks up to the rounding the raw
    # weights carry (an all-reduce sums in another order): an average of raw weights that
    # differ by at most d differs by at most d, so twice the raw weights' final difference
    # bounds it (measured here: EMA 5.0e-6, raw 1.7e-5 after 30 steps).
    last = f"step_{kit.STEPS:08d}.pt"
    two, one = (torch.load(r / "checkpoints" / last, weights_only=True) for r in (out, all_ref))
    raw = max(float((two["model"][k] - one["model"][k]).abs().max()) for k in one["model"])
    ema = max(float((two["ema"]["shadow"][k] - one["ema"]["shadow"][k]).abs().max())
              for k in one["model"])
    assert ema <= 2 * raw + 1e-7 and raw < 1e-3, (ema, raw)
    mine = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(mine[k], two["ema"]["shadow"][k]) for k in mine)


def test_a_skipped_step_moves_neither_the_weights_nor_their_ema(tmp_path: Path) -> None:
    """nan_policy=skip: steps 12 and 13 have a NaN loss; the EMA (updated every step) is
    not updated on them, or it would move towards the unchanged weights."""
    out = tmp_path / "run"
    proc = kit.run(kit.python_cmd(out, "optim.ema_decay=0.9", "schedule.nan_policy=skip",
                                  "schedule.max_bad_steps=3", "schedule.max_steps=15",
                                  "checkpoint.every_steps=1", "checkpoint.keep_last=20"),
                   FFDIST_FAULT="nan_loss:step=12-13")
    assert proc.returncode == 0, kit.explain(proc)
    ckpt = {s: torch.load(out / "checkpoints" / f"step_{s:08d}.pt", weights_only=True)
            for s in (11, 12, 13, 14)}
    for k in ckpt[11]["model"]:
        for s in (12, 13):
            assert torch.equal(ckpt[s]["model"][k], ckpt[11]["model"][k]), (s, k)
            assert torch.equal(ckpt[s]["ema"]["shadow"][k], ckpt[11]["ema"]["shadow"][k])
    assert not torch.equal(ckpt[14]["ema"]["shadow"]["head.weight"],
                           ckpt[13]["ema"]["shadow"]["head.weight"])
    assert ckpt[14]["skipped_steps"] == 2
