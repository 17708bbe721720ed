"""FLOPs of one training step and the device's peak: what `ffdist bench` turns into achieved
TFLOP/s and MFU (model FLOPs utilisation = achieved / peak).

The count is torch.utils.flop_counter.FlopCounterMode over one forward + backward of the
recipe's model on the `meta` device (shapes only: no memory, no kernels, nothing of the
trained model touched): matmuls and convolutions, 2 FLOPs per multiply-add, as PaLM's and
torchtitan's MFU count them; elementwise ops, norms and the optimizer are not counted.
Frozen layers (model.freeze) compute no weight gradients, and the count knows it.

Peaks: dense (no 2:4 sparsity) tensor-core TFLOP/s from NVIDIA's datasheets, for the
dtype the run computes in: bf16/fp16 for mixed precision, TF32 for fp32 (cuDNN convolutions
use TF32 by default on Ampere and later). Boost clocks; a GPU held at lower clocks (power
cap, MIG slice) peaks lower, so MFU is an upper bound's fraction, not a promise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ffdist.recipe import Recipe

# (pattern on torch.cuda.get_device_name(), label, dense bf16 TFLOP/s, dense fp16, dense TF32)
# First match wins: the more specific names come first (GH200 contains H200, A100 A10, L40 L4).
# Sources (datasheet figures are "with sparsity": halved here):
#   H100 SXM5 / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (bf16 1,979 / 1,513 /
#     1,671 sparse; TF32 989 / 756 / 835 sparse)
#   H200 SXM / NVL: NVIDIA H200 datasheet (bf16 1,979 / 1,671 sparse; TF32 989 / 835)
#   GH200: NVIDIA GH200 Grace Hopper datasheet (the H100-class GPU: bf16 1,979 sparse)
#   A100 SXM4 / PCIe, 40 and 80 GB: NVIDIA A100 datasheet (bf16/fp16 312 dense, TF32 156)
#   L40S: NVIDIA L40S datasheet (bf16/fp16 733 sparse, TF32 366 sparse)
#   L40: NVIDIA L40 datasheet (bf16/fp16 362.1 sparse, TF32 181 sparse)
#   L4: NVIDIA L4 datasheet (bf16/fp16 242 sparse, TF32 120 sparse)
#   A10: NVIDIA A10 datasheet (bf16/fp16 250 sparse, TF32 125 sparse)
#   V100 SXM2 / PCIe: NVIDIA V100 datasheet (fp16 tensor 125 / 112; no bf16, no TF32)
#   T4: NVIDIA T4 datasheet (fp16 65; no bf16, no TF32)
PEAKS: tuple[tuple[str, str, float | None, float, float | None], ...] = (
    (r"GH200", "GH200", 989.4, 989.4, 494.7),
    (r"H200.*NVL", "H200 NVL", 835.5, 835.5, 417.5),
    (r"H200", "H200 SXM", 989.4, 989.4, 494.7),
    (r"H100.*PCIe", "H100 PCIe", 756.5, 756.5, 378.0),
    (r"H100.*NVL", "H100 NVL", 835.5, 835.5, 417.5),
    (r"H100", "H100 SXM5", 989.4, 989.4, 494.7),
    (r"A100", "A100", 312.0, 312.0, 156.0),
    (r"L40S", "L40S", 362.05, 362.05, 183.0),
    (r"L40\b", "L40", 181.05, 181.05, 90.5),
    (r"\bL4\b", "L4", 121.0, 121.0, 60.0),
    (r"\bA10\b", "A10", 125.0, 125.0, 62.5),
    (r"V100.*PCIE", "V100 PCIe", None, 112.0, None),
    (r"V100", "V100 SXM2", None, 125.0, None),
    (r"\bT4\b", "T4", None, 65.0, None),
)


def peak_tflops(device_name: str, precision: str) -> tuple[str, float] | None:
    """(label, dense peak TFLOP/s) of a known GPU for the run's compute dtype, else None
    (CPUs, unknown GPUs, or a dtype the GPU has no tensor cores for)."""
    for pattern, label, bf16, fp16, tf32 in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            peak = {"bf16": bf16, "fp16": fp16, "fp32": tf32}[precision]
            return (label, peak) if peak else None
    return None


def step_flops(recipe: Recipe, micro: int, accum: int, image_size: int) -> int:
    """FLOPs of one optimizer step (accum micro-batches of `micro`, forward + backward) of
    the recipe's model, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ffdist.assemble import build_model

    with torch.device("meta"):
        model = build_model(recipe, load_weights=False)
    c = recipe.model.in_channels
    fmt = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = torch.empty(micro, c, image_size, image_size, device="meta").contiguous(memory_format=fmt)
    y = torch.zeros(micro, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    return int(counter.get_total_flops()) * accum
