"""The tar-shard streams in this process (ffdist.data.shard_streams over shards whose images
carry their ids): each epoch's samples exactly once across ranks and loader workers, the
same global batches at any world size and worker count, equal steps per rank, a resumed
epoch that opens only the shards it still needs, exact eval shards, shards over loopback
HTTP, foreign shards (no index, .json labels), and lost shards mid-run (counted skip, or one
sentence)."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from ffdist import recipe_load
from ffdist.data import build, shard_index, tars
from ffdist.data.shard_streams import ShardOrder
from ffdist.errors import DataError
from ffdist.resolved import plan_batches
from tests.helpers import RECIPES
from tests.shards import kit

STEPS = sum(kit.TRAIN_COUNTS) // kit.BATCH  # 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.make_shards(tmp_path_factory.mktemp("idshards"))


def streams(folder: Path | str, world: int, rank: int, *extra: str, pairs: bool = False,
            val: str | None = None):
    r = recipe_load.load(RECIPES / "digits.yaml", kit.args(
        str(folder), val or str(folder), Path("unused"), "data.augment=true", *extra))
    # the workers as the recipe gives them (a run resolves them: ffdist.assemble.resolve)
    return build(r, rank, plan_batches(kit.BATCH, None, world), torch.device("cpu"), pairs=pairs,
                 workers=r.data.num_workers)


def epoch_steps(folder: Path | str, world: int, workers: int, epoch: int = 1, skip: int = 0,
                *extra: str) -> tuple[dict[int, list[int]], list[int]]:
    """step -> ids of the global batch (every rank's share), and each rank's batch count."""
    steps: dict[int, list[int]] = {}
    counts = []
    for rank in range(world):
        s = streams(folder, world, rank, f"data.num_workers={workers}", *extra)
        s.train.set_epoch(epoch, skip)
        batches = list(s.train)
        counts.append(len(batches))
        accum = s.train.plan.accum
        for n, (x, y) in enumerate(batches):
            ids = kit.ids_of(x)
            assert y.tolist() == [i % kit.CLASSES for i in ids]  # each image with its label
            steps.setdefault(skip + n // accum, []).extend(ids)
    return steps, counts


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sample_once_per_epoch_same_batches_at_any_world_and_worker_count(shards, world):
    reference, _ = epoch_steps(shards, 1, 0)
    for workers in (0, 1, 2):
        steps, counts = epoch_steps(shards, world, workers)
        # no rank waits on another: the same number of micro-batches everywhere
        assert counts == [STEPS] * world
        every = Counter(i for ids in steps.values() for i in ids)
        assert max(every.values()) == 1 and len(every) == STEPS * kit.BATCH
        assert set(every) <= set(range(sum(kit.TRAIN_COUNTS)))
        # global step k holds the same samples whatever the world size and workers
        assert {k: sorted(v) for k, v in steps.items()} == \
            {k: sorted(v) for k, v in reference.items()}, (world, workers)


def test_persistent_workers_follow_set_epoch(shards):
    """The loader workers outlive an iteration (data.persistent_workers): each new epoch and
    resume step reaches them, through the stream's shared position."""
    s = streams(shards, 2, 1, "data.num_workers=2", "data.persistent_workers=true")
    got = []
    for epoch, skip in ((0, 0), (1, 3), (1, 3), (2, 9)):
        s.train.set_epoch(epoch, skip)
        got.append([kit.ids_of(x) for x, _ in s.train])
    fresh = []
    for epoch, skip in ((0, 0), (1, 3), (2, 9)):
        f = streams(shards, 2, 1)
        f.train.set_epoch(epoch, skip)
        fresh.append([kit.ids_of(x) for x, _ in f.train])
    assert got == [fresh[0], fresh[1], fresh[1], fresh[2]]
    assert [len(b) for b in got] == [STEPS, STEPS - 3, STEPS - 3, 1]


def test_the_order_depends_on_seed_and_epoch_only(shards):
    a, _ = epoch_steps(shards, 1, 0, epoch=0)
    b, _ = epoch_steps(shards, 1, 0, epoch=1)
    assert a != b and a == epoch_steps(shards, 1, 0, epoch=0)[0]
    assert epoch_steps(shards, 1, 0, 0, 0, "seed=5")[0] != a
    # the left-out remainder (250 mod 24 = 10 samples) is a different set each epoch
    left = [set(range(250)) - {i for v in s.values() for i in v} for s in (a, b)]
    assert len(left[0]) == len(left[1]) == 10 and left[0] != left[1]


def test_pairs_and_repeats_keep_global_batches_at_any_world_size(shards):
    """Mixup pairs and repeated augmentation are TrainSampler's arithmetic over the shard
    order: the keys of each global step do not depend on the world size."""
    found = shard_index.load(str(shards), "train")

    def keys(world: int) -> list[Counter]:
        per_step: list[Counter] = [Counter() for _ in range(STEPS)]
        for rank in range(world):
            order = ShardOrder(found, 40, plan_batches(kit.BATCH, None, world), rank, 0,
                               repeats=2, pairs=True)
            order.set_epoch(3)
            mine = list(order)
            per = kit.BATCH // world
            for n, key in enumerate(mine):
                per_step[n // per][key] += 1
        return per_step

    assert keys(1) == keys(2) == keys(3)


def test_a_resumed_epoch_opens_only_the_shards_it_still_needs(shards, monkeypatch):
    """Streamed shards (a `pipe:` command here): resumed at step 7 of 10, only the shards that
    hold a sample of steps 7-9 are read, each once, and those samples come exactly once."""
    monkeypatch.setenv(tars.ALLOW_PIPE, "1")  # this test's own command: cat
    opened: list[str] = []
    real = tars.open_shard
    monkeypatch.setattr(tars, "open_shard", lambda url, *a: opened.append(url) or real(url, *a))
    cat = f"pipe:cat {shards}/{kit.pattern('train')}"
    extra = (f"data.shard_index={shards}/index.json", "data.shuffle_buffer=0")
    steps, _ = epoch_steps(cat, 1, 0, 2, 7, *extra)
    assert sorted(steps) == [7, 8, 9]
    found = shard_index.load(cat, "train", f"{shards}/index.json")
    order = ShardOrder(found, 0, plan_batches(kit.BATCH, None, 1), 0, 0)
    order.set_epoch(2)
    rest = order.permutation()[7 * kit.BATCH:STEPS * kit.BATCH].tolist()
    assert sorted(i for v in steps.values() for i in v) == sorted(rest)
    needed = {found.shards[found.locate(i)[0]].url for i in rest}
    assert sorted(opened) == sorted(needed) and len(needed) < len(kit.TRAIN_COUNTS)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_are_disjoint_and_complete(shards, world):
    seen: Counter = Counter()
    for rank in range(world):
        s = streams(shards, world, rank, "data.num_workers=2")
        batches = list(s.eval)
        assert len(batches) == len(s.eval)
        seen.update(i for x, _ in batches for i in kit.ids_of(x))
    assert seen == Counter(range(sum(kit.VAL_COUNTS)))


def test_shards_over_loopback_http_give_the_local_batches(shards):
    local, _ = epoch_steps(shards, 2, 0)
    with kit.http_server(shards) as url:
        remote, counts = epoch_steps(f"{url}/{kit.pattern('train')}", 2, 1, 1, 0,
                                     f"data.val_shards={url}/{kit.pattern('val')}")
        s = streams(f"{url}/{kit.pattern('train')}", 1, 0, val=f"{url}/{kit.pattern('val')}")
        assert sorted(i for x, _ in s.eval for i in kit.ids_of(x)) == list(range(61))
    assert remote == local and counts == [STEPS, STEPS]


def test_foreign_shards_are_scanned_and_read_labels_from_json(tmp_path, caplog):
    folder = kit.make_shards(tmp_path / "wds", indexed=False, label_field="json")
    train, val = (str(folder / kit.pattern(s)) for s in ("train", "val"))
    with caplog.at_level(logging.INFO, logger="ffdist"):
        steps, _ = epoch_steps(train, 1, 0, 0, 0, f"data.val_shards={val}", "data.label_key=label")
    assert "no shard index, so each process scanned the 7 shards once" in caplog.text
    assert sum(len(v) for v in steps.values()) == STEPS * kit.BATCH  # labels checked inside
    with pytest.raises(DataError, match=r"no integer label: no \.cls member \(set "
                                        r"data\.label_key"):
        epoch_steps(train, 1, 0, 0, 0, f"data.val_shards={val}", "data.bad_images=error")


@pytest.mark.parametrize("served", [False, True], ids=["local", "http"])
def test_a_shard_lost_mid_run_is_a_counted_skip_or_one_sentence(shards, tmp_path, caplog,
                                                                 served):
    copy = shutil.copytree(shards, tmp_path / "copy")
    with kit.http_server(copy) as url:
        where = f"{url}/{kit.pattern('train')}" if served else str(copy)
        s = streams(where, 1, 0, "data.bad_images=skip", "data.max_bad_fraction=0.5")
        (copy / "train-000003.tar").rename(copy / "gone.tar")  # after the presence check
        s.train.set_epoch(0)
        with caplog.at_level(logging.WARNING):
            got = [i for x, _ in s.train for i in kit.ids_of(x)]
        lost = set(range(sum(kit.TRAIN_COUNTS[:3]), sum(kit.TRAIN_COUNTS[:4])))
        used = set(s.train.order.permutation()[:STEPS * kit.BATCH].tolist())
        assert sorted(got) == sorted(used - lost)
        assert "skipping unreadable train image" in caplog.text and "train-000003.tar" in \
            caplog.text
        s = streams(where, 1, 0, "data.bad_images=error")
        s.train.set_epoch(0)
        why = "HTTP 404 File not found" if served else "No such file or directory"
        with pytest.raises(DataError, match=rf"data\.train_shards: .*train-000003\.tar \(sample "
                                            rf"\d+\) cannot be read: {why}; fix"):
            list(s.train)


def test_offset_reads_handle_long_names_and_notice_a_rewritten_shard(tmp_path):
    """A key longer than a ustar header holds (a pax header) reads through tarfile; a shard
    rewritten after it was indexed is unreadable at the indexed offsets, not misread."""
    import io
    import tarfile

    from ffdist.data.shard_reader import SampleReader

    path = tmp_path / "long.tar"
    keys = ["short", "x" * 150, "n01440764/n01440764_10026"]
    with tarfile.open(path, "w") as tar:
        for k, key in enumerate(keys):
            for field, data in (("jpg", kit.png(k)), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    found = shard_index.ShardSet("train", [shard_index.scan_shard(str(path))])
    reader = SampleReader(found)
    got = [reader.read(i)[1] for i in range(3)]
    assert [s.key for s in got] == keys and [s.fields["cls"] for s in got] == [b"0", b"1", b"2"]
    assert got[1].fields["jpg"] == kit.png(1)
    data = path.read_bytes()
    path.write_bytes(data[:100] + data[612:])  # everything moved by 512 bytes
    with pytest.raises(tars.Unreadable, match="the shard changed since it was indexed"):
        SampleReader(found).read(2)


def test_shard_loaders_take_the_workers_the_run_resolved(shards):
    """data.num_workers=auto (or a number above the cores) reaches the shard loaders as the
    number assemble.resolve decided, never as the recipe's text."""
    from ffdist import assemble

    r = recipe_load.load(RECIPES / "digits.yaml", kit.args(
        str(shards), str(shards), Path("unused"), "data.num_workers=auto"))
    resolved = assemble.resolve(r, 1, torch.device("cpu"))
    s = assemble.build_data(r, resolved, 0)
    assert s.train.loader.num_workers == resolved.workers
    assert s.eval.loader.num_workers == resolved.workers
    assert len(next(iter(s.train))[1]) == kit.BATCH
