"""Training from tar shards in real processes (gloo ranks under torchrun, id-coded shards of
7 shards, tests/shards/kit.py; sample ids recorded by tests/shards/probe.py): every sample
once per epoch across 2 ranks with equal steps; a rank SIGKILLed mid-epoch under torchrun
restarts and resumes bit for bit; a run stopped at world 2 resumes at world 3 (and 1) with
every remaining sample of the epoch seen exactly once; evaluation at world 3 counts what
one process counts; shards over loopback HTTP resume bit for bit; shards the `webdataset`
package wrote train."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from ffdist.cli import main as cli
from ffdist.data import sources
from tests import helpers
from tests.fault import kit as fault
from tests.shards import kit
from tests.shards.probe import ProbeShards

pytestmark = pytest.mark.slow
RECIPE = str(helpers.RECIPES / "digits.yaml")
STEPS = sum(kit.TRAIN_COUNTS) // kit.BATCH  # 10 a epoch, 20 in all


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.make_shards(tmp_path_factory.mktemp("trainshards") / "sh")


def probe_cmd(world: int, shards: Path | str, out: Path, *extra: str,
              val: Path | str | None = None, launcher: tuple[str, ...] = ()) -> list[str]:
    """The probe's training command at `world` processes (torchrun for more than one)."""
    args = kit.args(str(shards), str(val or shards), out, *extra, name="shards_probe")
    if world == 1:
        return [sys.executable, "-m", "tests.shards.probe", RECIPE, *args]
    return [str(helpers.BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port",
            str(helpers.free_port()), *launcher, "-m", "tests.shards.probe", RECIPE, *args]


def run(cmd: list[str], probe: Path, timeout: float = 240, **env: str) -> str:
    probe.mkdir(parents=True, exist_ok=True)
    proc = fault.run(cmd, timeout=timeout, FFDIST_PROBE=str(probe), **env)
    assert proc.returncode == 0, fault.explain(proc)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ref2(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The schedule, never stopped, by 2 ranks: (run directory, the probe's records)."""
    root = tmp_path_factory.mktemp("ref2")
    run(probe_cmd(2, shards, root / "run"), root / "probe")
    return root / "run", root / "probe"


def cut_at(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as it was right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    (dst / "model.pt").unlink()
    for ckpt in (dst / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > step:
            ckpt.unlink()
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}.pt\n")


def test_two_ranks_see_every_sample_once_per_epoch_in_equal_steps(ref2):
    recs = kit.records(ref2[1])
    for epoch in (0, 1):
        counts = kit.seen(recs, epoch)
        assert len(counts) == STEPS * kit.BATCH and set(counts.values()) == {1}
        for rank in (0, 1):
            assert sorted(r["step"] for r in recs if r["epoch"] == epoch
                          and r["rank"] == rank) == list(range(STEPS))
    assert kit.seen(recs, 0) != kit.seen(recs, 1)  # another epoch, another remainder left out


# make test-all: exact resume at the same world size is in the fast tier through
# test_shards_over_loopback_http_resume_bit_exact, torchrun's restart of killed ranks through
# tests/fault/test_killed_rank.py
@pytest.mark.extended
def test_a_rank_killed_mid_epoch_restarts_and_resumes_bit_exact(ref2, shards, tmp_path):
    """SIGKILL right after the checkpoint of step 8 (epoch 0, step 8 of 10), on rank 1:
    torchrun restarts both ranks, they resume from step 8 and end as the uninterrupted run."""
    out = tmp_path / "run"
    text = run(probe_cmd(2, shards, out, "launch.pg_timeout=20",
                         launcher=("--max-restarts", "3")), tmp_path / "probe",
               FFDIST_FAULT="kill:step=8:rank=1")
    assert "resumed from step 8 (epoch 0)" in text, text[-3000:]
    assert fault.train_losses(out) == fault.train_losses(ref2[0])
    fault.same_weights(out / "model.pt", ref2[0] / "model.pt")


@pytest.mark.parametrize("world", [
    3,
    # make test-all; the world-3 case covers the path (another world size, mid-epoch)
    pytest.param(1, marks=pytest.mark.extended)])
def test_stopped_at_world_2_resumed_at_another_world_size_sees_the_rest_once(
        ref2, shards, tmp_path, world, monkeypatch, capsys):
    """Cut after step 12 (epoch 1, step 2 of 10): the resumed run's epoch 1 holds exactly the
    samples the uninterrupted run had in its steps 2..9 of epoch 1, each once; and its last
    evaluation, at that world size, counts what one process's `ffdist eval` counts."""
    out = tmp_path / "run"
    cut_at(ref2[0], out, 12)
    text = run(probe_cmd(world, shards, out), tmp_path / "probe")
    assert "resumed from step 12 (epoch 1)" in text
    resumed = kit.records(tmp_path / "probe")
    assert {r["epoch"] for r in resumed} == {1}
    ref = [r for r in kit.records(ref2[1]) if r["epoch"] == 1]
    rest = kit.seen([r for r in ref if r["step"] >= 2], 1)
    assert kit.seen(resumed, 1) == rest  # every remaining sample, each once
    assert not set(rest) & set(kit.seen([r for r in ref if r["step"] < 2], 1))
    assert sorted({r["step"] for r in resumed}) == list(range(2, STEPS))
    last = helpers.events(out, "val")[-1]
    assert last["n"] == sum(kit.VAL_COUNTS) and last["world_size"] == world

    monkeypatch.setitem(sources.REGISTRY, "shards_probe", ProbeShards)
    assert cli(["eval", str(out), "--set", "launch.device=cpu"]) == 0  # one process
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["n"] == last["n"] and report["top1"] == last["top1"]
    capsys.readouterr()


# make test-all only: reading shards over HTTP is in the fast tier through tests/shards/
# test_order.py, a resume of a shard stream through the world-size test above
@pytest.mark.extended
def test_shards_over_loopback_http_resume_bit_exact(ref2, shards, tmp_path):
    """The run of ref2 cut after step 4, resumed with its shards (and their index) served by
    a local http.server: the same losses and weights, bit for bit."""
    out = tmp_path / "run"
    cut_at(ref2[0], out, 4)
    with kit.http_server(shards) as url:
        text = run(probe_cmd(2, f"{url}/{kit.pattern('train')}", out,
                             val=f"{url}/{kit.pattern('val')}"), tmp_path / "probe")
    assert "resumed from step 4 (epoch 0)" in text and "scanned" not in text  # index.json read
    assert fault.train_losses(out) == fault.train_losses(ref2[0])
    fault.same_weights(out / "model.pt", ref2[0] / "model.pt")


# make test-all: reading them is in the fast tier through tests/shards/test_order.py
# (foreign shards, scanned) and tests/shards/test_command.py (--index of ShardWriter's shards)
@pytest.mark.extended
def test_shards_the_webdataset_package_wrote_train(tmp_path):
    import webdataset as wds

    folder = tmp_path / "wds"
    folder.mkdir()
    for split, n in (("train", 150), ("val", 30)):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=64, verbose=0) as w:
            for i in range(n):
                w.write({"__key__": f"{split}{i:05d}", "png": kit.png(i),
                         "cls": str(i % kit.CLASSES)})
    out = tmp_path / "run"
    proc = helpers.run([sys.executable, "-m", "ffdist.train", RECIPE, *kit.args(
        str(folder / "train-{000000..000002}.tar"), str(folder / "val-000000.tar"), out,
        "schedule.max_steps=4")], timeout=180)
    assert "no shard index, so each process scanned the 3 shards once" in proc.stdout
    assert [e["n"] for e in helpers.events(out, "val")] == [30]
    assert sorted(fault.train_losses(out)) == [1, 2, 3, 4]


# make test-all: the order with pairs and repeats is in the fast tier through
# tests/shards/test_order.py (test_pairs_and_repeats_keep_global_batches_at_any_world_size);
# the regularization and ZeRO-2 themselves through tests/workflow/test_regularization.py and
# tests/integration/test_launchers.py (ZeRO-2)
@pytest.mark.extended
def test_mixup_repeats_policies_ema_and_zero2_train_from_shards(shards, tmp_path):
    out = tmp_path / "run"
    proc = fault.run([str(helpers.BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                      str(helpers.free_port()), "-m", "ffdist.train", RECIPE, *kit.args(
                          str(shards), str(shards), out, "schedule.max_steps=4",
                          "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                          "data.repeated_augmentation=2", "data.auto_augment=ta_wide",
                          "data.random_erase=0.25", "optim.ema_decay=0.9",
                          "strategy.name=deepspeed", "strategy.zero_stage=2")], timeout=400)
    assert proc.returncode == 0, fault.explain(proc)
    assert sorted(fault.train_losses(out)) == [1, 2, 3, 4]
    vals = {e["split"]: e["n"] for e in helpers.metrics(out) if e.get("split", "").startswith("val")}
    assert vals == {"val": sum(kit.VAL_COUNTS), "val_ema": sum(kit.VAL_COUNTS)}

