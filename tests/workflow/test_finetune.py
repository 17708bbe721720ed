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
    # map_location: model.pt holds the tensors on the device they were trained on
    before = torch.load(base / "model.pt", map_location="cpu", weights_only=True)
    after = torch.load(tuned / "model.pt", map_location="cpu", weights_only=True)
    backbone = [k for k in before if not k.startswith("head.")]
    assert backbone, "small_cnn has a backbone"
    for k in backbone:  # frozen: identical bit for bit (even with weight decay configured)
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.weight"], after["head.weight"])
    end = helpers.end_event(tuned)
    print("fine-tuned val top-1", end["final_top1"], "base", helpers.end_event(base)["final_top1"])
    assert end["final_top1"] >= 0.9, end
    from ffdist.loading import load_run

    assert load_run(tuned).classes == ["5", "6", "7", "8", "9"]
    val = helpers.events(tuned, "val")[-1]
    assert val["n"] == len(lists_b[1].read_text().splitlines())


def test_resnet_frozen_batchnorm_through_the_trainer(digits_pngs: Path, tmp_path: Path):
    """The hymenoptera recipe's shape, tiny: an ImageFolder, ResNet-18 from a local
    1000-class state dict (as a downloaded torchvision .pth is), head replaced for 2
    classes, backbone frozen. Through the real Trainer (model.train() every epoch) the
    backbone's BatchNorm running statistics stay those of the file."""
    from PIL import Image

    from ffdist.models import build
    from ffdist.recipe import ModelConfig

    for split in ("train", "val"):
        for digit in ("0", "1"):
            folder = tmp_path / "data" / split / f"digit{digit}"
            folder.mkdir(parents=True)
            files = sorted(digits_pngs.glob(f"*_{digit}.png"))
            for f in files[:12] if split == "train" else files[12:18]:
                Image.open(f).convert("RGB").save(folder / f.name)
    torch.manual_seed(0)
    source = build(ModelConfig(name="resnet18", num_classes=1000))
    with torch.no_grad():  # non-trivial statistics, so that an update would show
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "run"
    run("recipes/hymenoptera_finetune.yaml", [
        f"model.pretrained={tmp_path / 'resnet18.pth'}", f"data.root={tmp_path / 'data'}",
        "data.image_size=32", "data.num_workers=0", "data.batch_size=8", "schedule.epochs=2",
        "optim.lr=0.01", f"output_dir={out}", "log.tensorboard=false", "log.progress=false",
        "precision=fp32"])
    after = torch.load(out / "model.pt", map_location="cpu", weights_only=True)  # vs a CPU model
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, after[k]), k  # weights AND running stats, bit for bit
    assert after["fc.weight"].shape == (2, 512)

    # predict on a folder run: class names from the class folders, folder preprocessing
    import csv

    from ffdist.cli import main as cli
    from ffdist.loading import load_run

    loaded = load_run(out)
    assert loaded.classes == ["digit0", "digit1"] and loaded.image_size == 32
    preds = tmp_path / "preds.csv"
    assert cli(["predict", str(out), str(tmp_path / "data" / "val"), "--out", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 12 and {r["prediction"] for r in rows} <= {"digit0", "digit1"}
