"""The resume table (ffdist.resume_rules): every recipe key is classified on purpose."""

from __future__ import annotations

import pytest

from ffdist import recipe, resume_rules
from ffdist.errors import CheckpointError


def test_every_recipe_key_is_classified():
    """A new recipe key must get a rule (or fall under a section wildcard on purpose): the
    default for an unknown key, 'defines the run', is a safety net, not a decision."""
    unclassified = [k for k in recipe.leaf_types()
                    if resume_rules.rule_for(k).why.startswith("not classified")]
    assert not unclassified, f"add these keys to ffdist.resume_rules.RULES: {unclassified}"


def test_exact_rules_win_over_their_section_wildcard():
    assert resume_rules.rule_for("data.num_workers").on_resume
    assert not resume_rules.rule_for("data.name").on_resume
    assert resume_rules.rule_for("optim.lr").on_resume
    assert not resume_rules.rule_for("optim.name").on_resume
    assert not resume_rules.rule_for("data.batch_size").on_resume
    assert resume_rules.rule_for("launch.nproc").on_resume and not resume_rules.rule_for(
        "launch.nproc").result


def test_every_rule_is_reachable():
    """No rule hidden behind an earlier wildcard of the same pattern."""
    patterns = [r.pattern for r in resume_rules.RULES]
    assert len(patterns) == len(set(patterns))


def state_of(**overrides) -> dict:
    saved = recipe.load(None, [f"{k}={v}" for k, v in overrides.items()])
    return {"step": 7, "recipe": saved.to_dict()}


@pytest.mark.parametrize("now,allowed", [
    (["data.num_workers=4", "log.every_steps=5", "launch.nproc=4", "checkpoint.keep_last=9"], True),
    (["schedule.epochs=30", "optim.lr=0.01", "data.micro_batch_size=16", "precision=fp32"], True),
    (["strategy.name=ddp"], True),  # auto/single/ddp write the same checkpoint
    (["data.batch_size=128"], False),
    (["strategy.name=deepspeed"], False),
    (["model.name=lenet"], False),
    (["optim.name=adamw"], False),
    (["schedule.scheduler=step"], False),
    (["seed=1"], False),
])
def test_check(now, allowed):
    rcp = recipe.load(None, now)
    if allowed:
        resume_rules.check(state_of(), rcp, "ckpt.pt")
    else:
        with pytest.raises(CheckpointError, match="which a resumed run cannot change"):
            resume_rules.check(state_of(), rcp, "ckpt.pt")


def test_keys_newer_than_the_checkpoint_count_as_their_default():
    state = state_of()
    del state["recipe"]["optim"]["grad_clip"], state["recipe"]["data"]["num_workers"]
    assert resume_rules.differences(state["recipe"], recipe.load(None)) == []


def test_foreign_checkpoint_without_recipe_is_left_to_the_shape_check():
    resume_rules.check({"model": {}}, recipe.load(None, ["model.name=lenet"]), "x.pt")


def test_new_place_names_a_folder_that_does_not_exist(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run_2").mkdir()
    rcp = recipe.load(None, [f"output_dir={tmp_path / 'run'}"])
    assert resume_rules.new_place(rcp) == f"output_dir={tmp_path / 'run_3'}"
    assert resume_rules.new_place(recipe.load(None, ["name=fresh_name_xyz"])) == \
        "name=fresh_name_xyz_2"
