"""Mixed precision: which dtype `precision: auto` means here, and the autocast context.

`resolve` is called by ffdist.assemble.resolve only (one place decides a run's precision)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: without them CPU bf16 autocast can be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(precision: str, device: torch.device, launcher: str | None = None) -> str:
    """The recipe's precision; `launcher` is what `accelerate launch --mixed_precision`
    asked for (ffdist.dist.DistInfo.launcher_precision): it fills in `auto`, and a
    contradiction with an explicit recipe value is an error rather than a silent pick."""
    if launcher is not None:
        from ffdist.errors import LaunchError

        if launcher not in DTYPES:
            raise LaunchError(f"accelerate launch --mixed_precision {launcher} is not supported "
                              "by ffdist; use bf16 or fp16, or drop the flag and set precision "
                              "in the recipe.")
        if precision not in ("auto", launcher):
            raise LaunchError(f"accelerate launch --mixed_precision {launcher} contradicts the "
                              f"recipe's precision={precision}; drop the flag (or mixed_precision "
                              f"in the accelerate config) or set precision={launcher}.")
        return launcher
    if precision == "fp16" and device.type == "cpu":
        logging.getLogger("ffdist").warning(
            "precision=fp16 on the CPU runs emulated fp16 kernels (seen 10x slower than fp32 "
            "here); use bf16 or fp32 on CPUs.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class Numerics(Protocol):
    """How a forward pass runs in the resolved precision: every Strategy is one, and so is
    `Autocast` for commands without a strategy (ffdist eval, predict)."""

    def autocast(self) -> AbstractContextManager:
        """The context every forward runs in (train and eval)."""

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as the model takes it."""


class Autocast:
    """PyTorch's mixed precision: fp32 weights, ops autocast to the precision's dtype,
    inputs left as they are."""

    def __init__(self, precision: str, device: torch.device):
        self.precision, self.device = precision, device

    def autocast(self) -> AbstractContextManager:
        return autocast(self.precision, self.device)

    def cast_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x
