"""ffdist.preflight: the image sizes a model cannot take are refused with the key that sets
them and advice that works when followed (the commands' calls: tests/fault/user_errors/)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import VisionTransformer

from ffdist import assemble, preflight
from ffdist.errors import DataError
from ffdist.models import build
from ffdist.recipe_load import load

# torchvision's real ViT class, a few hundred parameters: it keeps its image_size
TINY_VIT = dict(image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8,
                mlp_dim=8, num_classes=10)


def check(model: torch.nn.Module, *overrides: str, training: bool = True) -> None:
    rcp = load(None, list(overrides))
    resolved = assemble.resolve(rcp, 1, torch.device("cpu"), trains=training)
    preflight.check_sizes(model, rcp, resolved, training=training)


def test_a_fixed_size_model_names_the_key_and_the_size_it_takes():
    vit = VisionTransformer(**TINY_VIT)
    with pytest.raises(DataError) as e:
        check(vit, "data.name=synthetic", "data.image_size=16")
    assert str(e.value) == ("model.name=small_cnn takes 32x32 images, not 16x16 images "
                            "(data.image_size=16); set data.image_size=32.")
    check(vit, "data.name=synthetic", "data.image_size=32")  # the advice, followed


def test_the_eval_size_is_checked_with_its_own_key():
    vit = VisionTransformer(**TINY_VIT)
    folder = ("data.name=imagefolder", "data.image_size=32")
    with pytest.raises(DataError, match=r"not 48x48 images \(data.eval_image_size=48\); set "
                                        r"data.eval_image_size=32\.$"):
        check(vit, *folder, "data.eval_image_size=48")
    with pytest.raises(DataError, match="data.eval_image_size=48"):  # eval alone checks it too
        check(vit, *folder, "data.eval_image_size=48", training=False)


def test_a_dataset_of_its_own_size_gets_another_model_as_advice():
    """digits are 8x8 whatever data.image_size says: the advice is a model, not the key."""
    with pytest.raises(DataError) as e:
        check(VisionTransformer(**TINY_VIT))
    assert "not the 8x8 images of data.name=digits (its own size); use a CNN, e.g. " \
           "model.name=small_cnn." in str(e.value)
    lenet = build(load(None, ["model.name=lenet"]).model)
    with pytest.raises(DataError) as e:
        check(lenet, "model.name=lenet")
    assert str(e.value).startswith("model.name=lenet cannot take the 8x8 images of "
                                   "data.name=digits (its own size) (")
    assert str(e.value).endswith("; use a model made for small images (small_cnn; ResNets "
                                 "with model.cifar_stem=true).")
    check(build(load(None).model))  # small_cnn, as advised: takes them
    resnet = ("model.name=resnet18", "model.cifar_stem=true", "model.in_channels=1")
    check(build(load(None, list(resnet)).model), *resnet)


def test_a_tiny_image_names_the_key_and_the_models_mode_is_kept():
    model = build(load(None).model)
    model.train()
    with pytest.raises(DataError) as e:
        check(model, "data.name=synthetic", "data.image_size=1")
    assert str(e.value).startswith("model.name=small_cnn cannot take 1x1 images "
                                   "(data.image_size=1) (")
    assert str(e.value).endswith("; set data.image_size=2 or larger.")
    assert model.training  # probed in eval mode, then put back
    check(model, "data.name=synthetic", "data.image_size=2")  # the advice, followed
