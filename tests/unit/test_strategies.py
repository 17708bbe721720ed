"""The strategy registry (ffdist.strategies): names resolve to classes imported only when
asked (DeepSpeed's module never imports the deepspeed package by being asked), `auto` and
one-process strategies, unknown names refused in one sentence, declarations checked on
registration, and a registered strategy's memory row reaching `ffdist plan`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ffdist import recipe_load, strategies
from ffdist.assemble import resolve
from ffdist.ckpt_format import SHARDS
from ffdist.errors import LaunchError, RecipeError
from ffdist.strategies.single import SingleDevice
from tests.helpers import REPO, env

CPU = torch.device("cpu")


def test_asking_every_strategy_imports_no_heavy_library():
    code = ("import sys\nfrom ffdist import recipe_load, strategies\nrcp = recipe_load.load(None)\n"
            "for name in strategies.names():\n"
            "    cls = strategies.get(name); cls.layout_params(rcp); cls.row_of(rcp)\n"
            "strategies.row_overrides()\n"
            "print(sorted(m for m in ('deepspeed', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name,world,expected", [("auto", 1, "single"), ("auto", 2, "ddp"),
                                                 ("ddp", 1, "single"), ("deepspeed", 4, "deepspeed")])
def test_names_resolve(name: str, world: int, expected: str):
    rcp = recipe_load.load(None, [f"strategy.name={name}"])
    assert strategies.resolve_name(rcp, world) == expected


def test_a_one_process_strategy_and_unknown_names_are_refused():
    rcp = recipe_load.load(None, ["strategy.name=single"])
    with pytest.raises(RecipeError, match="strategy.name=single but 2 processes were started; "
                                          r"use strategy.name=ddp \(or auto\)"):
        resolve(rcp, 2, CPU)
    assert resolve(rcp, 2, CPU, trains=False).strategy == "single"  # eval runs the plain model
    for name, hint in (("zero", ""), ("deepspeeed", r" \(did you mean deepspeed\?\)")):
        rcp = recipe_load.load(None, [f"strategy.name={name}"])
        with pytest.raises(RecipeError, match=f"strategy.name={name} is not a strategy{hint}; "
                                              "use auto, single, ddp, deepspeed, fsdp"):
            resolve(rcp, 1, CPU)
        # eval and predict run the plain model: a strategy registered elsewhere is no matter
        assert resolve(rcp, 1, CPU, trains=False).strategy == name


def test_precision_refusals_are_the_strategy_s():
    rcp = recipe_load.load(None, ["strategy.name=deepspeed", "precision=fp16"])
    with pytest.raises(LaunchError, match="precision=fp16 with DeepSpeed needs a GPU"):
        resolve(rcp, 1, CPU)
    assert resolve(rcp, 1, CPU, trains=False).precision == "fp16"


def test_registration_checks_the_declarations():
    class Forgetful(SingleDevice):
        layout_kind, layout_format = SHARDS, "forgetful"  # but still reads TORCH_FILE only

    with pytest.raises(TypeError, match="reads must include its layout_format 'forgetful'"):
        strategies.register("forgetful", Forgetful)
    with pytest.raises(ValueError, match="lower-case"):
        strategies.register("Auto", SingleDevice)
    with pytest.raises(ValueError, match="not auto"):
        strategies.register("auto", SingleDevice)


def test_a_registered_strategy_adds_its_row_to_plan(monkeypatch):
    from ffdist import assemble, plan

    class Halves(SingleDevice):
        memory_rows = {"HALF": "strategy.name=halves"}

        @classmethod
        def row_bytes(cls, row, num_params, trainable, recipe, resolved):
            full = SingleDevice.row_bytes("DDP", num_params, trainable, recipe, resolved)
            return {k: v // 2 for k, v in full.items()}

    monkeypatch.setitem(strategies.REGISTRY, "halves", Halves)
    rcp = recipe_load.load(None, ["model.in_channels=1", "strategy.name=halves"])
    resolved = resolve(rcp, 1, CPU)
    p = plan.estimate(rcp, assemble.build_model(rcp, load_weights=False), resolved)
    assert list(p.rows)[-1] == "HALF" and list(p.rows)[0] == "DDP"  # registration order
    assert p.rows["HALF"]["params"] == p.rows["DDP"]["params"] // 2
    assert plan.recipe_row(rcp, resolved) == "HALF"
    tight = plan.MemoryEstimate({"DDP": {"total": 10}, "HALF": {"total": 5}}, activations=1, per_sample=1)
    assert "use strategy.name=halves" in plan.recommend(tight, 7, per_rank=1, micro=1)


def test_the_worked_example_in_the_docs_is_the_tested_strategy():
    """docs/extending.md shows tests/fault/rank_shards.py's code, which the seam test runs."""
    import re

    page = (REPO / "docs" / "extending.md").read_text()
    section = page.split("## Adding a strategy", 1)[1].split("\n## ", 1)[0]
    source = (REPO / "tests" / "fault" / "rank_shards.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all(block in source for block in blocks)


def test_fsdp_declares_dcp_shards_that_resume_at_any_world_size(tmp_path):
    """FSDP's checkpoints are DCP folders of per-rank shards that DCP reshards on load: any
    world size resumes them; other formats are refused naming the strategies that read
    them. Asked of the class: nothing is built, torch.distributed is not initialised."""
    from ffdist.ckpt_format import Layout
    from ffdist.errors import CheckpointError

    fsdp = strategies.get("fsdp")
    assert fsdp.layout_kind == SHARDS and fsdp.layout_format == "torch-dcp" and fsdp.reshards
    assert fsdp.uses_blocks and "FSDP" in strategies.row_overrides()
    rcp = recipe_load.load(None, ["strategy.name=fsdp"])
    rcp = recipe_load.load(None, ["strategy.name=fsdp", "data.batch_size=24"])
    for saved_world, world in ((2, 1), (2, 3), (4, 2)):
        strategies.check_resume(Layout(SHARDS, "torch-dcp", saved_world), 6, tmp_path, rcp,
                                resolve(rcp, world, CPU))
    with pytest.raises(CheckpointError, match="strategy.name=deepspeed"):
        strategies.check_resume(Layout(SHARDS, "deepspeed-zero", 2, {"zero_stage": 3}), 6,
                                tmp_path, rcp, resolve(rcp, 2, CPU))
    ddp = recipe_load.load(None, ["strategy.name=ddp"])
    with pytest.raises(CheckpointError, match="strategy.name=fsdp"):
        strategies.check_resume(Layout(SHARDS, "torch-dcp", 2), 6, tmp_path, ddp,
                                resolve(ddp, 2, CPU))


def test_fsdp_refuses_offload_on_the_cpu():
    rcp = recipe_load.load(None, ["strategy.name=fsdp", "strategy.fsdp_offload=true",
                                  "precision=fp32", "model.in_channels=1"])
    from ffdist import assemble
    from ffdist.dist import DistInfo

    info = DistInfo(0, 0, 1, 1, CPU, "none")
    with pytest.raises(RecipeError, match="this run is on the CPU already; remove it"):
        strategies.build(assemble.build_model(rcp), rcp, resolve(rcp, 1, CPU), info)


def test_fsdp_memory_row_arithmetic():
    """Sharded fp32 states (4 + 4 + 4*S bytes per parameter / N) plus the gathered root and
    largest block in the compute dtype, and that block's unsharded fp32 gradient."""
    fsdp = strategies.get("fsdp")
    rcp = recipe_load.load(None, ["strategy.name=fsdp", "optim.name=adamw", "precision=bf16"])
    blocks = (300, 500, 200)  # 1000 in blocks, 24 in the root
    row = fsdp.row_bytes("FSDP", 1024, 1024, rcp, resolve(rcp, 4, CPU), block_params=blocks)
    assert row["params"] == 4 * 1024 // 4 + 2 * (24 + 500)
    assert row["grads"] == 4 * 1024 // 4 + 4 * 500
    assert row["optimizer"] == 8 * 1024 // 4
    assert row["total"] == row["params"] + row["grads"] + row["optimizer"]
    off = recipe_load.load(None, ["strategy.name=fsdp", "optim.name=adamw", "precision=bf16",
                                  "strategy.fsdp_offload=true"])
    row = fsdp.row_bytes("FSDP", 1024, 1024, off, resolve(off, 4, CPU), block_params=blocks)
    assert row == {"params": 2 * 524, "grads": 2000, "optimizer": 0, "total": 3048}
