"""ffdist.data in one process: eval shards disjoint and complete for any world size, the
same global batches for any world size and micro-batch, resume by whole steps, the batch
arithmetic and its errors, the digits split, augmentation seeded by sample and epoch only,
folder and file-list datasets and their errors, and a dataset and model that must agree."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ffdist import recipe_load
from ffdist.data import build, sources
from ffdist.data.mapstyle import ShardSampler, TrainSampler
from ffdist.errors import DataError, RecipeError
from ffdist.resolved import plan_batches


def build_datasets(cfg, seed: int, num_classes: int, channels: int):
    """The train/val datasets and spec of a map-style source."""
    return sources.get(cfg.name).datasets(cfg, seed, num_classes, channels)


def streams(r, batch: int | None = None):
    """One process's streams of recipe r (no mixing pairs)."""
    plan = plan_batches(batch or r.data.batch_size, None, 1)
    return build(r, 0, plan, torch.device("cpu"), pairs=False, workers=0)


@pytest.mark.parametrize("n,world", [(360, 2), (361, 2), (7, 3), (5, 8), (1, 1)])
def test_eval_shards_are_disjoint_and_cover_exactly_once(n: int, world: int) -> None:
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # no duplicates, nothing missing
    assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


@pytest.mark.parametrize("world,micro", [(1, None), (2, None), (4, None), (2, 8), (4, 4)])
def test_global_batches_are_the_same_for_any_world_size(world: int, micro: int | None) -> None:
    n, batch = 1000, 64
    reference = _global_batches(n, plan_batches(batch, None, 1), world=1)
    got = _global_batches(n, plan_batches(batch, micro, world), world)
    assert got == reference
    assert len(reference) == n // batch


def _global_batches(n: int, plan, world: int) -> list[list[int]]:
    """Sets of sample indices per optimizer step, over all ranks and micro-steps."""
    per_rank = []
    for rank in range(world):
        s = TrainSampler(n, plan, rank, seed=3)
        s.set_epoch(2)
        keys = list(s)
        assert all(k[0] == 2 for k in keys)  # keys carry the epoch for augmentation seeds
        per_rank.append([k[1] for k in keys])
    steps = len(per_rank[0]) // plan.per_rank
    return [sorted(i for r in per_rank for i in r[k * plan.per_rank:(k + 1) * plan.per_rank])
            for k in range(steps)]


def test_epochs_differ_and_resume_skips_whole_steps() -> None:
    plan = plan_batches(32, None, 2)
    s = TrainSampler(200, plan, 1, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [k[1] for k in e0] != [k[1] for k in e1]
    s.set_epoch(1, skip_steps=2)
    assert list(s) == e1[2 * plan.per_rank:]
    assert len(s) == len(e1) - 2 * plan.per_rank


def test_batch_arithmetic_and_its_errors() -> None:
    p = plan_batches(256, 32, 4)
    assert (p.per_rank, p.micro, p.accum) == (64, 32, 2)
    assert plan_batches(64, 1000, 2).accum == 1
    with pytest.raises(RecipeError, match="multiple of 2"):
        plan_batches(63, None, 2)
    with pytest.raises(RecipeError, match="micro_batch_size=24"):
        plan_batches(64, 24, 1)


def test_digits_split_is_stratified_and_deterministic() -> None:
    cfg = recipe_load.load(None).data
    a = build_datasets(cfg, 0, 10, 1)
    b = build_datasets(cfg, 5, 10, 1)
    assert torch.equal(a.val.labels, b.val.labels)  # split does not depend on the seed
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == 360
    counts = np.bincount(a.val.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    x, y = a.train.__getitems__([(0, 0), (0, 1)])
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 8, 8) and y.dtype == torch.long


def test_augmentation_depends_on_sample_and_epoch_only() -> None:
    spec = build_datasets(recipe_load.load(None).data, 0, 10, 1)
    one, _ = spec.train.__getitems__([(4, i) for i in range(8)])
    again = torch.cat([spec.train.__getitems__([(4, i)])[0] for i in range(8)])
    other_epoch, _ = spec.train.__getitems__([(5, i) for i in range(8)])
    assert torch.equal(one, again)  # batched == per sample: rank/batch split is irrelevant
    assert not torch.equal(one, other_epoch)


def _write_pngs(root: Path, classes: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_decodes_to_uint8_at_the_recipe_size(tmp_path: Path) -> None:
    _write_pngs(tmp_path, {"ants": 3, "bees": 2})
    r = recipe_load.load(None, ["data.name=imagefolder", f"data.root={tmp_path}",
                           "data.image_size=16", "model.num_classes=2", "data.batch_size=2"])
    s = streams(r)
    assert s.spec.classes == ["ants", "bees"]
    x, y = next(iter(s.train))
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 16, 16)
    assert sum(len(y) for _, y in s.eval) == 5


def test_empty_class_folder_is_a_clear_error(tmp_path: Path) -> None:
    _write_pngs(tmp_path, {"a": 1, "b": 1})
    for f in (tmp_path / "train" / "b").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="class folder .*b holds no"):
        build_datasets(recipe_load.load(None, ["data.name=imagefolder", f"data.root={tmp_path}",
                                          "model.num_classes=2"]).data, 0, 2, 3)


