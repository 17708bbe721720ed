"""`ffdist shard`: a generated ImageFolder (12 classes, 2,160 images) written as shards and
an index, read back by the `webdataset` package with the same bytes and labels; images held
in memory (digits) written losslessly as PNG; pre-resizing; `--index` of shards the
webdataset package wrote; and the refusals (a folder in use, an unreadable image), each
one sentence with nothing left behind."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from ffdist.cli import main as cli
from ffdist.data import shard_index
from tests import helpers
from tests.shards import kit

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 170, 10


def write_folder(root: Path, classes: int, train: int, val: int, size: tuple[int, int] = (32, 32)
                 ) -> Path:
    """An ImageFolder of small noisy JPEGs (each file different)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)
    return root


def contents(paths: list[Path], classes: list[str]) -> Counter:
    """(sha1 of the file, label) of every image file."""
    return Counter((hashlib.sha1(p.read_bytes()).hexdigest(), classes.index(p.parent.name))
                   for p in paths)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("if") / "root", CLASSES, TRAIN_PER_CLASS,
                        VAL_PER_CLASS)


def test_an_imagefolder_becomes_shards_that_webdataset_reads_back(imagefolder, tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    proc = helpers.run([sys.executable, "-m", "ffdist.cli", "shard", str(imagefolder), "--out",
                        str(out), "--shard-size", "400KB", "--workers", "2"], timeout=300)
    assert "ffdist shard: 2,160 of 2,160 samples verified (100%)" in proc.stderr  # no TTY: lines
    assert f"wrote and verified {out}" in proc.stdout
    index = json.loads((out / "index.json").read_text())
    classes = [f"class{c:02d}" for c in range(CLASSES)]
    assert index["classes"] == classes and index["options"]["shard_bytes"] == 400_000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [s["name"] for part in index["splits"].values() for s in part["shards"]])
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        part = index["splits"][split]
        assert part["samples"] == CLASSES * per_class and len(part["shards"]) > 1
        urls = [str(out / s["name"]) for s in part["shards"]]
        read = list(wds.WebDataset(urls, shardshuffle=False))
        assert Counter((hashlib.sha1(s["jpg"]).hexdigest(), int(s["cls"])) for s in read) == \
            contents(sorted((imagefolder / split).rglob("*.jpg")), classes)
        per_shard = Counter(s["__url__"] for s in read)
        assert [per_shard[u] for u in urls] == [s["samples"] for s in part["shards"]]
        assert all(s["bytes"] == Path(u).stat().st_size for s, u in zip(part["shards"], urls))
    # write-time shuffle: a train shard holds many classes, not one
    first = list(wds.WebDataset([str(out / "train-000000.tar")], shardshuffle=False))
    assert len({int(s["cls"]) for s in first}) >= CLASSES // 2


def test_in_memory_images_are_written_losslessly_as_png(tmp_path):
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from ffdist.data import digits

    out = tmp_path / "digits"
    assert cli(["shard", str(helpers.RECIPES / "digits.yaml"), "--out", str(out), "--shard-samples",
                  "500", "--workers", "1"]) == 0
    pixels, target = digits.load()
    train, _ = digits.split(target, 0.2)
    want = Counter((pixels[i].tobytes(), int(target[i])) for i in train)
    names = [s["name"] for s in json.loads((out / "index.json").read_text())["splits"]["train"][
        "shards"]]
    got = Counter((np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes(), int(s["cls"]))
                  for s in wds.WebDataset([str(out / n) for n in names], shardshuffle=False))
    assert got == want and [len(names)] == [3]  # 1,437 images: 500 + 500 + 437


def test_pre_resizing_caps_the_longest_side_and_re_encodes_as_jpeg(tmp_path, capsys):
    from PIL import Image

    root = write_folder(tmp_path / "big", 2, 6, 2, size=(40, 30))
    plain, small = tmp_path / "plain", tmp_path / "small"
    assert cli(["shard", str(root), "--out", str(plain), "--workers", "1"]) == 0
    assert cli(["shard", str(root), "--out", str(small), "--max-size", "20", "--quality", "80",
                  "--workers", "1"]) == 0
    found = shard_index.load(str(small), "train")
    data_bytes = [shard_index.load(str(d), "train").shards[0].starts()[-1] for d in (plain, small)]
    assert data_bytes[1] < data_bytes[0] * 0.8  # 1,536 bytes of tar headers per sample stay
    from ffdist.data.shard_reader import SampleReader

    reader = SampleReader(found)
    for i in range(found.total):
        image = Image.open(io.BytesIO(reader.read(i)[1].fields["jpg"]))
        assert image.format == "JPEG" and image.size == (20, 15)
    capsys.readouterr()


def test_index_of_shards_the_webdataset_package_wrote(tmp_path):
    import webdataset as wds

    folder = tmp_path / "wds"
    folder.mkdir()
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=40, verbose=0) as w:
        for i in range(100):
            w.write({"__key__": f"k{i:04d}", "png": kit.png(i), "cls": str(i % kit.CLASSES)})
    out = tmp_path / "index.json"
    pattern = str(folder / "train-{000000..000002}.tar")
    assert cli(["shard", "--index", f"train={pattern}", "--out", str(out)]) == 0
    found = shard_index.load(pattern, "train", str(out))
    assert found.origin == str(out) and [s.samples for s in found.shards] == [40, 40, 20]
    from ffdist.data.shard_reader import SampleReader

    reader = SampleReader(found)
    assert [reader.read(i)[1].key for i in (0, 45, 99)] == ["k0000", "k0045", "k0099"]


def test_a_folder_in_use_is_refused_untouched(imagefolder, tmp_path, capfd):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = helpers.refused(helpers.in_process(capfd, cli, "shard", str(imagefolder), "--out", str(out)),
                           out)
    assert f"--out {out} already holds files; give a new or empty folder" in line


def test_an_unreadable_image_stops_or_is_skipped_with_a_count(tmp_path, capfd):
    root = write_folder(tmp_path / "src", 2, 5, 2)
    (root / "train" / "class01" / "img0002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    # a writer may finish its shard before another meets the bad image: progress lines may come
    line = helpers.refused(helpers.in_process(capfd, cli, "shard", str(root), "--out", str(out),
                                              "--workers", "2"), out, tmp_path,
                           progress="ffdist shard: ")
    assert "img0002.jpg cannot be read as an image (" in line and "--skip-bad" in line
    assert cli(["shard", str(root), "--out", str(out), "--skip-bad", "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"train": 1, "val": 0} and index["splits"]["train"]["samples"] == 9
    captured = capfd.readouterr()
    assert "skipped unreadable image" in captured.err and "1 unreadable images skipped" in \
        captured.out


def test_a_file_list_is_written_through_its_recipe_keys(tmp_path):
    root = write_folder(tmp_path / "imgs", 3, 4, 2)
    for split in ("train", "val"):
        files = sorted((root / split).rglob("*.jpg"))
        (tmp_path / f"{split}.txt").write_text("".join(
            f"{p.relative_to(root)} {int(p.parent.name[-2:])}\n" for p in files))
    out = tmp_path / "shards"
    assert cli(["shard", str(root), "data.name=filelist", f"data.train_list={tmp_path / 'train.txt'}",
                f"data.val_list={tmp_path / 'val.txt'}", "model.num_classes=3", "--out", str(out),
                "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["source"].startswith("data.name=filelist")
    assert [index["splits"][s]["samples"] for s in ("train", "val")] == [12, 6]
    assert index["classes"] == ["0", "1", "2"]
