"""model.activation_checkpointing and the blocks it wraps (ffdist.models.blocks,
ffdist.models.checkpointing): bit-identical gradients to a run without it, with drop-path
(RNG) on, in every mode; the plain model's parameter names; under torch.compile; what it
saves for backward (the activations `ffdist plan` measures); the blocks found per model
family, and the recipe's own list checked in one sentence."""

from __future__ import annotations

import pytest
import torch

from ffdist import models, plan, recipe_load
from ffdist.errors import RecipeError
from ffdist.models import checkpointing


def _model(name: str, *overrides: str) -> torch.nn.Module:
    rcp = recipe_load.load(None, [f"model.name={name}", "model.num_classes=10", *overrides])
    torch.manual_seed(0)
    return models.build(rcp.model)


def _grads(model: torch.nn.Module, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.arange(4)
    model.train()
    torch.manual_seed(7)  # drop-path masks come from torch's RNG
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


# make test-all runs every model x mode; the fast tier one of each mode and model
EXTENDED = pytest.mark.extended


@pytest.mark.parametrize("name,mode", [
    ("vit_tiny", "blocks"), ("vit_tiny", "selective"), ("resnet18", "every_n"),
    pytest.param("vit_tiny", "every_n", marks=EXTENDED),
    pytest.param("resnet18", "blocks", marks=EXTENDED),
    pytest.param("resnet18", "selective", marks=EXTENDED),
])
def test_gradients_are_bit_identical_with_drop_path_on(name: str, mode: str):
    reference = _grads(_model(name, "model.drop_path_rate=0.2"))
    model = _model(name, "model.drop_path_rate=0.2")
    keys = list(model.state_dict())
    picked = checkpointing.apply(model, mode, 2, models.blocks(model))
    assert picked and all(checkpointing.is_checkpointed(model.get_submodule(n)) for n in picked)
    got = _grads(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, got))
    assert list(model.state_dict()) == keys  # no wrapper in the names: checkpoints unchanged


def test_every_n_picks_every_nth_block():
    model = _model("vit_tiny")
    assert checkpointing.apply(model, "every_n", 2, models.blocks(model)) == \
        ["blocks.1", "blocks.3", "blocks.5"]
    assert not checkpointing.is_checkpointed(model.blocks[0])
    assert checkpointing.apply(_model("vit_tiny"), "none") == []


def test_it_compiles():
    """torch.compile traces the checkpointed forward (torch.distributed's hook-based
    checkpoint does not, in torch 2.14)."""
    reference = _grads(_model("vit_tiny", "model.dropout=0.1"))
    model = _model("vit_tiny", "model.dropout=0.1")
    checkpointing.apply(model, "blocks", block_names=models.blocks(model))
    compiled = torch.compile(model, backend="eager")
    got = _grads(compiled)
    assert max((a - b).abs().max().item() for a, b in zip(reference, got)) < 1e-6


def test_what_is_saved_for_backward_is_what_plan_measures():
    """Checkpointed blocks keep only their input; selective keeps the matmul outputs too."""
    saved = {}
    for mode in ("none", "blocks", "every_n", "selective"):
        model = _model("vit_tiny")
        checkpointing.apply(model, mode, 2, models.blocks(model))
        saved[mode] = plan.activation_bytes_per_sample(model, 3, 32, "fp32")
    assert saved["blocks"] < saved["every_n"] < saved["none"]
    assert saved["blocks"] < saved["selective"] < saved["none"]
    assert saved["blocks"] < saved["none"] / 5


def test_a_model_without_blocks_is_refused_naming_model_blocks():
    with pytest.raises(RecipeError, match=r"model.name=googlenet has no blocks .*model.blocks"):
        checkpointing.apply(_model("googlenet"), "blocks", model_name="googlenet")
    model = _model("googlenet")  # its own list works
    names = ["inception3a", "inception4a"]
    assert checkpointing.apply(model, "blocks", 2, models.blocks(model, names)) == names


@pytest.mark.parametrize("name,first,count", [
    ("resnet18", "layer1", 4),
    # make test-all: the larger models (vit_tiny covers the `blocks` rule in the fast tier)
    pytest.param("vit_b_16", "encoder.layers.encoder_layer_0", 12, marks=EXTENDED),
    pytest.param("convnext_tiny", "features.0", 8, marks=EXTENDED),  # stem, stages, between
    ("vit_tiny", "blocks.0", 6),
    pytest.param("timm/vit_tiny_patch16_224", "blocks.0", 12, marks=EXTENDED),
    ("timm/convnext_atto", "stages.0", 4),
    ("small_cnn", "features.0", 3),                # its three convolutions
    ("googlenet", None, 0),                        # no family rule: name them
])
def test_blocks_are_found_per_model_family(name: str, first: str | None, count: int):
    found = models.blocks(_model(name))
    assert len(found) == count and (found[0] if found else None) == first


def test_the_recipe_names_its_blocks_and_mistakes_are_one_sentence():
    model = _model("resnet18")
    assert models.blocks(model, ["layer3", "layer4"]) == ["layer3", "layer4"]
    with pytest.raises(RecipeError, match="'layer5', which is not a module of this model; "
                                          "did you mean layer"):
        models.blocks(model, ["layer5"])
    with pytest.raises(RecipeError, match="lists layer1 and layer1.0, one inside the other"):
        models.blocks(model, ["layer1", "layer1.0"])


def test_ffdist_models_lists_a_models_blocks(capsys):
    from ffdist.cli import main as cli

    assert cli(["models", "--blocks", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["layer1", "layer2", "layer3", "layer4"]
    assert lines[0].split()[1] == "147,968"  # layer1: two BasicBlocks of 64 channels