def test_filelist_with_separator_and_label_range(tmp_path: Path) -> None:
    _write_pngs(tmp_path, {"a": 2, "b": 2})
    lines = [f"train/a/{i}.png;0" for i in range(2)] + [f"train/b/{i}.png;1" for i in range(2)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "val.txt").write_text("val/a/0.png;0\nval/b/0.png;7\n")
    cfg = recipe_load.load(None, ["data.name=filelist", f"data.root={tmp_path}", "data.list_sep=;",
                             f"data.train_list={tmp_path / 'train.txt'}",
                             f"data.val_list={tmp_path / 'val.txt'}", "model.num_classes=2"]).data
    with pytest.raises(DataError, match="label 7 is out of range for 2 classes"):
        build_datasets(cfg, 0, 2, 3)


def test_dataset_and_model_must_agree() -> None:
    with pytest.raises(DataError, match="model.num_classes=5.*10 classes"):
        streams(recipe_load.load(None, ["model.num_classes=5", "model.in_channels=1"]))
    with pytest.raises(DataError, match="model.in_channels=3"):
        streams(recipe_load.load(None, ["model.in_channels=3"]))
    with pytest.raises(DataError, match="did you mean 'digits'"):
        streams(recipe_load.load(None, ["data.name=digit"]))


def test_missing_torchvision_files_without_download(tmp_path: Path) -> None:
    cfg = recipe_load.load(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError, match="data.download=true"):
        build_datasets(cfg, 0, 10, 3)


def test_every_registered_source_is_asked_without_importing_torch() -> None:
    """The presence check and the image size come from the source before torch is imported
    (ffdist train reports absent data as fast as a recipe mistake; ffdist plan sizes data
    that is not on this machine)."""
    import subprocess
    import sys

    from tests import helpers

    code = ("import sys; from ffdist import recipe_load; from ffdist.data import sources; "
            "from ffdist.data.presence import check_present\n"
            "for n in sources.names():\n"
            "    cfg = recipe_load.load(None, [f'data.name={n}', 'data.download=true']).data\n"
            "    s = sources.get(n); s.normalization(3)\n"
            "    print(n, s.train_size(cfg), s.eval_size(cfg), s.folder_like)\n"
            "check_present(recipe_load.load(None).data)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=helpers.env(),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "False"
    sizes = {line.split()[0]: line.split()[1:] for line in out[:-1]}
    assert sizes["digits"] == ["8", "8", "False"] and sizes["cifar10"] == ["32", "32", "False"]
    assert sizes["imagefolder"] == ["224", "224", "True"] and sizes["synthetic"][0] == "32"


def test_an_unknown_source_is_one_sentence_with_the_closest_name() -> None:
    from ffdist.data.presence import check_present

    with pytest.raises(DataError, match=r"data.name='digit' is not a dataset; did you mean "
                                        r"'digits'\?"):
        check_present(recipe_load.load(None, ["data.name=digit"]).data)


def test_map_stream_state_is_its_size_and_changed_data_is_said(caplog) -> None:
    s = streams(recipe_load.load(None, ["model.in_channels=1"]))
    assert s.train.state_dict() == {"samples": 1437}
    s.train.load_state_dict({"samples": 1437})
    assert not caplog.records
    s.train.load_state_dict({"samples": 1500})
    assert "trained on 1500 images, the training data now holds 1437" in caplog.text
