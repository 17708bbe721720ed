"""model.pretrained / model.freeze pieces: head replacement, shape errors, offline
'true', frozen BatchNorm staying in eval mode, bad prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from ffdist import finetune, recipe_load
from ffdist.errors import CheckpointError, FfdistError, RecipeError
from ffdist.models import build
from ffdist.optim import param_groups


def _cfg(*overrides: str):
    return recipe_load.load(None, list(overrides)).model


def test_head_reinitialised_when_class_count_differs(tmp_path: Path):
    torch.manual_seed(0)
    source = build(_cfg("model.num_classes=10", "model.in_channels=1"))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "step": 3}, path)  # an ffdist checkpoint
    torch.manual_seed(1)
    model = build(_cfg("model.num_classes=5", "model.in_channels=1"))
    fresh_head = model.head.weight.clone()
    finetune.prepare(model, _cfg("model.num_classes=5", "model.in_channels=1",
                                 f"model.pretrained={path}"))
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.head.weight, fresh_head)  # kept its fresh 5-class init


def test_other_shape_mismatch_names_the_key(tmp_path: Path):
    path = tmp_path / "rgb_wide.pt"
    torch.save(build(_cfg("model.in_channels=1")).state_dict(), path)  # a plain state dict
    model = build(_cfg("model.in_channels=3"))
    with pytest.raises(CheckpointError, match=r"features\.0\.weight has shape \(32, 1, 3, 3\)"):
        finetune.prepare(model, _cfg("model.in_channels=3", f"model.pretrained={path}"))


def test_rgb_stem_adapted_to_grey(tmp_path: Path):
    path = tmp_path / "rgb.pt"
    rgb = build(_cfg("model.in_channels=3")).state_dict()
    torch.save(rgb, path)
    grey = build(_cfg("model.in_channels=1"))
    finetune.prepare(grey, _cfg("model.in_channels=1", f"model.pretrained={path}"))
    assert torch.equal(grey.features[0].weight, rgb["features.0.weight"].sum(1, keepdim=True))


def test_pretrained_true_offline_is_a_clear_error(tmp_path: Path, monkeypatch):
    # No cached weights, and any download goes to a closed local port: never the network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    cfg = _cfg("model.name=resnet18", "model.pretrained=true")
    with pytest.raises(FfdistError, match="needs a network") as refused:
        finetune.prepare(build(cfg), cfg)
    # the folder torch reads its cache from, under this TORCH_HOME, and the file to put there
    cache = tmp_path / "hub" / "checkpoints"
    assert f"put it into {cache}," in str(refused.value)
    assert f"Download {torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit('/', 1)[-1]} " \
        in str(refused.value)
    cfg = _cfg("model.pretrained=true")  # small_cnn: no torchvision weights at all
    with pytest.raises(RecipeError, match="no weights"):
        finetune.prepare(build(cfg), cfg)


def test_frozen_batchnorm_stays_in_eval_mode():
    cfg = _cfg("model.name=resnet18", "model.num_classes=5", "model.in_channels=1",
               "model.freeze=[backbone]")
    model = finetune.prepare(build(cfg), cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()  # what the Trainer does every epoch
    model(torch.randn(4, 1, 32, 32)).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # statistics untouched
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.fc.training
    trainable = [p for g in param_groups(model, 0.0) for p in g["params"]]
    assert {id(p) for p in trainable} == {id(p) for p in model.fc.parameters()}
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))


def test_freeze_prefixes_and_bad_prefix():
    model = build(_cfg())
    frozen = finetune.freeze(model, ["features.0"])
    assert frozen == ["features.0.weight", "features.0.bias"]
    with pytest.raises(RecipeError, match="'featurez' matches no parameter"):
        finetune.freeze(build(_cfg()), ["featurez"])


def test_hymenoptera_recipe_is_the_tutorials():
    rcp = recipe_load.load("recipes/hymenoptera_finetune.yaml")
    assert (rcp.model.name, rcp.model.pretrained, rcp.model.freeze) == ("resnet18", "true",
                                                                        ["backbone"])
    assert (rcp.optim.name, rcp.optim.lr, rcp.optim.momentum) == ("sgd", 0.001, 0.9)
    assert (rcp.schedule.scheduler, rcp.schedule.step_size, rcp.schedule.gamma,
            rcp.schedule.epochs) == ("step", 7, 0.1, 25)
    from ffdist.optim import lr_at

    assert lr_at(61 * 7 - 1, 0.001, rcp.schedule, 61) == 0.001
    assert abs(lr_at(61 * 7, 0.001, rcp.schedule, 61) - 1e-4) < 1e-12
