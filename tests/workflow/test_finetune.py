"""Transfer learning without a network: digits 0-4 -> a checkpoint -> fine-tune on 5-9
with the backbone frozen (model.pretrained=<model.pt>, model.freeze=[backbone])."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffdist.train import run
from tests import helpers
from tests.workflow.conftest import write_filelists


def _filelist_overrides(root: Path, lists: tuple[Path, Path], digits: list[int],
                        out: Path) -> list[str]:
    names = ",".join(f"'{d}'" for d in digits)
    return ["data.name=filelist", f"data.root={root}", f"data.train_list={lists[0]}",
            f"data.val_list={lists[1]}", f"data.classes=[{names}]", "data.image_size=8",
            "data.augment=false", f"model.num_classes={len(digits)}", f"output_dir={out}",
            "log.tensorboard=false", "log.progress=false", "precision=fp32"]


@pytest.mark.slow
def test_finetune_frozen_backbone_from_local_checkpoint(digits_pngs: Path, tmp_path: Path):
    lists_a = write_filelists(digits_pngs, [0, 1, 2, 3, 4], tmp_path / "a")
    lists_b = write_filelists(digits_pngs, [5, 6, 7, 8, 9], tmp_path / "b")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    # In-process (ffdist.train.run, as `python -m ffdist.train` calls it): two runs without
    # paying torch's import twice more.
    run("recipes/digits.yaml", ["schedule.epochs=4",
                                *_filelist_overrides(digits_pngs, lists_a, [0, 1, 2, 3, 4], base)])
    run("recipes/digits.yaml", ["schedule.epochs=6", f"model.pretrained={base / 'model.pt'}",
                                "model.freeze=[backbone]", "optim.weight_decay=0.01",
                                *_filelist_overrides(digits_pngs, lists_b, [5, 6, 7, 8, 9], tuned)])
    before = torch.load(base / "model.pt", weights_only=True)
    after = torch.load(tuned / "model.pt", weights_only=True)
    backbone = [k for k in before if not k.startswith("head.")]
    assert backbone, "small_cnn has a backbone"
    for k in backbone:  # frozen: identical bit for bit (even with weight decay configured)
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.weight"], after["head.weight"])
    end = helpers.end_event(tuned)
    print("fine-tuned val top-1", end["final_top1"], "base", helpers.end_event(base)["final_top1"])
    assert end["final_top1"] >= 0.9, end
    val = helpers.events(tuned, "val")[-1]
    assert val["n"] == len(lists_b[1].read_text().splitlines())
