"""data.decode: who decodes and crops a run's encoded images, decided once
(ffdist.assemble.resolve calls `resolve`, before the run directory is touched).

- cpu: the loader workers decode each image and augment it (transforms v2), as always;
- gpu: the box path on a CUDA device: workers read bytes and draw crop boxes, the GPU
  decodes and crops (ffdist.data.boxes, encoded, gpu_decode);
- boxes: the same box path with its device step on the CPU (a reference for tests and
  benchmarks, refused on a GPU);
- auto: gpu where the process runs on CUDA, its source holds encoded images
  (`Source.encoded`), the recipe's augmentation runs on the box path and a JPEG decoder
  runs on the GPU; else cpu, and the log says why.

The box path crops and flips; augmentation that exists only image by image on the CPU
(the data.auto_augment policies, random erasing), other resampling than bilinear and grey
models are refused with the alternative, never dropped silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ffdist.errors import RecipeError

if TYPE_CHECKING:
    import torch

    from ffdist.recipe import DataConfig


def box_path_misses(cfg: DataConfig, channels: int) -> tuple[str, str] | None:
    """(key=value, why) of the first setting the box path cannot honour, or None."""
    if cfg.auto_augment:
        return f"data.auto_augment={cfg.auto_augment}", "the policy runs image by image on the CPU"
    if cfg.random_erase > 0:
        return f"data.random_erase={cfg.random_erase}", "erasing runs image by image on the CPU"
    if cfg.interpolation != "bilinear":
        return f"data.interpolation={cfg.interpolation}", "the box path resamples bilinearly"
    if channels != 3:
        return f"model.in_channels={channels}", "the box path decodes RGB JPEGs"
    return None


def resolve(cfg: DataConfig, channels: int, device: torch.device,
            encoded: bool) -> tuple[str, str]:
    """(cpu | gpu | boxes, why it is that when data.decode=auto chose it), or the
    one-sentence RecipeError that refuses the recipe here. `encoded`: the source's samples
    are encoded images (files, tar members)."""
    mode, on_cuda = cfg.decode, device.type == "cuda"
    if mode == "cpu":
        return "cpu", ""
    if not encoded:
        if mode == "auto":
            return "cpu", f"data.name={cfg.name} holds decoded images"
        raise RecipeError(f"data.decode={mode}: data.name={cfg.name} holds images already "
                          "decoded in memory, there is nothing to decode; use data.decode=cpu.")
    misses = box_path_misses(cfg, channels)
    if mode == "auto":
        if not on_cuda:
            return "cpu", "no CUDA device"
        if misses:
            return "cpu", f"{misses[0]}: {misses[1]}"
        from ffdist.data.gpu_decode import NoDeviceDecoder, decoder_for

        try:
            return "gpu", decoder_for(device).name
        except NoDeviceDecoder as e:
            return "cpu", f"no JPEG decoder runs on {device} ({e.tried})"
    if misses:
        raise RecipeError(f"data.decode={mode} crops on the batch of crop boxes but "
                          f"{misses[0]} cannot ({misses[1]}); use data.decode=cpu.")
    if mode == "gpu" and not on_cuda:
        raise RecipeError("data.decode=gpu decodes on a CUDA GPU and this process runs on the "
                          "CPU (no GPU found, or launch.device=cpu); use data.decode=cpu.")
    if mode == "boxes" and on_cuda:
        raise RecipeError("data.decode=boxes is the box path run on the CPU (for tests and "
                          "benchmarks); on a GPU use data.decode=gpu, or data.decode=cpu.")
    if mode == "gpu":
        from ffdist.data.gpu_decode import decoder_for

        return "gpu", decoder_for(device).name  # NoDeviceDecoder: one sentence, exit 2
    return mode, ""
