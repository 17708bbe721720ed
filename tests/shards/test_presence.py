"""Absent shards are one sentence before training (data.name=shards' torch-free presence
check): an unset key, a folder without an index, a missing shard, a shard truncated since it
was indexed, a foreign shard that does not end as a tar ends, an unreachable URL; and under
`ffdist train` that sentence is all it prints, exit 2, with no run directory left behind. A
`pipe:` shard runs a program only where the environment allows it, never on a recipe's
word."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ffdist.data import tars
from ffdist.data.presence import DataMissing, check_present
from ffdist.errors import RecipeError
from ffdist.recipe import DataConfig
from tests import helpers
from tests.shards import kit


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.make_shards(tmp_path_factory.mktemp("present") / "sh")


def sentence(**data: str) -> str:
    with pytest.raises(DataMissing) as e:
        check_present(DataConfig(name="shards", **data), "r.yaml")
    text = str(e.value)
    assert text.startswith("r.yaml: ") and "\n" not in text
    assert text.endswith("or smoke-test the recipe without it: data.name=synthetic.")
    return text


def test_complete_shards_pass(shards):
    check_present(DataConfig(name="shards", train_shards=str(shards)))
    check_present(DataConfig(name="shards", train_shards=str(shards / kit.pattern("train")),
                             val_shards=str(shards / kit.pattern("val"))))


def test_unset_keys_and_a_folder_without_an_index(shards, tmp_path):
    assert "data.name=shards needs data.train_shards: a folder written by `ffdist shard`" in \
        sentence()
    assert "needs data.val_shards (it defaults to the val split of a data.train_shards " \
           "folder)" in sentence(train_shards=str(shards / kit.pattern("train")))
    (tmp_path / "empty").mkdir()
    assert f"data.train_shards={tmp_path / 'empty'} has no index.json" in \
        sentence(train_shards=str(tmp_path / "empty"))
    assert "does not exist" in sentence(train_shards=str(tmp_path / "nowhere"))


def test_a_missing_or_truncated_shard(shards, tmp_path):
    import shutil

    copy = shutil.copytree(shards, tmp_path / "copy")
    (copy / "train-000005.tar").unlink()
    assert f"data.train_shards: shard {copy / 'train-000005.tar'} does not exist (1 of 7 shards " \
           "missing)" in sentence(train_shards=str(copy))
    shutil.copy(shards / "train-000005.tar", copy)
    size = (copy / "val-000001.tar").stat().st_size
    with open(copy / "val-000001.tar", "r+b") as f:
        f.truncate(size - 5000)
    assert f"data.val_shards: shard {copy / 'val-000001.tar'} is {size - 5000:,} bytes but its " \
           f"index says {size:,}: truncated" in sentence(train_shards=str(copy))
    (copy / "index.json").unlink()  # foreign shards: no index to compare with
    assert "does not end as a tar file ends (two zero blocks)" in sentence(
        train_shards=str(copy / kit.pattern("train")), val_shards=str(copy / kit.pattern("val")))


def test_an_unreachable_url_is_one_sentence_within_the_timeout(shards):
    port = helpers.free_port()  # nothing listens there
    text = sentence(train_shards=f"http://127.0.0.1:{port}/{kit.pattern('train')}",
                    val_shards=str(shards / kit.pattern("val")))
    assert f"data.train_shards: shard index http://127.0.0.1:{port}/index.json cannot be " \
           "reached (Connection refused, 10 s timeout)" in text
    with kit.http_server(shards) as url:  # served, but one shard is not there
        text = sentence(train_shards=f"{url}/train-{{000000..000007}}.tar",
                        val_shards=f"{url}/{kit.pattern('val')}")
    assert "index.json does not list" not in text and "train-000007.tar" in text


def test_ffdist_train_prints_the_sentence_alone_and_writes_nothing(shards, tmp_path):
    out = tmp_path / "run"
    line = helpers.refused([sys.executable, "-m", "ffdist.train", str(helpers.RECIPES /
                            "digits.yaml"), *kit.args(str(shards / "train-{000000..000009}.tar"),
                                                      str(shards), out)], out)
    assert "data.train_shards: shard" in line and "(3 of 10 shards missing)" in line


def test_a_pipe_command_runs_only_where_the_environment_allows_it(shards, tmp_path,
                                                                   monkeypatch):
    marker = tmp_path / "ran"
    cfg = DataConfig(name="shards", train_shards=f"pipe:touch {marker}",
                     val_shards=str(shards / kit.pattern("val")))
    monkeypatch.delenv(tars.ALLOW_PIPE, raising=False)
    with pytest.raises(RecipeError, match=r"data\.train_shards: pipe: shards run a program "
                                          r"\(touch\), and a recipe alone never makes ffdist run "
                                          r"one; set FFDIST_ALLOW_PIPE=1"):
        check_present(cfg)
    with pytest.raises(tars.Unreadable, match="FFDIST_ALLOW_PIPE=1"):
        tars.open_shard(cfg.train_shards)  # the reader refuses too, whoever asks it
    assert not marker.exists()
    monkeypatch.setenv(tars.ALLOW_PIPE, "1")
    check_present(cfg)  # allowed now; the presence check still runs nothing
    assert not marker.exists()
    stream = tars.open_shard(f"pipe:cat {shards / 'val-000000.tar'}")  # argv, no shell
    assert stream.read(512)[:12] == b"s000000.png\0"[:12]
    stream.close()

