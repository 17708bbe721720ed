"""Bytes of model states per rank (parameters, gradients, optimizer states): the pieces
every strategy's memory model is built from, after the ZeRO paper (Rajbhandari et al.,
2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3/5).

The paper's case is mixed-precision Adam: fp16 params (2 bytes/param) + fp16 grads (2) +
optimizer states K=12 (fp32 master copy 4, momentum 4, variance 4) = 16 bytes/param on
every rank for plain data parallelism, and with N ranks
    ZeRO-1 (optimizer states partitioned)      4 + 12/N
    ZeRO-2 (+ gradients partitioned)           2 + 14/N
    ZeRO-3 (+ parameters partitioned)          16/N
Each strategy states its own arithmetic (`row_bytes` of ffdist.strategies: single device
and DDP in strategies/single.py, ZeRO in strategies/deepspeed.py), from these pieces:
S = state tensors per trainable parameter (AdamW 2: exp_avg, exp_avg_sq; SGD with
momentum 1, without 0), 4 bytes each in fp32, and the bytes of a weight in a precision.
Activations, communication buckets and allocator slack are not model states and not
counted here (benchmarks/zero_memory.py reports what it finds beside them).
"""

from __future__ import annotations

LOW_PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def optimizer_states_per_param(optimizer: str, momentum: bool = True) -> int:
    """State tensors per trainable parameter (fp32 each)."""
    if optimizer == "adamw":
        return 2
    if optimizer == "sgd":
        return 1 if momentum else 0
    raise ValueError(f"unknown optimizer {optimizer!r}; use sgd or adamw")


def weight_bytes(precision: str) -> int:
    """Bytes of one weight held in `precision` (the resolved one: fp32 | bf16 | fp16)."""
    if precision not in LOW_PRECISION_BYTES:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    return LOW_PRECISION_BYTES[precision]


def with_total(states: dict[str, int]) -> dict[str, int]:
    """params / grads / optimizer, and their total."""
    return {**states, "total": states["params"] + states["grads"] + states["optimizer"]}


def paper_bytes_per_param(zero_stage: int, world_size: int, k: int = 12) -> float:
    """The paper's formula (fp16 params/grads, K bytes of optimizer state per parameter):
    DDP 2+2+K, ZeRO-1 2+2+K/N, ZeRO-2 2+(2+K)/N, ZeRO-3 (2+2+K)/N."""
    n = world_size
    return {0: 4 + k, 1: 4 + k / n, 2: 2 + (2 + k) / n, 3: (4 + k) / n}[zero_stage]
