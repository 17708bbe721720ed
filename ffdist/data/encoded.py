"""What the box path's loader workers send (data.decode=gpu | boxes): a sample's encoded
bytes and its crop box instead of its pixels, packed per micro-batch into one flat uint8
tensor with offsets (`EncodedBatch`), which the DataLoader pins like any tensor batch.

A worker reads a sample's bytes (a file, or a tar shard's member) and its header
(ffdist.data.decode_limits: the pixel limit is applied there, before anything leaves the
worker), draws its box and flip (ffdist.data.boxes) and makes an `EncodedSample`. An image
a GPU decoder must not take (not a baseline RGB JPEG: `Header.host_only` says why) is
decoded and cropped in the worker instead, as data.decode=cpu would decode it, and travels
as its finished S x S pixels (`HostSample`). The training process turns a batch into
pixels on its device (ffdist.data.gpu_decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ffdist.data.boxes import Box


@dataclass(frozen=True)
class BoxSpec:
    """What the device step needs to know of a split's batches: their side, channels and
    what to do about an image whose header was fine but whose data the decoder refuses
    (data.bad_images, data.max_bad_fraction of the split's `total`)."""

    size: int
    channels: int
    bad_images: str
    max_bad_fraction: float
    total: int
    split: str


@dataclass
class EncodedSample:
    data: torch.Tensor          # 1-D uint8: the encoded image
    box: Box
    flip: bool
    height: int                 # from the header
    width: int
    label: int
    name: str                   # which file or shard member, for messages
    spec: BoxSpec


@dataclass
class HostSample:
    image: torch.Tensor         # uint8 (C, S, S), cropped, flipped
    label: int
    name: str
    why: str                    # why the CPU decoded it (Header.host_only)
    spec: BoxSpec


@dataclass
class EncodedBatch:
    """One micro-batch of the box path, in sample order: `index` places the encoded samples
    (their bytes data[offsets[i]:offsets[i+1]], boxes, flips, sizes) and `host_index` the
    host-decoded ones (`host`: uint8 N_host x C x S x S) among the batch's len(labels)."""

    data: torch.Tensor          # uint8, every encoded sample's bytes back to back
    offsets: torch.Tensor       # int64 (E + 1)
    sizes: torch.Tensor         # int64 (E, 2): height, width
    boxes: torch.Tensor         # float64 (E, 4): top, left, height, width
    flips: torch.Tensor         # bool (E)
    index: torch.Tensor         # int64 (E)
    host: torch.Tensor          # uint8 (H, C, S, S)
    host_index: torch.Tensor    # int64 (H)
    labels: torch.Tensor        # int64 (N)
    names: list[str]            # of the encoded samples
    why: list[str] = field(default_factory=list)  # of the host samples
    spec: BoxSpec | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> torch.Tensor:
        """The bytes of encoded sample i (a view: pinned when the batch is)."""
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]

    def pin_memory(self) -> EncodedBatch:
        """The DataLoader's pin-memory thread calls this (torch pins objects that have it):
        page-locked copies of the tensors, so that copies to the GPU need no host sync."""
        pinned = {k: getattr(self, k).pin_memory() for k in
                  ("data", "offsets", "sizes", "boxes", "flips", "index", "host", "host_index",
                   "labels")}
        return replace(self, **pinned)


def collate(samples: list[EncodedSample | HostSample]) -> EncodedBatch:
    """A micro-batch of box-path samples (skipped unreadable ones already left out)."""
    spec = samples[0].spec
    enc = [(i, s) for i, s in enumerate(samples) if isinstance(s, EncodedSample)]
    host = [(i, s) for i, s in enumerate(samples) if isinstance(s, HostSample)]
    lengths = torch.tensor([0] + [s.data.numel() for _, s in enc], dtype=torch.long)
    data = torch.cat([s.data.reshape(-1) for _, s in enc]) if enc else \
        torch.empty(0, dtype=torch.uint8)
    c, side = spec.channels, spec.size
    return EncodedBatch(
        data=data, offsets=lengths.cumsum(0),
        sizes=torch.tensor([[s.height, s.width] for _, s in enc], dtype=torch.long).view(-1, 2),
        boxes=torch.tensor([s.box for _, s in enc], dtype=torch.float64).view(-1, 4),
        flips=torch.tensor([s.flip for _, s in enc], dtype=torch.bool),
        index=torch.tensor([i for i, _ in enc], dtype=torch.long),
        host=torch.stack([s.image for _, s in host]) if host else
        torch.empty(0, c, side, side, dtype=torch.uint8),
        host_index=torch.tensor([i for i, _ in host], dtype=torch.long),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        names=[s.name for _, s in enc], why=[f"{s.name}: {s.why}" for _, s in host], spec=spec)
