"""The device step of the data path: host uint8 batches -> normalized float batches on the
device, the copy of the next batch overlapping the compute of this one on CUDA.

A batch of the box path (data.decode=gpu | boxes: ffdist.data.encoded.EncodedBatch, bytes
and crop boxes instead of pixels) is decoded and cropped on the device first
(ffdist.data.gpu_decode.BoxDecoder), in the same place: the stream hands out what its
source made, and the Trainer sees normalized batches either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ffdist.data.encoded import EncodedBatch


class DevicePrefetcher:
    """Moves uint8 batches to the device, then converts, normalizes and lays them out there.

    On CUDA the copy of batch k+1 runs on a side stream (pinned memory, non_blocking) while
    batch k computes, as in timm's PrefetchLoader; `record_stream` tells the caching
    allocator the tensors are used on the main stream. On the CPU it is a pass-through that
    still does the normalization and memory format, so both paths feed the model alike.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False):
        # `batches`: a train or eval stream (ffdist.data.stream), or any iterable of them
        self.loader, self.device, self.channels_last = batches, device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        # (x - mean) / std as x * scale + shift: one fused addcmul pass over the batch
        self.scale = 1.0 / self.std
        self.shift = -self.mean * self.scale
        self.box_decoder: Any = None  # made at the first box-path batch (gpu_decode)

    def __len__(self) -> int:
        """Batches of an eval stream (ZeRO-3 pads short shards: strategies/deepspeed.py)."""
        return len(self.loader)  # type: ignore[arg-type]

    def _prepare(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, EncodedBatch):
            if self.box_decoder is None:
                from ffdist.data.gpu_decode import BoxDecoder

                self.box_decoder = BoxDecoder(self.device)
            x, y = self.box_decoder(batch)  # float32 0..255 on the device
        else:
            x, y = batch
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # uint8 -> float32 and the layout change in one copy, then one normalizing pass
        # (two passes over the batch, not four: layout, float, sub, div; every step).
        x = torch.addcmul(self.shift, x.to(dtype=torch.float32, memory_format=fmt), self.scale)
        if self.channels_last and not x.is_contiguous(memory_format=fmt):
            x = x.contiguous(memory_format=fmt)  # addcmul's broadcast may pick NCHW
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cuda":
            yield from self._iter_cuda()
        else:
            for batch in self.loader:
                yield self._prepare(batch)

    def _iter_cuda(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = torch.cuda.Stream(device=self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                nxt = self._prepare(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in nxt:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = nxt
        if pending is not None:
            yield pending
