"""Regularization and eval resolution end to end: the recipes that quote their source
(load, plan, a few bench steps with EMA and mixup/cutmix timed in the step), digits with
EMA + mixup/cutmix + TrivialAugment through train / eval, the first-batch picture of mixed
images, eval resolution through train / eval / predict / export, and a timm model with
stochastic depth through train, fine-tune, compile and export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.cli import main as cli
from tests.helpers import FAST, RECIPES, end_event, events, run, train
from tests.workflow.conftest import write_filelists

NEW = ("resnet50_tv_v2.yaml", "convnext_tiny.yaml", "digits_regularized.yaml")


@pytest.mark.parametrize("name", NEW)
def test_recipes_load_plan_and_name_their_regularization(name: str, capsys) -> None:
    rcp = recipe_load.load(RECIPES / name)
    assert rcp.optim.ema_decay > 0 and rcp.data.mixup_alpha > 0
    assert cli(["plan", str(RECIPES / name), "--world-size", "8", "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "regularize EMA" in out and "soft targets" in out and " EMA " in out
    text = (RECIPES / name).read_text()
    assert text.startswith("#") and "ffdist.train recipes/" + name in text
    if name != "digits_regularized.yaml":
        assert "sbatch" in text


def test_published_settings_are_the_ones_quoted() -> None:
    tv = recipe_load.load(RECIPES / "resnet50_tv_v2.yaml")
    assert "80.858%" in (RECIPES / "resnet50_tv_v2.yaml").read_text()
    d = tv.data
    assert (d.image_size, d.eval_image_size, d.eval_resize_size) == (176, 224, 232)
    assert (d.auto_augment, d.random_erase, d.repeated_augmentation) == ("ta_wide", 0.1, 4)
    assert (d.mixup_alpha, d.cutmix_alpha, d.batch_size, d.mix_group) == (0.2, 1.0, 1024, 128)
    assert (tv.optim.lr, tv.optim.weight_decay, tv.optim.label_smoothing) == (0.5, 2e-5, 0.1)
    # torchvision's adjusted EMA decay: 1 - (1 - 0.99998) * 8 * 128 * 32 / 600
    assert tv.optim.ema_decay == pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600, abs=1e-8)
    assert (tv.optim.ema_every_steps, tv.schedule.epochs, tv.schedule.warmup_epochs) == (32, 600, 5)
    cx = recipe_load.load(RECIPES / "convnext_tiny.yaml")
    assert "82.1%" in (RECIPES / "convnext_tiny.yaml").read_text()
    assert (cx.data.batch_size, cx.optim.lr, cx.optim.weight_decay) == (4096, 4e-3, 0.05)
    assert (cx.model.drop_path_rate, cx.optim.ema_decay, cx.data.random_erase) == (0.1, 0.9999, 0.25)


# make test-all: convnext_tiny; the fast tier keeps resnet50_tv_v2 (the same bench of a published
# recipe at a tiny size), convnext_tiny's values are checked above
@pytest.mark.parametrize("name", ["resnet50_tv_v2.yaml",
                                  pytest.param("convnext_tiny.yaml", marks=pytest.mark.extended)])
def test_bench_runs_a_few_synthetic_steps_at_a_tiny_size(name: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / name), "--synthetic",
         "--steps", "1", "--warmup", "0", "--eval-steps", "1", "--out", str(out),
         f"output_dir={tmp_path / 'run'}", "data.image_size=32", "data.eval_image_size=40",
         "data.batch_size=4", "data.micro_batch_size=2", "data.eval_batch_size=4",
         "data.mix_group=null", "data.num_workers=0"], timeout=600)
    r = json.loads(out.read_text())
    assert r["model"] == recipe_load.load(RECIPES / name).model.name
    assert r["image_size"] == 32 and r["accum"] == 2 and r["train_images_per_s"] > 0
    assert r["ema"] and r["mixup"] and "soft targets" in r["regularization"]


def test_digits_with_ema_mixup_cutmix_and_trivialaugment_end_to_end(tmp_path: Path,
                                                                    capsys) -> None:
    """A short digits_regularized run (the full one is measured in docs/regularization.md):
    raw and EMA evaluated every epoch, best.pt and model.pt from the EMA, no training
    top-1 with soft targets, `ffdist eval` evaluating the weights model.pt holds, and
    best.pt giving back the best EMA top-1."""
    out = tmp_path / "run"
    train("digits_regularized.yaml", "schedule.epochs=5", "optim.ema_warmup_epochs=1",
          "checkpoint.every_epochs=5", f"output_dir={out}", *FAST)
    raw, ema = events(out, "val"), events(out, "val_ema")
    assert [e["epoch"] for e in raw] == [e["epoch"] for e in ema] == list(range(5))
    assert raw[0]["top1"] == ema[0]["top1"]  # EMA warm-up (1 epoch): a copy of the weights
    assert raw[-1]["loss"] != ema[-1]["loss"]  # then an average
    assert all("top1" not in e for e in events(out, "train"))  # soft targets: no accuracy
    end = end_event(out)
    assert end["final_top1"] == end["final_top1_ema"] == ema[-1]["top1"] > 0.7
    assert end["final_top1_raw"] == raw[-1]["top1"]
    assert end["best_top1"] == max(e["top1"] for e in ema)  # checkpoint.best_weights=ema
    last = torch.load(out / "checkpoints" / "step_00000110.pt", weights_only=True)
    model_pt = torch.load(out / "model.pt", weights_only=True)
    assert model_pt.keys() == last["model"].keys()
    assert all(torch.equal(model_pt[k], last["ema"]["shadow"][k]) for k in model_pt)
    assert not torch.equal(model_pt["head.weight"], last["model"]["head.weight"])
    # ffdist eval: model.pt (the EMA), a checkpoint's EMA by default, its raw weights asked
    step_file = str(out / "checkpoints" / "step_00000110.pt")
    for args, want in (([], ema[-1]), (["--checkpoint", step_file], ema[-1]),
                       (["--checkpoint", step_file, "--weights", "raw"], raw[-1])):
        assert cli(["eval", str(out), *args]) == 0
        report = json.loads((out / "eval" / "report.json").read_text())
        assert abs(report["top1"] - want["top1"]) < 1e-9, args
    assert report["weights_kind"] == "raw"
    # best.pt: picked by the EMA's top-1 (checkpoint.best_weights=ema), which it gives
    # back, by default (the weights it was picked by) as with --weights ema
    best = next(e for e in ema if e["top1"] == end["best_top1"])
    for args in ([], ["--weights", "ema"]):
        assert cli(["eval", str(out), "--checkpoint", str(out / "checkpoints" / "best.pt"),
                    *args]) == 0
        report = json.loads((out / "eval" / "report.json").read_text())
        assert report["top1"] == end["best_top1"] and report["n"] == best["n"], args
        assert report["weights_kind"] == "ema"
    saved = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["best"]
    assert (saved["step"], saved["split"], saved["weights"]) == (best["step"], "val_ema", "ema")
    capsys.readouterr()
    assert cli(["eval", str(out), "--weights", "raw"]) == 2  # model.pt holds the EMA only
    err = capsys.readouterr().err.strip()
    assert "holds the ema weights only" in err and "--checkpoint " in err and "\n" not in err


def test_the_first_batch_picture_shows_the_mixed_images(tmp_path: Path) -> None:
    """What TensorBoard's train/sample_images is drawn from: the micro-batch after mixing."""
    from ffdist import assemble, mixup
    from ffdist.dist import DistInfo
    from ffdist.monitor import Monitor

    class Capture(Monitor):
        wants_first_batch = True
        seen: list = []

        def first_batch(self, x, model, example, step) -> None:
            self.seen.append(x.clone())

    rcp = recipe_load.load(RECIPES / "digits_regularized.yaml",
                      ["precision=fp32", "data.mix_prob=1.0", f"output_dir={tmp_path}"])
    info = DistInfo(0, 0, 1, 1, torch.device("cpu"), "none")
    trainer = assemble.build_trainer(rcp, info, assemble.resolve_for(rcp, info),
                                     open_monitor=Capture.off)
    assert trainer.criterion is mixup.soft_target_cross_entropy
    trainer.data.train.set_epoch(0)
    x, y = next(iter(trainer.train_batches))  # the batch as it comes off the prefetcher
    trainer.train_step(iter(trainer.train_batches), 0.01)
    mixed, target = trainer.mixer(x, y, step=0, micro=0)
    assert torch.equal(Capture.seen[0], mixed) and not torch.equal(mixed, x)
    assert target.shape == (64, 10) and (target.max(1).values < 1).all()  # soft, smoothed


