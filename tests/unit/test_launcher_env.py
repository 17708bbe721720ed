"""What ffdist.dist reads from accelerate's and the deepspeed launcher's environment (the
variables as those launchers export them; the real launchers run in
tests/integration/test_launchers.py)."""

from __future__ import annotations

import pytest
import torch

from ffdist import dist, precision
from ffdist.errors import LaunchError

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                 "CROSS_RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND",
                 "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_deepspeed_launcher_variables(clean_env):
    for k, v in {**TORCHRUN, "LOCAL_SIZE": "2", "CROSS_RANK": "0"}.items():
        clean_env.setenv(k, v)
    assert dist.world_from_env() == (1, 1, 2, 2, "deepspeed")


def test_accelerate_variables_and_its_silent_no(clean_env):
    for k, v in {**TORCHRUN, "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no",
                 "ACCELERATE_DYNAMO_BACKEND": "NO"}.items():
        clean_env.setenv(k, v)
    assert dist.world_from_env() == (1, 1, 2, 2, "accelerate")
    assert dist.launcher_precision() is None  # "no" is accelerate's default, not a request
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert dist.launcher_precision() == "bf16"


def test_launcher_precision_fills_auto_and_refuses_a_contradiction():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu, "bf16") == "bf16"
    assert precision.resolve("bf16", cpu, "bf16") == "bf16"
    assert precision.resolve("fp32", cpu, None) == "fp32"
    with pytest.raises(LaunchError, match="contradicts the recipe's precision=fp32"):
        precision.resolve("fp32", cpu, "bf16")
    with pytest.raises(LaunchError, match="not supported"):
        precision.resolve("auto", cpu, "fp8")


def test_accelerate_use_cpu_keeps_the_cpu(clean_env):
    clean_env.setenv("ACCELERATE_USE_CPU", "True")
    assert dist.pick_device(0).type == "cpu"


def test_accelerate_use_fsdp_is_refused_in_one_sentence(clean_env):
    """`accelerate launch --use_fsdp` exports ACCELERATE_USE_FSDP for an Accelerator that
    ffdist never builds: refused (dist.init asks first), with the recipe key that shards."""
    clean_env.delenv("ACCELERATE_USE_FSDP", raising=False)
    dist.refuse_launcher_sharding()  # unset: nothing to say
    clean_env.setenv("ACCELERATE_USE_FSDP", "false")
    dist.refuse_launcher_sharding()
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError) as e:
        dist.init()
    text = str(e.value)
    assert text.startswith("accelerate launch --use_fsdp (ACCELERATE_USE_FSDP) has no effect")
    assert "set strategy.name=fsdp in the recipe" in text and "\n" not in text
