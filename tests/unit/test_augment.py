"""Policy augmentation, random erasing, eval resolution and repeated augmentation: each
against torchvision's own transform (or DeiT's sampler) under the same per-sample seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from ffdist import recipe_load
from ffdist.data import build, sources
from ffdist.data import transforms as T
from ffdist.data.datasets import decode
from ffdist.data.mapstyle import TrainSampler
from ffdist.errors import RecipeError
from ffdist.resolved import plan_batches

BILINEAR, BICUBIC = v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC


def build_datasets(cfg, seed: int, num_classes: int, channels: int):
    """The train/val datasets and spec of a map-style source."""
    return sources.get(cfg.name).datasets(cfg, seed, num_classes, channels)


def _digits(*overrides: str):
    return build_datasets(recipe_load.load(None, list(overrides)).data, 7, 10, 1)


def _torchvision_reference(name: str) -> v2.Transform:
    """What each data.auto_augment value must mean, written out with torchvision's API."""
    return {"ra": v2.RandAugment(num_ops=3, magnitude=5, interpolation=BILINEAR),
            "ta_wide": v2.TrivialAugmentWide(interpolation=BILINEAR),
            "augmix": v2.AugMix(severity=2, interpolation=BILINEAR),
            "imagenet": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=BILINEAR),
            "cifar10": v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, interpolation=BILINEAR)}[name]


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "augmix", "imagenet", "cifar10"])
def test_policy_is_torchvisions_transform_under_the_sample_seed(policy: str) -> None:
    spec = _digits(f"data.auto_augment={policy}", "data.ra_num_ops=3", "data.ra_magnitude=5",
                   "data.augmix_severity=2")
    keys = [(3, i) for i in range(24)]
    got, _ = spec.train.__getitems__(keys)
    idx = torch.arange(24)
    seeds = T.sample_seeds(7, 3, idx)
    cropped = T.batch_crop_flip(spec.train.images[idx], 1, False, seeds)  # digits: 1-px shifts
    ref = _torchvision_reference(policy)
    for i in range(24):
        torch.manual_seed(int(seeds[i]))
        assert torch.equal(got[i], ref(cropped[i])), f"{policy}: sample {i}"
    # it augments (colour operations leave some grey digits as they were)
    assert sum(not torch.equal(got[i], cropped[i]) for i in range(24)) >= 8
    assert got.dtype == torch.uint8 and got.shape == (24, 1, 8, 8)


def test_per_sample_path_keeps_batch_independence_and_the_global_rng() -> None:
    spec = _digits("data.auto_augment=ta_wide", "data.random_erase=0.5")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batch, _ = spec.train.__getitems__([(2, i) for i in range(10)])
    assert torch.equal(torch.get_rng_state(), before)  # the trainer's RNG is untouched
    singles = torch.cat([spec.train.__getitems__([(2, i)])[0] for i in range(10)])
    assert torch.equal(batch, singles)  # how samples are batched (ranks, micro) is irrelevant
    other, _ = spec.train.__getitems__([(3, i) for i in range(10)])
    assert not torch.equal(batch, other)


def test_random_erasing_mean_mode_is_torchvisions_with_the_mean_colour() -> None:
    mean, std = (120.4, 60.0, 10.2), (50.0, 40.0, 30.0)
    cfg = recipe_load.load(None, ["data.random_erase=1.0"]).data
    ours = T.erasing(cfg, mean, std)
    ref = v2.RandomErasing(p=1.0, value=[120.0, 60.0, 10.0])
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    for s in range(20):
        torch.manual_seed(s)
        a = ours(image)
        torch.manual_seed(s)
        assert torch.equal(a, ref(image))
        erased = (a != image).any(0)
        assert erased.any() and torch.equal(a[:, erased][:, 0], torch.tensor([120, 60, 10],
                                                                              dtype=torch.uint8))


