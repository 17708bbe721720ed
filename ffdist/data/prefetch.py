"""The device step of the data path: host uint8 batches -> normalized float batches on the
device, the copy of the next batch overlapping the compute of this one on CUDA."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


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

    def __len__(self) -> int:
        """Batches of an eval stream (ZeRO-3 pads short shards: strategies/deepspeed.py)."""
        return len(self.loader)  # type: ignore[arg-type]

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            for x, y in self.loader:
                yield self._prepare(x, y)

    def _iter_cuda(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = torch.cuda.Stream(device=self.device)
        pending = None
        for x, y in self.loader:
            with torch.cuda.stream(stream):
                nxt = self._prepare(x, y)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in nxt:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = nxt
        if pending is not None:
            yield pending
