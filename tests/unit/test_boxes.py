"""The box path (data.decode=gpu | boxes) on the CPU: the crop boxes and flips are the ones
data.decode=cpu draws, sample for sample; the batched crop of a batch of boxes gives what a
per-sample roi_align over each whole image gives; the loader worker -> EncodedBatch -> device
step chain (ffdist.data.gpu_decode on the CPU) gives the images of a per-sample reference
decode + crop of the same boxes, files the GPU decoder must not take included; data.decode
is resolved, or refused in one sentence, before anything runs.

Tolerances: the batched crop and the per-sample reference run the same roi_align in other
coordinates (a region of the image instead of the whole), so they differ by float rounding
of the sample positions: at most 0.01 grey level here (measured 0.001). Images the worker
decodes (HostSample) are rounded to uint8 there: at most 0.5 plus that."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from ffdist import recipe_load
from ffdist.data import boxes as B
from ffdist.data import decode_limits, decoding
from ffdist.data import transforms as T
from ffdist.data.datasets import FileImages, collate, decode_bytes, read_bytes
from ffdist.data.encoded import EncodedBatch, EncodedSample, HostSample
from ffdist.data.gpu_decode import BoxDecoder, NoDeviceDecoder
from ffdist.errors import DataError, RecipeError

ROUNDING = 0.01


def _jpeg(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    mode = kw.pop("mode", None)
    (image.convert(mode) if mode else image).save(buf, kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus noise: something a JPEG encoder keeps recognisable."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 200 / h, xx * 200 / w, (yy + xx) * 100 / (h + w)], -1)
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _reference(image: torch.Tensor, box: B.Box, flip: bool, size: int) -> torch.Tensor:
    """roi_align over the WHOLE image, one box: what the batched crop must reproduce."""
    top, left, h, w = box
    rois = torch.tensor([[0, left, top, left + w, top + h]], dtype=torch.float32)
    x = roi_align(image[None].float(), rois, (size, size), 1.0, -1, True)[0]
    return x.flip(-1) if flip else x


def test_boxes_and_flips_are_the_ones_decode_cpu_draws() -> None:
    """data.decode=cpu's transform, seeded per sample, equals a resized crop of the drawn box
    (+ flip) bit for bit: the same calls on the same generator, in the same order."""
    sampler, tf = B.TrainBoxes(24), T.folder_train(24)
    flips = set()
    for i, (h, w) in enumerate([(40, 60), (75, 31), (50, 50), (20, 90), (300, 200)] * 4):
        image = torch.from_numpy(_photo(h, w, i)).permute(2, 0, 1).contiguous()
        seed = int(T.sample_seeds(7, i % 3, torch.tensor([i]))[0])
        box, flip = sampler.draw(seed, h, w)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            today = tf(image)
        top, left, bh, bw = (int(v) for v in box)
        mine = F.resized_crop(image, top, left, bh, bw, [24, 24], antialias=True)
        assert torch.equal(today, F.horizontal_flip(mine) if flip else mine), i
        flips.add(flip)
    assert flips == {True, False}


@pytest.mark.parametrize("boxes_of", ["train", "eval"])
def test_box_geometry_matches_decode_cpu_on_a_ramp(boxes_of: str) -> None:
    """On I(y, x) = y + x every symmetric resampling filter returns the value at the output
    pixel's centre: inside the crop (away from the clamped edges) the box path and
    decode=cpu's torchvision resize agree to within the fixed-point rounding of torchvision's
    uint8 resize (one grey level), so their geometry is one; a box off by a pixel would
    differ by 1-2 levels per pixel everywhere."""
    h, w, size = 90, 140, 32
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = (yy + xx).to(torch.uint8).expand(3, h, w).contiguous()
    if boxes_of == "train":
        sampler, tf, seed = B.TrainBoxes(size), T.folder_train(size), 12345
    else:
        sampler, tf, seed = B.EvalBoxes(size), T.folder_eval(size), 0
    box, flip = sampler.draw(seed, h, w)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        today = tf(image).float()
    mine = B.flip(B.crop([image], [box], size), torch.tensor([flip]))[0]
    inner = (slice(None), slice(3, -3), slice(3, -3))
    assert (mine[inner] - today[inner]).abs().max() <= 1.0 + ROUNDING, boxes_of


def test_batched_crop_equals_per_image_roi_align_at_edges_and_across_canvases() -> None:
    images = [torch.from_numpy(_photo(h, w, i)).permute(2, 0, 1).contiguous()
              for i, (h, w) in enumerate([(40, 60), (75, 31), (50, 50), (20, 90)])]
    boxes = [(0.0, 0.0, 40.0, 60.0),     # the whole image: every edge clamps
             (40.0, 11.0, 35.0, 20.0),   # touching the bottom and the right edge
             (2.96, 12.0, 35.5, 36.0),   # an eval box: fractional
             (5.0, 70.0, 3.0, 4.0)]      # tiny, enlarged 8x
    flips = torch.tensor([False, True, False, True])
    want = torch.stack([_reference(i, b, bool(f), 24) for i, b, f in zip(images, boxes, flips)])
    for budget in (B.CANVAS_ELEMENTS, 3 * 60 * 60, 1):  # one canvas, two, one per image
        got = B.flip(B.crop(images, boxes, 24, budget=budget), flips)
        assert (got - want).abs().max() <= ROUNDING, budget
    one = B.crop_one(images[1], boxes[1], True, 24)
    assert one.dtype == torch.uint8 and (one.float() - want[1]).abs().max() <= 0.5 + ROUNDING


@pytest.mark.parametrize(("kind", "host_only"), [
    ({}, ""), ({"subsampling": 0}, ""), ({"progressive": True}, "a progressive JPEG"),
    ({"mode": "L"}, "a grey JPEG"), ({"mode": "CMYK"}, "a CMYK JPEG"),
    ({"format": "PNG"}, "PNG"), ({"exif": "rotated"}, "an EXIF-rotated JPEG")])
def test_header_says_which_images_a_gpu_decoder_must_not_take(kind: dict, host_only: str):
    kw = dict(kind)
    if kw.get("exif"):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: TorchCodec would turn it, ffdist's CPU decode does not
        kw["exif"] = exif.tobytes()
    header = decode_limits.read_header(_jpeg(_photo(30, 40), **kw))
    assert (header.width, header.height, header.host_only) == (40, 30, host_only)


def _folder(root: Path) -> list[tuple[str, int]]:
    """Six files: baseline JPEGs (the device's) and a PNG, a progressive and a grey JPEG
    (the worker's)."""
    kinds = [{}, {"format": "PNG"}, {}, {"progressive": True}, {"mode": "L"}, {}]
    samples = []
    for i, kw in enumerate(kinds):
        path = root / f"{i}.{'png' if kw.get('format') == 'PNG' else 'jpg'}"
        path.write_bytes(_jpeg(_photo(30 + 7 * i, 50 - 3 * i, i), **kw))
        samples.append((str(path), i % 3))
    return samples


@pytest.mark.parametrize("split", ["train", "val"])
def test_worker_boxes_batched_crop_equal_a_per_sample_reference(tmp_path: Path,
                                                                split: str) -> None:
    samples = _folder(tmp_path)
    sampler = B.TrainBoxes(20) if split == "train" else B.EvalBoxes(20)
    ds = FileImages(samples, sampler, 3, seed=3, split=split)
    keys = [(2, i) for i in range(len(samples))] if split == "train" else list(range(6))
    batch = collate([ds[k] for k in keys])
    assert isinstance(batch, EncodedBatch)
    assert batch.index.tolist() == [0, 2, 5] and batch.host_index.tolist() == [1, 3, 4]
    assert len(batch.why) == 3 and "a progressive JPEG" in batch.why[1]
    decoder = BoxDecoder(torch.device("cpu"))
    x, y = decoder(batch)
    assert x.shape == (6, 3, 20, 20) and x.dtype == torch.float32
    assert y.tolist() == [lab for _, lab in samples]
    for i, (path, _) in enumerate(samples):
        image = decode_bytes(read_bytes(path))
        epoch, idx = (keys[i][0], i) if split == "train" else (0, i)
        seed = int(T.sample_seeds(3 if split == "train" else 0, epoch, torch.tensor([idx]))[0])
        box, flip = sampler.draw(seed, image.shape[-2], image.shape[-1])
        want = _reference(image, box, flip, 20)
        slack = ROUNDING + (0.5 if i in (1, 3, 4) else 0.0)  # host samples: rounded
        assert (x[i] - want).abs().max() <= slack, (i, path)
    assert decoder.counts == {"device": 3, "host": 3, "bad": 0}


def _broken_jpeg() -> bytes:
    """A JPEG header with no image data: the header check passes, every decoder refuses."""
    data = _jpeg(_photo(30, 40))
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def test_a_jpeg_every_decoder_refuses_is_skipped_or_stops_the_run(tmp_path: Path) -> None:
    samples = _folder(tmp_path)[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_broken_jpeg())
    samples.insert(1, (str(broken), 2))
    for policy in ("skip", "error"):
        ds = FileImages(samples, B.TrainBoxes(16), 3, bad_images=policy,
                        max_bad_fraction=0.5)
        batch = collate([ds[(0, i)] for i in range(4)])
        assert isinstance(batch, EncodedBatch) and len(batch) == 4
        decoder = BoxDecoder(torch.device("cpu"))
        if policy == "error":
            with pytest.raises(DataError, match="broken.jpg: cannot be decoded"):
                decoder(batch)
            continue
        x, y = decoder(batch)  # the broken one left out, the others in order
        assert x.shape[0] == 3 and y.tolist() == [samples[i][1] for i in (0, 2, 3)]
        assert decoder.counts["bad"] == 1 and str(broken) in decoder.bad


def test_the_pixel_limit_applies_in_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(_photo(60, 80)))
    ds = FileImages([(str(path), 0)], B.TrainBoxes(16), 3, max_pixels=1000, max_bad_fraction=1)
    assert ds[(0, 0)] is None and "more than data.max_image_pixels=1000" in ds.bad[str(path)]


def _cfg(*overrides: str):
    rcp = recipe_load.load(None, ["data.name=imagefolder", "data.root=/nowhere",
                                  "model.in_channels=3", *overrides])
    return rcp.data


CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_decode_resolves_or_refuses_in_one_sentence() -> None:
    assert decoding.resolve(_cfg(), 3, CPU, True) == ("cpu", "")
    assert decoding.resolve(_cfg("data.decode=boxes"), 3, CPU, True) == ("boxes", "")
    assert decoding.resolve(_cfg("data.decode=auto"), 3, CPU, True) == ("cpu", "no CUDA device")
    mode, why = decoding.resolve(_cfg("data.decode=auto", "data.auto_augment=ra"), 3, CUDA, True)
    assert mode == "cpu" and why.startswith("data.auto_augment=ra")
    assert decoding.resolve(_cfg("data.decode=auto"), 1, CPU, False)[0] == "cpu"
    refusals = {
        ("data.decode=gpu",): "this process runs on the CPU",
        ("data.decode=gpu", "data.auto_augment=ta_wide"): "data.auto_augment=ta_wide cannot",
        ("data.decode=boxes", "data.random_erase=0.25"): "data.random_erase=0.25 cannot",
        ("data.decode=gpu", "data.interpolation=bicubic"): "data.interpolation=bicubic",
    }
    for overrides, says in refusals.items():
        with pytest.raises(RecipeError) as e:
            decoding.resolve(_cfg(*overrides), 3, CPU, True)
        text = str(e.value)
        assert says in text and "use data.decode=cpu" in text and text.count(". ") == 0, text
    with pytest.raises(RecipeError, match="holds images already decoded"):
        decoding.resolve(_cfg("data.decode=gpu"), 3, CPU, False)
    with pytest.raises(RecipeError, match="on a GPU use data.decode=gpu"):
        decoding.resolve(_cfg("data.decode=boxes"), 3, CUDA, True)
    with pytest.raises(RecipeError, match="model.in_channels=1"):
        decoding.resolve(_cfg("data.decode=gpu"), 1, CUDA, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU decoder may exist here")
def test_auto_and_gpu_on_a_cuda_device_without_a_decoder() -> None:
    """The device check runs a tiny JPEG through each candidate decoder: without a GPU none
    works, so gpu is one sentence naming the fix and auto falls back to cpu, saying why."""
    with pytest.raises(NoDeviceDecoder) as e:
        decoding.resolve(_cfg("data.decode=gpu"), 3, CUDA, True)
    assert "install TorchCodec" in str(e.value) and "data.decode=cpu" in str(e.value)
    mode, why = decoding.resolve(_cfg("data.decode=auto"), 3, CUDA, True)
    assert mode == "cpu" and why.startswith("no JPEG decoder runs on cuda")


def test_encoded_samples_pack_into_one_flat_tensor() -> None:
    from ffdist.data.encoded import BoxSpec

    spec = BoxSpec(8, 3, "skip", 0.1, 10, "train")
    a, b = (torch.arange(n, dtype=torch.uint8) for n in (5, 3))
    host = torch.full((3, 8, 8), 7, dtype=torch.uint8)
    batch = collate([EncodedSample(a, (0, 0, 4, 4), True, 10, 12, 1, "a", spec),
                     HostSample(host, 2, "h", "PNG", spec),
                     EncodedSample(b, (1, 1, 2, 2), False, 6, 7, 0, "b", spec)])
    assert batch.data.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and batch.offsets.tolist() == [0, 5, 8]
    assert torch.equal(batch.encoded(1), b) and batch.sizes.tolist() == [[10, 12], [6, 7]]
    assert batch.index.tolist() == [0, 2] and batch.host_index.tolist() == [1]
    assert batch.labels.tolist() == [1, 2, 0] and batch.flips.tolist() == [True, False]
    assert batch.names == ["a", "b"] and batch.why == ["h: PNG"] and batch.spec is spec
