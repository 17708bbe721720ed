"""The rules that decide how a run uses the machine and the recipe's `auto` values, as pure
functions: the cores a process may use (cgroup quotas), launch.threads / data.num_workers
(ffdist.threads.decide), the lr scaled from a reference batch, warm-up in steps, the
one-folder split of imagefolder, the not-learning watch, and several refusals in one
message. The real processes that use them: tests/workflow/test_threads.py,
test_my_images.py, test_not_learning.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ffdist import not_learning, recipe_load, threads
from ffdist.data.sources.folders import split_folder
from ffdist.errors import DataError, Problems, RecipeError, Refusals
from ffdist.optim import lr_at
from ffdist.resolved import scaled_lr

TWO = threads.Cores(2, "2 cores")
SIXTEEN = threads.Cores(16, "16 cores")


def decide(threads_: int | str = "auto", workers: int | str = 0, **kw) -> threads.Share:
    args = {"cpu": True, "local_world": 1, "pixels": 4096, "in_memory": True, "cores": TWO,
            "omp": None, **kw}
    return threads.decide(threads_, workers, **args)


def test_auto_threads_follow_the_cores_the_ranks_and_the_work():
    assert decide().threads == 1  # digits: 64 images of 8x8, too little work to split
    assert decide().why == "1 thread (auto: 2 cores, 1 rank; 4,096 pixels per micro-batch " \
                           "keep 1 busy)"
    big = 256 * 32 * 32  # CIFAR's micro-batch of 256: work for 4 threads
    assert decide(pixels=big).threads == 2
    assert decide(pixels=big).why == "2 threads (auto: 2 cores, 1 rank)"
    assert decide(pixels=big, cores=SIXTEEN).threads == 4
    assert decide(pixels=big, cores=SIXTEEN, local_world=8).threads == 2
    assert decide(pixels=big, local_world=2).why == "1 thread (auto: 2 cores, 2 ranks)"
    # loader workers take their cores from the budget
    share = decide(pixels=10**8, cores=SIXTEEN, workers=6, in_memory=False)
    assert (share.threads, share.workers) == (10, 6)
    # on a GPU the CPU feeds the device: every core of the rank but the workers'
    assert decide(cpu=False, cores=SIXTEEN, local_world=2).threads == 8


def test_explicit_counts_win_and_omp_is_respected_under_auto():
    assert decide(omp=3).why == "3 threads (OMP_NUM_THREADS=3)"
    assert decide(5, omp=3).why == "5 threads (launch.threads)"  # the recipe's number wins
    assert decide(1, pixels=10**8).threads == 1


def test_workers_auto_and_the_cap_at_the_cores():
    assert decide(workers="auto").workers == 0  # in memory: workers would only copy
    assert decide(workers="auto", in_memory=False).workers == 1  # 2 cores: one for training
    assert decide(workers="auto", in_memory=False, cores=threads.Cores(64, "64")).workers == 8
    capped = decide(workers=8, in_memory=False)
    assert capped.workers == 2 and capped.workers_note == (
        "data.num_workers=8 is more than the cores this rank may use (2 cores, 1 rank): "
        "2 loader workers per rank instead")
    assert decide(workers=2, in_memory=False).workers_note is None


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "150000 100000"}, 1.5),
    ({"cpu.max": "max 100000"}, None),
    ({"sub/cpu.max": "400000 100000", "cpu.max": "200000 100000"}, 2.0),  # a parent's is lower
])
def test_cgroup_v2_quota(tmp_path: Path, files: dict[str, str], quota: float | None):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    (tmp_path / "self").write_text("0::/sub\n")
    assert threads.cgroup_quota(tmp_path, tmp_path / "self") == quota


def test_cgroup_v1_quota(tmp_path: Path):
    folder = tmp_path / "cpu,cpuacct" / "job"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "self").write_text("4:memory:/job\n3:cpu,cpuacct:/job\n")
    assert threads.cgroup_quota(tmp_path, tmp_path / "self") == 3.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(tmp_path, tmp_path / "self") is None


def test_lr_scaling_rules():
    assert scaled_lr(0.1, None, 64, "sgd") == (0.1, "")
    assert scaled_lr(0.1, 256, 256, "sgd") == (0.1, "")
    lr, why = scaled_lr(0.1, 256, 1024, "sgd")  # Goyal et al.: linear
    assert math.isclose(lr, 0.4) and why == "optim.lr 0.1 x 1024/256 (linear)"
    lr, why = scaled_lr(0.002, 256, 64, "adamw")  # Adam family: square root
    assert math.isclose(lr, 0.001) and "sqrt(64/256)" in why


def test_warmup_in_steps_and_its_exclusion_with_epochs():
    sched = recipe_load.load(None, ["schedule.warmup_steps=10", "schedule.scheduler=constant"]
                             ).schedule
    assert lr_at(0, 1.0, sched, steps_per_epoch=3) == pytest.approx(0.1)
    assert lr_at(5, 1.0, sched, steps_per_epoch=3) == pytest.approx(0.55)
    assert lr_at(10, 1.0, sched, steps_per_epoch=3) == 1.0
    with pytest.raises(RecipeError, match="schedule.warmup_epochs=1.0 is set too; give the "
                                          "warmup in steps or in epochs"):
        recipe_load.load(None, ["schedule.warmup_steps=10", "schedule.warmup_epochs=1"])


def test_one_folder_split_is_per_class_and_the_same_every_time():
    samples = [(f"/d/{c}/{i:03d}.png", label) for label, c in enumerate("abc") for i in range(10)]
    train, val = split_folder(samples, 0.2)
    assert len(val) == 6 and len(train) == 24
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    assert split_folder(list(reversed(samples)), 0.2) == (train, val)
    assert not {p for p, _ in train} & {p for p, _ in val}
    # a class of one image trains; two images: one of each
    assert split_folder([("/d/a/x.png", 0)], 0.2) == ([("/d/a/x.png", 0)], [])
    assert len(split_folder([("/d/a/x.png", 0), ("/d/a/y.png", 0)], 0.2)[1]) == 1


def test_the_watch_speaks_once_and_stops_when_asked():
    watch = not_learning.Watch(10, stop=False, lr=1.0, batch=64)
    assert watch.evaluation(0.10, step=0) is None  # before training: not a sign
    assert watch.loss(2.3, 10) is None and watch.loss(20.0, 20) is None
    said = watch.loss(25.0, 30)
    assert said and said.startswith("warning: this run is not learning: the training loss 25")
    assert watch.evaluation(0.1, 40) is None and watch.evaluation(0.1, 50) is None  # once
    chance = not_learning.Watch(10, stop=False, lr=1.0, batch=64)
    assert chance.evaluation(0.11, 10) is None and chance.evaluation(0.5, 20) is None
    assert chance.evaluation(0.11, 30) is None  # two in a row, not two in all
    assert "val top-1 0.1000 at step 40 is at chance" in chance.evaluation(0.10, 40)
    assert not_learning.chance_limit(2) == pytest.approx(0.55)
    stopping = not_learning.Watch(10, stop=True, lr=1.0, batch=64)
    stopping.loss(2.0, 1)
    with pytest.raises(not_learning.NotLearning, match="Stopped "
                                                       r"\(schedule.stop_if_not_learning=true\)"):
        stopping.loss(30.0, 2)


def test_several_refusals_make_one_message_and_one_stays_itself():
    problems = Problems()
    with problems.check():
        raise DataError("model.num_classes=1000 but data.name=imagefolder has 3 classes; set "
                        "model.num_classes=3 (or auto).")
    problems.add(RecipeError("data.batch_size=1024 is larger than the 40 training images; use "
                             "a smaller batch."))
    problems.add(RecipeError("data.batch_size=1024 is larger than the 40 training images; use "
                             "a smaller batch."))  # the same sentence twice counts once
    with pytest.raises(Refusals) as caught:
        problems.raise_any()
    lines = str(caught.value).splitlines()
    assert lines[0] == "2 problems stop this run; fix each:"
    assert lines[1].startswith("  - model.num_classes=1000") and lines[2].startswith("  - data.")
    assert caught.value.exit_code == 2 and not caught.value.same_on_all_ranks
    alone = Problems()
    alone.add(RecipeError("one"))
    with pytest.raises(RecipeError, match="^one$"):
        alone.raise_any()
    Problems().raise_any()  # nothing found: nothing raised
