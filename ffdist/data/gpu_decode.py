"""The device step of the box path (data.decode=gpu | boxes): an EncodedBatch (bytes, boxes,
flips: ffdist.data.encoded) -> float32 images (N, C, S, S, 0..255) on the device, which
ffdist.data.prefetch.DevicePrefetcher then normalises and lays out as for any batch, on its
side stream (so on CUDA this overlaps the previous step's compute).

1. decode the batch's JPEGs on the device in one call (`Decoder`): TorchCodec's
   `decode_jpeg(list, device="cuda")` (nvjpeg; the hardware JPEG engine on A100/H100) where
   it imports and runs, else torchvision's `decode_jpeg(list, device="cuda")` (deprecated
   since torchvision 0.29 in TorchCodec's favour, still nvjpeg); on the CPU
   (data.decode=boxes) `ffdist.data.datasets.decode_bytes`, the CPU path's decoder, in the
   training process;
2. crop and resize every box in one batched roi_align (ffdist.data.boxes.crop), flip;
3. put in the samples the loader workers decoded on the CPU (not baseline RGB JPEGs).

Host syncs: none of ffdist's own (boxes, sizes and flips come from the host's batch; small
tensors reach the GPU through pinned memory; flips are a torch.where). TorchCodec 0.17's
CUDA decode itself synchronises the stream it runs on (DecodeJpegCuda.cpp: before and after
nvjpeg's batched call), here the prefetcher's side stream: the host waits for the decode of
batch k+1 while the GPU computes step k, and the compute stream never waits for the host.

A JPEG whose header was fine but whose data the device decoder refuses: the batch is decoded
again one image at a time, a refused image through decode_bytes on the CPU, and one that
fails there too follows data.bad_images (skip: left out of its batch, counted against
data.max_bad_fraction; error: one sentence naming the file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import torch

from ffdist.data import boxes as B
from ffdist.data.encoded import BoxSpec, EncodedBatch
from ffdist.errors import DataError, FfdistError

log = logging.getLogger("ffdist")

TORCHCODEC_MIN = (0, 16)
"""TorchCodec decodes JPEG on CUDA from this version on."""


class NoDeviceDecoder(FfdistError):
    """data.decode=gpu where no JPEG decoder runs on the GPU; every rank finds it alike."""

    same_on_all_ranks = True
    tried = ""  # what each candidate decoder said


Decode = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class Decoder:
    """Encoded JPEGs (1-D uint8 host tensors) -> uint8 RGB CHW images on `device`."""

    def __init__(self, name: str, decode: Decode):
        self.name, self.decode = name, decode


@cache
def decoder_for(device: torch.device) -> Decoder:
    """The decoder of `device`, tried once per process on a tiny JPEG (NoDeviceDecoder,
    naming what each candidate said, when none works)."""
    if device.type != "cuda":
        from ffdist.data.datasets import decode_bytes

        return Decoder("decode_bytes on the CPU (libjpeg-turbo), in the training process",
                       lambda datas: [decode_bytes(d, 3, 1 << 62) for d in datas])
    tried = []
    for make in (_torchcodec, _torchvision):
        try:
            dec = make(device)
            dec.decode([_probe_jpeg()])
            return dec
        except Exception as e:  # import errors, missing libraries, no nvjpeg: say which
            tried.append(f"{make.__name__[1:]}: {' '.join(str(e).split())[:160]}")
    err = NoDeviceDecoder(f"data.decode=gpu: no JPEG decoder runs on {device} here ("
                          f"{'; '.join(tried)}); install TorchCodec (pip install 'torchcodec>="
                          f"{TORCHCODEC_MIN[0]}.{TORCHCODEC_MIN[1]}') or use data.decode=cpu.")
    err.tried = "; ".join(tried)
    raise err


def _torchcodec(device: torch.device) -> Decoder:
    import torchcodec
    from torchcodec.decoders import decode_jpeg

    version = tuple(int(p) for p in torchcodec.__version__.split("+")[0].split(".")[:2])
    if version < TORCHCODEC_MIN:
        raise ImportError(f"TorchCodec {torchcodec.__version__} has no CUDA JPEG decoder")
    return Decoder(f"TorchCodec {torchcodec.__version__} (nvjpeg) on {device}",
                   lambda datas: decode_jpeg(datas, mode="RGB", device=device))


def _torchvision(device: torch.device) -> Decoder:
    import warnings

    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # its deprecation notice, once per batch otherwise
            warnings.simplefilter("ignore")
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return Decoder(f"torchvision {torchvision.__version__} decode_jpeg (nvjpeg) on {device}",
                   decode)


@cache
def _probe_jpeg() -> torch.Tensor:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


class BoxDecoder:
    """The device step of the box path on `device` (module docstring). Counts the samples it
    decoded on the device and those the workers decoded on the CPU (`counts`), and says once
    in the log why the first host-decoded one was."""

    def __init__(self, device: torch.device, decoder: Decoder | None = None):
        self.device = device
        self.decoder = decoder or decoder_for(device)
        self.counts = {"device": 0, "host": 0, "bad": 0}
        self.bad: dict[str, str] = {}

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 N x C x S x S on the device, 0..255; int64 labels on the device)."""
        spec = batch.spec
        assert spec is not None
        offsets = batch.offsets.tolist()  # host tensors: no device sync
        datas = [batch.data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        images, kept = self._decode(datas, batch.names, spec)
        labels, index = batch.labels, batch.index
        if len(kept) < len(datas):  # refused by every decoder and skipped (rare)
            lost = {int(index[i]) for i in set(range(len(datas))) - set(kept)}
            order = [i for i in range(len(labels)) if i not in lost]  # the batch without them
            place = {old: new for new, old in enumerate(order)}
            labels = labels[order]
            index = torch.tensor([place[int(index[i])] for i in kept], dtype=torch.long)
            host_index = torch.tensor([place[int(i)] for i in batch.host_index.tolist()],
                                      dtype=torch.long)
            boxes, flips = batch.boxes[kept], batch.flips[kept]
        else:
            host_index, boxes, flips = batch.host_index, batch.boxes, batch.flips
        self._count(batch, len(images))
        n, side = len(labels), spec.size
        y = self._to(labels)
        if not images:
            x = torch.empty(n, spec.channels, side, side, dtype=torch.float32, device=self.device)
        else:
            x = B.crop(images, [tuple(b) for b in boxes.tolist()], side)
            x = B.flip(x, self._to(flips))
            if len(images) == n:  # every sample decoded here, in order: x is the batch
                return x, y
            full = torch.empty(n, *x.shape[1:], dtype=torch.float32, device=self.device)
            x = full.index_copy_(0, self._to(index), x)
        if len(host_index):
            x.index_copy_(0, self._to(host_index), self._to(batch.host).float())
        return x, y

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _decode(self, datas: list[torch.Tensor], names: list[str],
                spec: BoxSpec) -> tuple[list[torch.Tensor], list[int]]:
        """(images, which of `datas` they are): one batched call, else image by image."""
        if not datas:
            return [], []
        try:
            return self.decoder.decode(datas), list(range(len(datas)))
        except Exception:  # which image: one at a time (rare: the headers were read fine)
            pass
        from ffdist.data.datasets import decode_bytes, decode_error

        images, kept = [], []
        for i, (data, name) in enumerate(zip(datas, names)):
            try:
                images.append(self.decoder.decode([data])[0])
            except Exception:
                try:  # this path's own decoder refused it: the CPU path's decoder may not
                    images.append(decode_bytes(data, spec.channels, 1 << 62).to(self.device))
                except (RuntimeError, OSError, ValueError) as e:
                    self._unreadable(name, decode_error(e), spec)
                    continue
            kept.append(i)
        return images, kept

    def _unreadable(self, name: str, reason: str, spec: BoxSpec) -> None:
        """data.bad_images for an image the decoders refused after its header passed."""
        if spec.bad_images == "error":
            raise DataError(f"{name}: cannot be decoded as an image ({reason}); replace or "
                            "remove the file, or set data.bad_images=skip to skip such files.")
        if name in self.bad:
            return
        self.bad[name] = reason
        self.counts["bad"] += 1
        if len(self.bad) > spec.max_bad_fraction * spec.total:
            raise DataError(f"{len(self.bad)} of {spec.total} {spec.split} images cannot be "
                            f"decoded (more than data.max_bad_fraction={spec.max_bad_fraction}), "
                            f"e.g. {name} ({reason}); replace or remove them, or raise "
                            "data.max_bad_fraction.")
        log.warning("data.bad_images=skip: skipping undecodable %s image %s (%s)", spec.split,
                    name, reason)

    def _count(self, batch: EncodedBatch, decoded: int) -> None:
        self.counts["device"] += decoded
        self.counts["host"] += len(batch.host_index)
        if batch.why and not _told:
            _told.append(True)  # once per process, for the train and eval streams together
            log.info("data.decode: images a GPU JPEG decoder must not take are decoded and "
                     "cropped on the CPU by the loader workers, e.g. %s; `ffdist bench` "
                     "counts them", batch.why[0])


_told: list[bool] = []
