"""The model registry (ffdist.models): torchvision's and our models build and give class
logits for their channels and sizes, the CIFAR stem keeps 32x32, GeM replaces average
pooling, an unknown name gets a suggestion, the classifier head is found by name; `ffdist
models` lists the same names, naturally sorted, without importing torch."""

import pytest
import torch

from ffdist import models, recipe_load
from ffdist.errors import RecipeError


def _cfg(*overrides: str):
    return recipe_load.load(None, list(overrides)).model


@pytest.mark.parametrize("name,channels,size", [
    ("small_cnn", 1, 8), ("lenet", 1, 28), ("lenet", 3, 32), ("resnet18", 3, 64),
    ("resnet18", 1, 64), ("mobilenet_v3_small", 3, 64),
])
def test_models_build_and_give_class_logits(name: str, channels: int, size: int) -> None:
    m = models.build(_cfg(f"model.name={name}", f"model.in_channels={channels}",
                          "model.num_classes=7"))
    out = m(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_registry_lists_torchvision_and_our_models() -> None:
    names = models.available()
    for n in ("lenet", "small_cnn", "resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0",
              "densenet121", "vgg16"):
        assert n in names


def test_the_listing_is_the_registry_in_natural_order_without_torch() -> None:
    """`ffdist models` reads torchvision's names from its source files (no import): the
    same names as the registry, digits sorted as numbers."""
    import subprocess
    import sys

    from ffdist import model_names
    from tests.helpers import REPO, env

    listed = model_names.listed()
    assert set(listed) == set(models.available()) and set(model_names.OWN) == set(models.OWN)
    assert [n for n in listed if n.startswith("resnet")] == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    code = ("import sys; from ffdist.cli import main; rc = main(['models', 'resnet']); "
            "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:3] == ["resnet18", "resnet34", "resnet50"]


def test_cifar_stem_keeps_32x32_resolution() -> None:
    m = models.build(_cfg("model.name=resnet18", "model.cifar_stem=true"))
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)
    with pytest.raises(RecipeError, match="ResNets only"):
        models.build(_cfg("model.name=vgg11", "model.cifar_stem=true"))


def test_gem_pooling_replaces_average_pooling() -> None:
    m = models.build(_cfg("model.name=resnet18", "model.pool=gem"))
    assert isinstance(m.avgpool, models.GeM)
    x = torch.rand(2, 3, 1, 1) + 0.5
    gem = models.GeM(p=1.0)
    assert torch.allclose(gem(x), x.mean(dim=(-2, -1), keepdim=True))


def test_unknown_model_suggests_a_name() -> None:
    with pytest.raises(RecipeError, match="did you mean 'resnet50'"):
        models.build(_cfg("model.name=resnet05"))


def test_head_name() -> None:
    assert models.head_name(models.build(_cfg("model.name=resnet18"))) == "fc"
    assert models.head_name(models.build(_cfg("model.name=small_cnn"))) == "head"
