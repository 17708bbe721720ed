"""Ownership of the run directory (one run at a time: its lock) and the resume table (what
a run directory holding a run does with a recipe asked again, changed or not).

Real processes: two trainings into one output_dir, a lock left by a SIGKILLed run, a
finished run whose checkpoints are gone or corrupt, resumes with changed keys. Every
refusal is exit 2 with one sentence, and the run directory's files are byte-for-byte what
they were (`snapshot`).
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ffdist import run_dir, train
from ffdist.errors import EXIT_USER_ERROR
from tests import helpers
from tests.fault import kit
from tests.helpers import RECIPES, env, error_line, in_process, snapshot

SLOW = "slow:step=1-30:ms=150"
HOLD = "slow:step=1-30:ms=1000"  # a first run that is still going when the second starts;
# the test stops it with SIGTERM once the second has been refused (exit 75, a checkpoint)


@pytest.fixture
def finished(ref1: Path, tmp_path: Path) -> Path:
    out = tmp_path / "finished"
    shutil.copytree(ref1, out)
    return out


def refused_in_process(capfd, out: Path, *overrides: str) -> str:
    """The same refusal through ffdist.train.main, the function behind the CLI (a real
    process costs 5-10 s of imports here; the real-process tests above cover the CLI)."""
    return helpers.refused(in_process(capfd, train.main, str(RECIPES / "digits.yaml"),
                                      *kit.ARGS, f"output_dir={out}", *overrides), out)


def ok_in_process(capfd, out: Path, *overrides: str) -> str:
    code = train.main([str(RECIPES / "digits.yaml"), *kit.ARGS, f"output_dir={out}", *overrides])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    return captured.out


def refused(out: Path, *overrides: str, cmd: list[str] | None = None) -> str:
    return helpers.refused(cmd or kit.python_cmd(out, *overrides), out)


# ------------------------------------------------------------------ the lock

def test_a_second_training_into_the_same_output_dir_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = kit.start(kit.python_cmd(out), FFDIST_FAULT=HOLD)
    try:
        kit.wait_for_step(out, 1, first)
        proc = kit.run(kit.python_cmd(out), timeout=120)
        assert first.poll() is None, "the first run ended before the second started"
        assert proc.returncode == EXIT_USER_ERROR, kit.explain(proc)
        line = error_line(proc.stderr)
        assert f"output_dir={out} is in use by another ffdist run (pid {first.pid} on " \
               f"{socket.gethostname()}, since " in line
        assert "choose another output_dir (or name)" in line
    finally:
        first.send_signal(signal.SIGTERM)
        text = first.communicate(timeout=120)[0]
    assert first.returncode == 75, kit.explain(first, text)
    kit.train_losses(out)  # one writer: no step logged twice


# make test-all only; the fast tier covers its path: the one-process second training above,
# test_resume_table_under_torchrun's one-line refusal under torchrun
@pytest.mark.extended
def test_a_second_torchrun_job_is_refused_by_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    first = kit.start(kit.python_cmd(out), FFDIST_FAULT=HOLD)
    try:
        kit.wait_for_step(out, 1, first)
        proc = kit.run(kit.torchrun_cmd(out), timeout=150)
        assert first.poll() is None, "the first run ended before the second started"
        ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
        assert len(ours) == 1 and "is in use by another ffdist run" in ours[0], proc.stderr[-3000:]
        assert f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr, proc.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75


# make test-all only: the fast tier covers its path through test_the_lock_of_a_killed_holder_
# never_blocks (the kernel drops the lock of a killed process) and tests/fault/test_killed_rank.py
# (a SIGKILLed run resumes)
@pytest.mark.extended
def test_the_lock_of_a_killed_run_never_blocks(tmp_path):
    out = tmp_path / "run"
    first = kit.start(kit.python_cmd(out, "data.num_workers=2"), FFDIST_FAULT=SLOW)
    kit.wait_for_step(out, 12, first)  # checkpoints of steps 5 and 10 exist
    first.send_signal(signal.SIGKILL)  # no handler, no cleanup: the kernel drops the flock
    first.communicate(timeout=30)
    assert (out / run_dir.LOCK_FILE).read_text().startswith(f"pid {first.pid} on ")
    # (3 steps are enough to show it trains; schedule.max_steps may change on resume)
    proc = kit.run(kit.python_cmd(out, "schedule.max_steps=13"), timeout=120)
    assert proc.returncode == 0, kit.explain(proc)
    assert "resumed from step 10" in proc.stdout


def _child_sleeps(ready) -> None:
    ready.set()
    time.sleep(30)


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of the rank: its copy of the fd must not keep the run
    locked after the rank itself has let go (or died)."""
    held = run_dir.lock(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_child_sleeps, args=(ready,))
    child.start()
    try:
        assert ready.wait(20)
        held.release()
        again = run_dir.lock(tmp_path)  # would wait LOCK_WAIT_S and raise if the child held it
        again.release()
    finally:
        child.kill()
        child.join()


