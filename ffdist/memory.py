"""Bytes of model states per rank (parameters, gradients, optimizer states), after the
ZeRO paper (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", section 3/5), adapted to what ffdist actually runs.

The paper's case is mixed-precision Adam: fp16 params (2 bytes/param) + fp16 grads (2) +
optimizer states K=12 (fp32 master copy 4, momentum 4, variance 4) = 16 bytes/param on
every rank for plain data parallelism, and with N ranks
    ZeRO-1 (optimizer states partitioned)      4 + 12/N
    ZeRO-2 (+ gradients partitioned)           2 + 14/N
    ZeRO-3 (+ parameters partitioned)          16/N
Our cases, per parameter (T = trainable parameters, P = all parameters):
- DDP / single: the module keeps fp32 weights also with bf16/fp16 (autocast casts
  activations, not weights): params 4P, grads 4T, optimizer 4*S*T, where S = state
  tensors per parameter: AdamW 2 (exp_avg, exp_avg_sq), SGD with momentum 1, without 0.
  No master copy. (So "bf16" does not shrink DDP's model states; it shrinks activations.)
- DeepSpeed: the module holds low-precision weights w = 2 bytes (bf16/fp16) or 4 (fp32);
  the optimizer holds a fp32 master copy (4 bytes, made even in fp32) plus its states:
  optimizer 4 + 4*S per trainable parameter. Stage 0 replicates everything, stage 1
  partitions the optimizer, 2 also the gradients (w bytes), 3 also the parameters.
  With bf16 + AdamW that is exactly the paper's 2 + 2 + 12.
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


def model_state_bytes(num_params: int, trainable_params: int, optimizer: str, precision: str,
                      strategy: str, zero_stage: int = 0, world_size: int = 1,
                      momentum: bool = True) -> dict[str, int]:
    """Bytes per rank of params / grads / optimizer states, and their total.

    strategy: single | ddp | deepspeed (zero_stage 0-3 only matters for deepspeed).
    precision: fp32 | bf16 | fp16 (the resolved precision, not "auto").
    """
    if precision not in LOW_PRECISION_BYTES:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    n = max(1, world_size)
    s = optimizer_states_per_param(optimizer, momentum)
    p, t = num_params, trainable_params
    if strategy != "deepspeed":  # single, ddp (auto resolves to one of them)
        out = {"params": 4 * p, "grads": 4 * t, "optimizer": 4 * s * t}
    else:
        w = LOW_PRECISION_BYTES[precision]
        opt = (4 + 4 * s) * t
        out = {
            "params": w * p // (n if zero_stage >= 3 else 1),
            "grads": w * t // (n if zero_stage >= 2 else 1),
            "optimizer": opt // (n if zero_stage >= 1 else 1),
        }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def paper_bytes_per_param(zero_stage: int, world_size: int, k: int = 12) -> float:
    """The paper's formula (fp16 params/grads, K bytes of optimizer state per parameter):
    DDP 2+2+K, ZeRO-1 2+2+K/N, ZeRO-2 2+(2+K)/N, ZeRO-3 (2+2+K)/N."""
    n = world_size
    return {0: 4 + k, 1: 4 + k / n, 2: 2 + (2 + k) / n, 3: (4 + k) / n}[zero_stage]