def test_random_erasing_pixel_mode_is_gaussian_noise_in_pixel_units() -> None:
    mean, std = (120.0, 60.0, 10.0), (50.0, 40.0, 30.0)
    cfg = recipe_load.load(None, ["data.random_erase=1.0", "data.random_erase_mode=pixel"]).data
    ours = T.erasing(cfg, mean, std)
    ref = v2.RandomErasing(p=1.0, value="random")  # N(0, 1) values on a float image
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    for s in range(10):
        torch.manual_seed(s)
        a = ours(image)
        torch.manual_seed(s)
        noise = ref(torch.full((3, 40, 30), float("nan")))  # nan marks what is left alone
        box = ~noise.isnan().all(0)
        want = (torch.tensor(mean)[:, None] + torch.tensor(std)[:, None] * noise[:, box])
        assert torch.equal(a[:, box], want.round().clamp(0, 255).to(torch.uint8))
        assert torch.equal(a[:, ~box], image[:, ~box])


def _write_pngs(root: Path, n: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(24, 40, size=2)
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_folder_pipeline_is_torchvisions_compose_and_eval_has_its_own_size(tmp_path: Path):
    _write_pngs(tmp_path)
    r = recipe_load.load(None, ["data.name=imagefolder", f"data.root={tmp_path}", "model.num_classes=2",
                           "data.image_size=16", "data.eval_image_size=20",
                           "data.eval_resize_size=26", "data.interpolation=bicubic",
                           "data.auto_augment=ta_wide", "data.random_erase=0.5",
                           "data.batch_size=4"])
    data = build_datasets(r.data, 5, 2, 3)
    mean = [float(round(m)) for m in sources.get("imagefolder").normalization(3)[0]]
    ref = v2.Compose([v2.RandomResizedCrop(16, interpolation=BICUBIC, antialias=True),
                      # torchvision's tensor rotations/shears have no bicubic: bilinear there
                      v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=BILINEAR),
                      v2.RandomErasing(p=0.5, value=mean)])
    for i in range(len(data.train)):
        got, label = data.train[(4, i)]
        torch.manual_seed(int(T.sample_seeds(5, 4, torch.tensor([i]))[0]))
        assert torch.equal(got, ref(decode(data.train.samples[i][0], 3))), f"sample {i}"
    val_ref = v2.Compose([v2.Resize(26, interpolation=BICUBIC, antialias=True), v2.CenterCrop(20)])
    x, _ = data.val[0]
    assert torch.equal(x, val_ref(decode(data.val.samples[0][0], 3)))
    assert data.spec.eval_size == 20 and data.spec.image_size == 16
    streams = build(r, 0, plan_batches(r.data.batch_size, None, 1), torch.device("cpu"),
                    pairs=False, workers=0)
    assert next(iter(streams.train))[0].shape == (4, 3, 16, 16)
    assert next(iter(streams.eval))[0].shape[-2:] == (20, 20)


@pytest.mark.parametrize("key", ["image_size", "eval_image_size", "eval_resize_size"])
def test_size_keys_are_refused_for_data_of_its_own_size(key):
    r = recipe_load.load(None, [f"data.{key}=16", "model.in_channels=1"])
    with pytest.raises(RecipeError, match=f"data.{key}=16 does not apply to data.name=digits, "
                                          "whose images are 8x8"):
        build(r, 0, plan_batches(r.data.batch_size, None, 1), torch.device("cpu"), pairs=False,
              workers=0)


def test_synthetic_evaluates_at_the_eval_size():
    cfg = recipe_load.load(None, ["data.name=synthetic", "data.image_size=12",
                             "data.eval_image_size=20", "data.synthetic_size=64"]).data
    spec = build_datasets(cfg, 0, 10, 3)
    assert spec.train.images.shape[-1] == 12 and spec.val.images.shape[-1] == 20


# ------------------------------------------------------------------ repeated augmentation