HOLDER = """
import sys, time
from pathlib import Path
from ffdist.run_dir import lock
held = lock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.readline()
held.release()
print("released", flush=True)
time.sleep(30)
"""


def test_lock_is_exclusive_between_processes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(run_dir.RunDirInUse, match=f"pid {holder.pid} on "):
            run_dir.lock(tmp_path)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n"
        run_dir.lock(tmp_path).release()  # free again once the holder let go, though alive
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_never_blocks(tmp_path):
    """SIGKILL leaves the lock file with the dead holder's pid in it; the kernel dropped
    the flock with the process, so the next run takes it at once."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
    finally:
        holder.kill()  # no handler, no cleanup
        holder.wait()
    assert (tmp_path / run_dir.LOCK_FILE).read_text().startswith(f"pid {holder.pid} on ")
    run_dir.lock(tmp_path).release()


# ------------------------------------------------------------------ finished runs

def test_finished_run_same_recipe_is_nothing_to_do_and_a_changed_override_is_refused(finished):
    """A finished run asked again, as a user meets it: `make train`, then the README's
    override example."""
    before = snapshot(finished)
    proc = kit.run(kit.python_cmd(finished, "log.every_steps=3", "data.num_workers=1"))
    assert proc.returncode == 0, kit.explain(proc)
    assert "already holds the finished run (step 30); nothing to do" in proc.stdout
    assert snapshot(finished) == before
    line = refused(finished, "optim.lr=0.05", "optim.momentum=0.8")
    assert (f"output_dir={finished} already holds a finished run, and this recipe differs in "
            "optim.lr (0.1 -> 0.05), optim.momentum (0.9 -> 0.8)") in line
    assert f"new run with output_dir={finished.parent / 'finished_2'}" in line
    assert "checkpoint.resume=extend" not in line  # more steps are not what was asked


@pytest.mark.parametrize("damage", ["gone", "corrupt"])
def test_finished_run_whose_checkpoints_are_gone_or_corrupt_is_never_retrained(capfd, finished,
                                                                               damage):
    ckpts = finished / "checkpoints"
    if damage == "gone":
        shutil.rmtree(ckpts)
    else:
        for f in ckpts.glob("*.pt"):
            f.write_bytes(f.read_bytes()[:200])
    # the same recipe: nothing to do (recipe.yaml says which run it is), nothing rewritten
    before = snapshot(finished)
    assert "already holds the finished run; nothing to do" in ok_in_process(capfd, finished)
    assert snapshot(finished) == before
    # another recipe, or a fresh start: refused
    line = refused_in_process(capfd, finished, "schedule.max_steps=40")
    assert "differs in schedule.max_steps (30 -> 40)" in line
    line = refused_in_process(capfd, finished, "checkpoint.resume=never")
    assert "already holds a run and checkpoint.resume=never" in line
    line = refused_in_process(capfd, finished, "checkpoint.resume=extend", "schedule.max_steps=40")
    assert "has no readable checkpoint to continue from" in line
    assert f"model.pretrained={finished / 'model.pt'}" in line


def test_extend_continues_a_finished_run_and_refuses_when_there_is_nothing_more(capfd, finished):
    longer = ("schedule.epochs=3", "schedule.max_steps=35")  # it stopped at the end of epoch 1
    line = refused_in_process(capfd, finished, *longer)
    assert "or continue this run in place with checkpoint.resume=extend" in line
    # max_steps alone is not more training: epoch 1 (of schedule.epochs=2) was its last
    line = refused_in_process(capfd, finished, "schedule.max_steps=35", "checkpoint.resume=extend")
    assert "already reached step 30 (epoch 2), and this recipe ends at step 35 " \
           "(schedule.epochs=2); raise schedule.epochs or schedule.max_steps" in line
    old_model = (finished / "model.pt").read_bytes()
    out = ok_in_process(capfd, finished, *longer, "checkpoint.resume=extend")
    assert "resumed from step 30" in out
    assert max(kit.train_losses(finished)) == 35
    assert (finished / "model.pt").read_bytes() != old_model
    # the extended run, asked again as it now is, is finished: nothing to do
    assert "nothing to do" in ok_in_process(capfd, finished, *longer)


def test_model_pt_without_any_record_of_its_run_is_not_trained_over(capfd, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone's weights")
    line = refused_in_process(capfd, out)  # not a run folder at all: not ffdist's model.pt
    assert f"is not an ffdist run folder: it holds {out / 'model.pt'} (which a run would " \
           "replace)" in line
    (out / run_dir.MARKER).write_text("{}")  # a run's folder whose records are gone
    line = refused_in_process(capfd, out)
    assert "holds a model.pt but neither a readable checkpoint nor a recipe.yaml" in line


def test_unreadable_checkpoints_are_not_mixed_with_a_fresh_start(capfd, finished):
    (finished / "model.pt").unlink()
    for f in (finished / "checkpoints").glob("step_*.pt"):
        f.write_bytes(b"torn")
    line = refused_in_process(capfd, finished)
    assert "none of its checkpoints can be read" in line and "move" in line


# ------------------------------------------------------------------ unfinished runs: the table

@pytest.fixture
def unfinished(ref1: Path, tmp_path: Path) -> Path:
    """ref1 as it was at step 20: checkpoints up to step 20, no model.pt."""
    out = tmp_path / "unfinished"
    shutil.copytree(ref1, out)
    (out / "model.pt").unlink()
    for later in ("step_00000025.pt", "step_00000030.pt"):
        (out / "checkpoints" / later).unlink()
    (out / "checkpoints" / "latest").write_text("step_00000020.pt\n")
    return out


def test_resume_refuses_keys_that_define_the_run(capfd, unfinished):
    ckpt = unfinished / "checkpoints" / "step_00000020.pt"
    line = refused_in_process(capfd, unfinished, "data.batch_size=128", "seed=3")
    assert (f"checkpoint {ckpt} (step 20) was trained with another seed (0 -> 3), "
            "data.batch_size (64 -> 128), which a resumed run cannot change") in line
    assert "resume it with seed=0 data.batch_size=64" in line
    assert (f"or start a new run from its weights: model.pretrained={ckpt} "
            f"output_dir={unfinished.parent / 'unfinished_2'}") in line


def test_resume_accepts_what_may_change_and_says_what_changed(capfd, unfinished):
    out = ok_in_process(capfd, unfinished, "optim.lr=0.05", "log.every_steps=2",
                        "checkpoint.keep_last=2", "data.num_workers=1")
    assert "resumed from step 20" in out
    assert "continuing" in out and "with optim.lr (0.1 -> 0.05)" in out


def test_resume_table_under_torchrun_is_one_line(unfinished):
    proc = kit.run(kit.torchrun_cmd(unfinished, "model.name=lenet"), timeout=150)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
    assert len(ours) == 1 and "model.name (small_cnn -> lenet)" in ours[0], proc.stderr[-3000:]
    assert f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------ writable, found at the start

def test_checkpoints_folder_that_cannot_be_written_is_found_before_training(capfd, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_dir.MARKER).write_text("{}")  # a run's folder (else it is not ffdist's)
    (out / "checkpoints").write_text("a file where the folder goes")  # fails even for root
    line = refused_in_process(capfd, out)
    assert line.endswith(f"output_dir={out}: its checkpoints/ folder is not writable (it is a "
                         "file); set output_dir=PATH to another folder.")
    assert not (out / "metrics.jsonl").exists(), "it trained before finding out"


@pytest.mark.skipif(shutil.which("unshare") is None or sys.platform != "linux",
                    reason="needs unshare(1) for a private read-only mount")
def test_read_only_checkpoints_folder_is_found_before_training(tmp_path):
    """A real read-only folder: bind-mounted read-only in a private mount namespace (root
    ignores permission bits; the mount is gone when the process ends: the host is untouched)."""
    import os

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    if os.geteuid() != 0:
        (out / "checkpoints").chmod(0o555)
        cmd = kit.python_cmd(out)
    else:
        ckpt = str(out / "checkpoints")
        train = " ".join(f"'{a}'" for a in kit.python_cmd(out))
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f"mount --bind '{ckpt}' '{ckpt}' && mount -o remount,bind,ro '{ckpt}' && "
               f"exec {train}"]
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    line = refused(out, cmd=cmd)
    assert f"output_dir={out}: its checkpoints/ folder is not writable (Read-only file " \
           "system)" in line or "folder is not writable (Permission denied)" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_run_that_stops_before_writing_anything_leaves_no_folder(capfd, tmp_path):
    """The run directory and checkpoints/ that claim() made are removed again when the run
    was refused after them (here: a checkpoint to resume that does not exist); a folder
    that existed before stays."""
    out = tmp_path / "new" / "run"
    line = refused_in_process(capfd, out, f"checkpoint.resume={tmp_path / 'gone.pt'}")
    assert "does not exist" in line and not out.exists() and (tmp_path / "new").is_dir()
    kept = tmp_path / "mine"
    kept.mkdir()  # empty, and there before: it stays, checkpoints/ goes
    held = run_dir.claim(kept, SimpleNamespace(is_primary=True, world_size=1))
    held.release()
    assert kept.is_dir() and not (kept / "checkpoints").exists()
