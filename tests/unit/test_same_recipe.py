"""What ranks must agree on, and the sentence when they do not: keys a node sets for itself
(launch.*, its data copy's path, its loader's speed) are left out; the sentence names each
differing key with the ranks that had each value. (With real ranks, under torchrun:
tests/fault/user_errors/test_ranks.py.)"""

from __future__ import annotations

from ffdist import recipe_load, same_recipe


def test_a_node_may_set_where_and_how_fast_it_runs_but_nothing_else():
    base = same_recipe.shared(recipe_load.load(None))
    node = same_recipe.shared(recipe_load.load(None, [
        "launch.node_rank=1", "launch.nnodes=2", "launch.gpus=[3]", "data.root=/local/copy",
        "data.num_workers=2", "data.prefetch_factor=4"]))
    assert node == base
    assert not any(k.startswith("launch.") or k == "data.root" for k in base)
    other = same_recipe.shared(recipe_load.load(None, ["data.micro_batch_size=8"]))
    assert other != base  # accumulation steps: collectives the ranks must call alike


def test_the_sentence_names_the_keys_and_the_ranks_of_each_value():
    ranks = [{"optim.lr": "0.1", "seed": "0", "data.batch_size": "64"}] * 4
    ranks = [*ranks[:1], {**ranks[0], "optim.lr": "0.2"}, *ranks[2:3],
             {**ranks[0], "optim.lr": "0.2", "seed": "1"}]
    assert same_recipe.differences(ranks) == (
        "the ranks were started with different recipes: optim.lr is 0.1 on ranks 0, 2 and 0.2 "
        "on ranks 1, 3; seed is 0 on ranks 0-2 and 1 on rank 3; start every rank with the same "
        "recipe file and overrides.")
    many = [{f"k{i}": str(r) for i in range(5)} for r in range(2)]
    assert same_recipe.differences(many).endswith("(and 2 more keys); start every rank with "
                                                  "the same recipe file and overrides.")