# make test-all only; the fast tier covers its path: tests/unit/test_augment.py's eval sizes,
# the README tour's train/eval/predict/export
@pytest.mark.extended
def test_eval_resolution_through_train_eval_predict_and_export(digits_pngs: Path,
                                                               tmp_path: Path) -> None:
    """Folder digits trained on 8-px random crops with TrivialAugment, evaluated (and
    served) on 12-px center crops of a 14-px resize."""
    tr, va = write_filelists(digits_pngs, list(range(10)), tmp_path / "lists")
    out = tmp_path / "run"
    train("digits.yaml", "data.name=filelist", f"data.root={digits_pngs}",
          f"data.train_list={tr}", f"data.val_list={va}", "data.image_size=8",
          "data.eval_image_size=12", "data.eval_resize_size=14", "data.auto_augment=ta_wide",
          "data.repeated_augmentation=2", "schedule.epochs=2", f"output_dir={out}", *FAST)
    val = events(out, "val")
    assert val[-1]["n"] == 360 and end_event(out)["final_top1"] > 0.3
    proc = run([sys.executable, "-m", "ffdist.cli", "export", str(out), "--format", "torchscript"])
    meta = json.loads((out / "export" / "model.torchscript.pt.json").read_text())
    assert meta["input"]["shape"] == ["batch", 1, 12, 12]
    assert "resize the short side to 14 (bilinear), center crop 12" in meta["preprocessing"]
    assert "verified" in proc.stdout
    csv = tmp_path / "preds.csv"
    run([sys.executable, "-m", "ffdist.cli", "predict", str(out), str(digits_pngs / "0000_0.png"),
         "--out", str(csv), "--grid", "0"])
    assert csv.read_text().count("\n") == 2


