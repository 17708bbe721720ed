"""Exact resume and world-size invariance with the wired regularization on: RandAugment,
random erasing and the repeated-augmentation sampler (issue 14; EMA and mixup/cutmix join
when the Trainer honours them).

1. A run resumed from its mid-epoch checkpoint of step 15 logs the same losses and writes
   the same weights, bit for bit, as the run never stopped.
2. Two DDP ranks train the same schedule as one process: every augmented image is keyed
   by (seed, epoch, index, copy), not by rank. Losses agree to rtol 1e-5, the tolerance
   test_world_size_resume.py derives for fp32 all-reduce rounding; a rank-dependent
   augmentation changes a step's loss by ~1e-2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fault import kit

AUG = ("data.auto_augment=ra", "data.ra_magnitude=7", "data.random_erase=0.25",
       "data.repeated_augmentation=3")


@pytest.fixture(scope="module")
def aug_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aug_ref") / "run"
    proc = kit.run(kit.python_cmd(out, *AUG))
    assert proc.returncode == 0, kit.explain(proc)
    return out


def test_resume_with_policy_erasing_and_repeats_is_bit_exact(aug_ref: Path, ref1: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(aug_ref, out)
    (out / "model.pt").unlink()
    for ckpt in (out / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > 15:
            ckpt.unlink()
    (out / "checkpoints" / "latest").write_text("step_00000015.pt\n")
    proc = kit.run(kit.python_cmd(out, *AUG))
    assert proc.returncode == 0, kit.explain(proc)
    assert "resumed from step 15" in proc.stdout
    want, got = kit.train_losses(aug_ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, kit.STEPS + 1))
    assert got == want
    kit.same_weights(out / "model.pt", aug_ref / "model.pt")
    # the augmentation is really on: the plain digits run sees other images
    plain = kit.train_losses(ref1)
    assert all(got[s] != plain[s] for s in range(2, kit.STEPS + 1))


def test_two_ranks_train_on_the_same_augmented_batches(aug_ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, *AUG), timeout=240)
    assert proc.returncode == 0, kit.explain(proc)
    want, got = kit.train_losses(aug_ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, kit.STEPS + 1))
    for step in range(1, kit.STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
