"""Stochastic depth (model.drop_path_rate) for torchvision families and ResNets, and timm
models by name (`model.name: timm/<arch>`)."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from torchvision.ops import StochasticDepth

from ffdist import finetune, models, recipe_load
from ffdist.errors import RecipeError


def _cfg(*overrides: str):
    return recipe_load.load(None, list(overrides)).model


def _rates(model: torch.nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0"])
def test_builtin_families_get_torchvisions_stochastic_depth_prob(name: str) -> None:
    ours = models.build(_cfg(f"model.name={name}", "model.drop_path_rate=0.3"))
    ref = torchvision.models.get_model(name, num_classes=10, stochastic_depth_prob=0.3)
    assert _rates(ours) == _rates(ref) and max(_rates(ours)) > 0.25


def test_swin_schedule_is_rescaled_to_the_rate() -> None:
    from torchvision.models.swin_transformer import SwinTransformer

    ours = models.build(_cfg("model.name=swin_t", "model.drop_path_rate=0.4"))
    # swin_t's architecture, built directly with the rate (its builder fixes 0.2)
    ref = SwinTransformer([4, 4], 96, [2, 2, 6, 2], [3, 6, 12, 24], [7, 7],
                          stochastic_depth_prob=0.4, num_classes=10)
    assert _rates(ours) == pytest.approx(_rates(ref), abs=1e-12)


def test_null_keeps_each_architectures_default() -> None:
    assert max(_rates(models.build(_cfg("model.name=convnext_tiny")))) == 0.1
    resnet = models.build(_cfg("model.name=resnet18"))
    assert not resnet.layer1[0].bn2._forward_hooks


def test_resnet_drop_path_is_a_per_sample_branch_drop_by_hand() -> None:
    torch.manual_seed(0)
    model = models.build(_cfg("model.name=resnet18", "model.drop_path_rate=0.5"))
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert [b.drop_path_rate for b in blocks] == pytest.approx([0.5 * i / 7 for i in range(8)])
    last = model.layer4[1]
    x = torch.randn(16, 512, 2, 2)
    model.train()
    torch.manual_seed(1)
    got = last(x)
    torch.manual_seed(1)
    with torch.no_grad():  # bn2.forward: the BatchNorm without its drop-path hook
        branch = last.bn2.forward(last.conv2(last.relu(last.bn1(last.conv1(x)))))
    keep = torch.empty(16, 1, 1, 1).bernoulli_(0.5) / 0.5  # torchvision's stochastic_depth
    torch.testing.assert_close(got, torch.relu(branch * keep + x))
    assert 0 < int((keep == 0).sum()) < 16
    model.eval()  # no drop at eval: the plain block
    with torch.no_grad():
        torch.testing.assert_close(last(x), torch.relu(last.bn2.forward(last.conv2(last.relu(
            last.bn1(last.conv1(x))))) + x))
    # keys stay torchvision's: its weights and our checkpoints load as before
    plain = torchvision.models.resnet18(num_classes=10)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())


def test_frozen_batchnorm_keeps_the_drop_path_of_a_training_block() -> None:
    model = models.build(_cfg("model.name=resnet18", "model.drop_path_rate=0.9"))
    finetune.freeze(model, ["layer4"])
    model.train()
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)


def test_families_without_stochastic_depth_are_refused() -> None:
    with pytest.raises(RecipeError, match="vgg11 has no stochastic depth"):
        models.build(_cfg("model.name=vgg11", "model.drop_path_rate=0.1"))
    with pytest.raises(RecipeError, match="mobilenet_v3_small has no stochastic depth"):
        models.build(_cfg("model.name=mobilenet_v3_small", "model.drop_path_rate=0.1"))
    with pytest.raises(RecipeError, match="small_cnn has no residual blocks"):
        models.build(_cfg("model.drop_path_rate=0.1"))


# ------------------------------------------------------------------------------ timm

def test_timm_missing_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(RecipeError, match=r"needs timm.*pip install 'ffdist\[timm\]'"):
        models.build(_cfg("model.name=timm/resnet18"))


def test_timm_model_builds_with_the_recipes_shape_and_regularization() -> None:
    pytest.importorskip("timm")
    from timm.layers import DropPath

    m = models.build(_cfg("model.name=timm/resnet18", "model.in_channels=1",
                          "model.num_classes=7", "model.drop_path_rate=0.2",
                          "model.dropout=0.3"))
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert max(d.drop_prob for d in m.modules() if isinstance(d, DropPath)) == pytest.approx(0.2)
    assert m.drop_rate == 0.3
    assert m.to(memory_format=torch.channels_last)(
        torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)).shape == (2, 7)
    with pytest.raises(RecipeError, match="did you mean 'timm/resnet50'"):
        models.build(_cfg("model.name=timm/resnet05"))
    with pytest.raises(RecipeError, match="remove model.drop_path_rate"):
        models.build(_cfg("model.name=timm/vgg11", "model.drop_path_rate=0.1"))
    with pytest.raises(RecipeError, match="name a timm architecture"):
        _cfg("model.name=timm/")


def test_timm_heads_for_freeze_and_pretrained() -> None:
    pytest.importorskip("timm")
    m = models.build(_cfg("model.name=timm/convnext_atto", "model.num_classes=3"))
    assert models.head_name(m) == "head.fc"  # timm's classifier, not its whole head
    frozen = finetune.freeze(m, ["backbone"])
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["head.fc.weight", "head.fc.bias"] and "head.norm.weight" in frozen
    # a state of another class count: the head is re-initialised, the rest loads
    other = models.build(_cfg("model.name=timm/convnext_atto", "model.num_classes=5"))
    fresh = models.build(_cfg("model.name=timm/convnext_atto", "model.num_classes=3"))
    finetune.load_pretrained(fresh, other.state_dict(), "other")
    assert torch.equal(fresh.stem[0].weight, other.stem[0].weight)
    assert fresh.head.fc.weight.shape == (3, 320)