# make test-all: timm models and drop path are in the fast tier through
# tests/unit/test_droppath_timm.py, fine-tuning and export through tests/workflow/test_finetune.py
# and tests/workflow/test_export.py
@pytest.mark.extended
def test_timm_model_with_drop_path_trains_finetunes_compiles_and_exports(tmp_path: Path):
    pytest.importorskip("timm")
    base = ("model.name=timm/test_resnet", "model.drop_path_rate=0.1", "schedule.max_steps=6",
            "schedule.epochs=1", *FAST)
    out = tmp_path / "run"
    train("digits.yaml", *base, f"output_dir={out}")
    assert end_event(out)["step"] == 6
    state = torch.load(out / "model.pt", weights_only=True)
    assert "fc.weight" in state and not any(k.startswith("module.") for k in state)
    # ONNX, verified against PyTorch at two batch sizes (TorchScript of a timm model works
    # too, but its trace took 38 s here: tests/workflow/test_export.py covers that format)
    proc = run([sys.executable, "-m", "ffdist.cli", "export", str(out), "--format", "onnx"])
    assert "verified" in proc.stdout
    tuned = tmp_path / "tuned"  # fine-tuned from that model.pt, frozen backbone, compiled
    train("digits.yaml", *base, f"model.pretrained={out / 'model.pt'}", "model.freeze=[backbone]",
          "model.compile=true", "model.compile_backend=eager", f"output_dir={tuned}",
          "schedule.max_steps=3")
    assert end_event(tuned)["step"] == 3
    after = torch.load(tuned / "model.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in after)
    assert torch.equal(after["conv1.0.weight"], state["conv1.0.weight"])  # frozen backbone
    assert not torch.equal(after["fc.weight"], state["fc.weight"])  # timm's head trained


def test_timm_pretrained_weights_offline_is_one_sentence(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    proc = run([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"),
                "model.name=timm/test_resnet", "model.pretrained=true", *FAST,
                f"output_dir={tmp_path / 'run'}"], check=False,
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.pretrained=true: timm could not get weights for test_resnet" in proc.stderr
    assert "needs a network" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
