"""The strategy seam, end to end: a strategy ffdist does not ship (tests/fault/rank_shards.py,
registered from the test's own entry point) declares per-rank shards and no resume at
another world size, and ffdist honours exactly that: real torchrun ranks each write and
read their own shard, a resumed run continues bit for bit, and a resume with another
world size is refused in one sentence before the run directory changes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from tests.fault import kit
from tests.helpers import BIN, RECIPES, free_port, refused

STEPS, AT = 15, 10  # checkpoints every 5 steps (kit.ARGS); resumed from the one of step 10
ARGS = (*kit.ARGS, f"schedule.max_steps={STEPS}", "strategy.name=rank_shards")
ENTRY = ("-m", "tests.fault.rank_shards", str(RECIPES / "digits.yaml"))


def python_cmd(out: Path) -> list[str]:
    return [sys.executable, *ENTRY, *ARGS, f"output_dir={out}"]


def torchrun_cmd(out: Path) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            *ENTRY, *ARGS, f"output_dir={out}"]


def cut_at(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as it was right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    (dst / "model.pt").unlink()
    for folder in (dst / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


def test_a_registered_sharded_strategy_resumes_exactly_and_only_as_it_declares(tmp_path):
    ref = tmp_path / "ref"
    done = kit.run(torchrun_cmd(ref))
    assert done.returncode == 0, kit.explain(done)

    folder = ref / "checkpoints" / f"step_{AT:08d}"
    assert sorted(p.name for p in folder.iterdir()) == ["ffdist_state.pt", "rank_0.pt",
                                                          "rank_1.pt"]
    marker = torch.load(folder / "ffdist_state.pt", weights_only=True)
    assert marker["layout"] == {"kind": "shards", "format": "rank-shards", "world_size": 2,
                                "params": {}}
    assert marker["model"] is None and "strategy" not in marker  # the layout, not a name
    shards = [torch.load(folder / f"rank_{r}.pt", weights_only=True)["model"] for r in (0, 1)]
    assert any(not torch.equal(shards[0][k], shards[1][k]) for k in shards[0]), \
        "each rank trains its own replica: its shard is its own"

    out = tmp_path / "resumed"
    cut_at(ref, out, AT)
    resumed = kit.run(torchrun_cmd(out))
    assert resumed.returncode == 0, kit.explain(resumed)
    assert f"resumed from step {AT}" in resumed.stdout + resumed.stderr
    assert kit.train_losses(out) == kit.train_losses(ref), "losses differ from the uninterrupted run"
    kit.same_weights(out / "model.pt", ref / "model.pt")

    other = tmp_path / "one_process"
    cut_at(ref, other, AT)
    line = refused(python_cmd(other), other)
    assert "holds rank-shards shards of 2 ranks, this run would write rank-shards shards of " \
           "1 rank; rank-shards resumes its checkpoints only as they were written: resume " \
           "with 2 process(es)" in line