def _deit_rasampler(n: int, repeats: int, world: int, rank: int, order: list[int]) -> list[int]:
    """DeiT's RASampler.__iter__ (facebookresearch/deit samplers.py), given its epoch order."""
    import math

    num_samples = int(math.ceil(n * repeats / world))
    total = num_samples * world
    selected = int(math.floor(n // 256 * 256 / world))
    indices = [i for i in order for _ in range(repeats)]
    indices += indices[: total - len(indices)]
    return indices[rank:total:world][:selected]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_repeated_sampler_is_deits_rasampler(world: int) -> None:
    n, reps = 1024, 3
    plan = plan_batches(256, None, world)
    for rank in range(world):
        s = TrainSampler(n, plan, rank, seed=0, shuffle=False, repeats=reps)
        s.set_epoch(1)
        ours = [k[1] for k in s]
        assert ours == _deit_rasampler(n, reps, world, rank, list(range(n)))
        assert len(s) == len(ours) == n // world


def test_repeat_copies_get_their_own_keys_and_augmentation() -> None:
    plan = plan_batches(64, None, 1)
    s = TrainSampler(1437, plan, 0, seed=0, repeats=4)
    s.set_epoch(2)
    keys = list(s)
    assert len(keys) == 22 * 64 and len(set(keys)) == len(keys)
    by_index: dict[int, list[int]] = {}
    for _, i, c in keys:
        by_index.setdefault(i, []).append(c)
    assert all(sorted(c) == list(range(len(c))) for c in by_index.values())
    assert len(by_index) == 22 * 64 // 4  # an epoch of 1408 samples: 352 images x 4 copies
    spec = _digits("data.auto_augment=ra")
    first = next(i for i, c in by_index.items() if len(c) == 4)
    copies, _ = spec.train.__getitems__([(2, first, c) for c in range(4)])
    assert len({tuple(x.flatten().tolist()) for x in copies}) == 4  # four different views
    again, _ = spec.train.__getitems__([(2, first, 0)])
    plain, _ = spec.train.__getitems__([(2, first)])
    assert torch.equal(again, plain)  # copy 0 is the image's ordinary key


@pytest.mark.parametrize("pairs", [False, True])
def test_repeated_global_batches_and_resume_are_world_size_invariant(pairs: bool) -> None:
    n, batch = 1000, 64

    def global_batches(world: int, skip: int = 0) -> list[list[tuple]]:
        plan = plan_batches(batch, None, world)
        per_rank = []
        for rank in range(world):
            s = TrainSampler(n, plan, rank, seed=3, repeats=3, pairs=pairs)
            s.set_epoch(1, skip_steps=skip)
            per_rank.append(list(s))
        steps = len(per_rank[0]) // plan.per_rank
        return [sorted(k for r in per_rank for k in r[j * plan.per_rank:(j + 1) * plan.per_rank])
                for j in range(steps)]

    ref = global_batches(1)
    assert len(ref) == n // batch
    for world in (2, 4):
        assert global_batches(world) == ref
        assert global_batches(world, skip=5) == ref[5:]
    # the copies of an image spread over ranks (DeiT): with 4 ranks, >= 2 ranks per image
    plan = plan_batches(batch, None, 4)
    owner: dict[int, set[int]] = {}
    for rank in range(4):
        s = TrainSampler(n, plan, rank, seed=3, repeats=3, pairs=pairs)
        s.set_epoch(1)
        for k in list(s)[: plan.per_rank]:
            owner.setdefault(k[1], set()).add(rank)
    assert np.mean([len(r) for r in owner.values()]) > 1.5


def test_mixing_pairs_are_half_a_batch_apart_never_two_copies() -> None:
    plan = plan_batches(32, 4, 2)
    s = TrainSampler(200, plan, 1, seed=0, repeats=3, pairs=True)
    s.set_epoch(0)
    plain = TrainSampler(200, plan_batches(32, None, 1), 0, seed=0, repeats=3)
    plain.set_epoch(0)
    order = list(plain)[:32]  # the global batch of step 0 in permutation order
    mine = list(s)[: plan.per_rank]
    for j in range(0, len(mine), 2):
        a, b = mine[j], mine[j + 1]
        assert a[1] != b[1]
        assert order.index(b) - order.index(a) == 16
