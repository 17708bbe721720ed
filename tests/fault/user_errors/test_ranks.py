"""User errors with several ranks: under torchrun, srun-style side-by-side ranks and
`ffdist launch`, each failing rank prints one line (rank 0 the sentence, the others at most
a pointer to it), every rank exits 2, and no run directory is left behind. Ranks started
with different recipes stop before any step; a rank that never comes ends the others after
launch.rdzv_timeout, with progress lines while they wait; launcher variables that are not
numbers, and several nodes without a reachable rendezvous host, are one sentence each. torchrun itself
exits 1 and prints its summary (with its own traceback of ChildFailedError), so these tests
check ffdist's lines within that output rather than the one-line contract of
tests.helpers.refused, which `ffdist launch` (no launcher output) meets in full.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ffdist
from ffdist.errors import EXIT_USER_ERROR
from tests.fault import kit
from tests.fault.user_errors.common import DIGITS, R50, train_main
from tests.helpers import (
    BIN,
    CPU,
    FAST,
    REPO,
    env,
    error_line,
    free_port,
    refused,
    snapshot,
    torchrun,
)

# Where ffdist's own source files are: a traceback frame of ours would name one. (Text
# such as "ffdist/" alone also matches the checkout's or the virtual environment's path.)
PACKAGE = str(Path(ffdist.__file__).resolve().parent) + os.sep


# make test-all only: the sentence is in the fast tier through tests/unit/test_slurm.py and
# test_advice.py, a user error under torchrun through the test below
@pytest.mark.extended
def test_batch_not_divisible_under_torchrun_is_one_line(existing_run):
    before = snapshot(existing_run)
    proc = kit.run(kit.torchrun_cmd(existing_run, "data.batch_size=63"), timeout=90)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: error")]
    assert ours == ["ffdist: error: data.batch_size=63 is the global batch and does not divide "
                    "over 2 processes; set data.batch_size=64 (or another multiple of 2)."], \
        proc.stderr[-3000:]
    # torchrun exits 1 whatever its workers return; it reports theirs:
    assert proc.returncode == 1 and f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr
    assert snapshot(existing_run) == before


def test_user_error_on_one_rank_under_torchrun_is_one_line_per_failing_rank(tmp_path):
    """Rank 1 alone hits a user error mid-training: it prints its sentence; rank 0, whose
    collective then fails, prints one line pointing at it instead of a gloo traceback."""
    out = tmp_path / "run"
    proc = kit.run(kit.torchrun_cmd(out, "launch.pg_timeout=20"), timeout=90,
                   FFDIST_FAULT="data_error:step=3:rank=1")
    assert proc.returncode == 1 and f"exitcode  : {EXIT_USER_ERROR}" in proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
    assert ours[0].startswith("ffdist: error (rank 1 of 2): injected by FFDIST_FAULT at step 3")
    assert all("lost contact with another rank" in ln for ln in ours[1:]), ours
    # the only traceback left is torchrun's own (its agent raises ChildFailedError)
    assert proc.stderr.count("Traceback") == 1 and "[rank0]:" not in proc.stderr


def test_two_ranks_print_the_sentence_once_and_leave_no_run_dir(tmp_path):
    """Absent data under torchrun: rank 0's line, and torchrun's summary (its own traceback
    of ChildFailedError comes with any failing worker). Rank 1 either exits 2 itself, its
    error file a pointer to rank 0's message, or is stopped by torchrun (SIGTERM) once rank 0
    has failed."""
    out = tmp_path / "run"
    proc = torchrun("resnet50.yaml", CPU, f"data.root={tmp_path / 'imagenet'}",
                    f"output_dir={out}", check=False, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    ffdist_lines = [ln for ln in text.splitlines() if ln.startswith("ffdist:")]
    assert len(ffdist_lines) == 1 and ffdist_lines[0].startswith("ffdist: error: "), text
    sentence = ffdist_lines[0].removeprefix("ffdist: error: ")
    assert text.count(sentence) == 2, text  # the line, and rank 0's entry in the summary
    codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)", text))
    # whichever rank failed first exits 2, torchrun stops the other (SIGTERM) or it exits 2
    assert "2" in codes.values() and set(codes.values()) <= {"2", "-15"}, text
    if codes.get("1") == "2":
        assert "rank 1 of 2 stopped on the same error as rank 0" in text
    assert "Original Traceback" not in text and PACKAGE not in text, text
    assert not out.exists()


def test_every_rank_exits_2_and_only_rank_0_prints(tmp_path):
    """Ranks started side by side (as srun starts them, no agent to stop the others): every
    one exits 2, one line in all."""
    procs = [subprocess.Popen([sys.executable, "-m", "ffdist.train", R50, CPU,
                               f"data.root={tmp_path / 'imagenet'}", f"output_dir={tmp_path / 'run'}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT="1"))
             for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    lines = [ln for out, err in results for ln in (out + err).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffdist: error: "), lines
    assert results[0][1].strip() == lines[0]  # rank 0 printed it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank,local_rank,prints", [(0, 0, True), (1, 1, False), (2, 0, True)])
def test_first_rank_of_each_node_prints_others_leave_torchrun_a_pointer(
        capsys, monkeypatch, tmp_path, rank, local_rank, prints):
    """DataMissing (per node: nodes may hold their own copy of the data): rank 0 and the first
    rank of every other node print the sentence; the rest print nothing and leave torchrun's
    summary a pointer instead of the sentence again."""
    from ffdist.data.presence import DataMissing
    from ffdist.errors import RecipeError, report

    error_file = tmp_path / "error.json"
    for k, v in {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 2,
                 "TORCHELASTIC_ERROR_FILE": error_file}.items():
        monkeypatch.setenv(k, str(v))
    report(DataMissing("no data there."))
    err = capsys.readouterr().err
    message = json.loads(error_file.read_text())["message"]
    if prints:
        assert err.strip().endswith("no data there.") and message == err.strip()
    else:
        assert err == "" and message == (f"ffdist: rank {rank} of 4 stopped on the same error "
                                         "as rank 0 (its message above).")
    report(RecipeError("bad key."))  # alike on every rank of every node: rank 0 alone prints
    assert bool(capsys.readouterr().err) == (rank == 0)


def test_ffdist_launch_checks_the_data_before_starting_torchrun(tmp_path):
    """`ffdist launch` (2 CPU ranks under torchrun): the sentence alone, no launcher output."""
    out = tmp_path / "run"
    line = refused([sys.executable, "-m", "ffdist.cli", "launch", R50, CPU, "launch.nproc=2",
                    f"data.root={tmp_path / 'imagenet'}", f"output_dir={out}"], out)
    assert "does not exist" in line


# ------------------------------------------------------------------ ranks that disagree

@pytest.mark.parametrize("override,differs", [
    # make test-all only: the same check as batch_size's, on another key
    pytest.param("optim.lr=0.2", "optim.lr is 0.1 on rank 0 and 0.2 on rank 1",  # else: diverged replicas
                 marks=pytest.mark.extended),
    ("data.batch_size=32", "data.batch_size is 64 on rank 0 and 32 on rank 1"),  # else: gloo aborts
])
def test_ranks_started_with_different_recipes_stop_before_any_step(tmp_path, override, differs):
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.fault.per_rank", DIGITS, CPU, *FAST, "schedule.max_steps=2",
           f"output_dir={out}"]
    proc = kit.run(cmd, timeout=120, PER_RANK_1=override)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
    assert ours == [f"ffdist: error: the ranks were started with different recipes: {differs}; "
                    "start every rank with the same recipe file and overrides."], proc.stderr
    codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)",
                            proc.stderr))
    assert codes.get("0") == "2" and set(codes.values()) <= {"2", "-15"}, proc.stderr
    assert "[rank0]:" not in proc.stderr and "EnforceNotMet" not in proc.stderr
    assert not out.exists(), "nothing may be written before the ranks agree"


# ------------------------------------------------------------------ ranks that never come

def side_by_side(ranks: list[int], world: int, out: Path, port: int,
                 *overrides: str) -> list[subprocess.Popen]:
    """Ranks started by hand (as srun or a script starts them: no agent), some of a world."""
    return [subprocess.Popen([sys.executable, "-m", "ffdist.train", DIGITS, CPU, *FAST,
                              "launch.rdzv_timeout=4", f"output_dir={out}", *overrides],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env(RANK=str(r), LOCAL_RANK=str(r),
                                                WORLD_SIZE=str(world),
                                                LOCAL_WORLD_SIZE=str(world),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in ranks]


def test_a_rank_that_never_comes_ends_the_others_with_one_sentence(tmp_path):
    """World 3, rank 2 never started: rank 0 says what it waits for while it waits, then
    names the missing rank and the address; rank 1 stops with it, silently (exit 2 each)."""
    port, out = free_port(), tmp_path / "run"
    procs = side_by_side([0, 1], 3, out, port)
    (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], (err0, err1)
    waiting = [ln for ln in err0.splitlines() if ln.startswith("ffdist: waiting")]
    assert waiting and waiting[0].startswith(f"ffdist: waiting for 1 of 3 ranks at the rendezvous "
                                             f"at 127.0.0.1:{port} (rank 2), "), err0
    assert waiting[-1].endswith("of 4 s (launch.rdzv_timeout)")
    line = error_line(err0, progress="ffdist: waiting")
    assert line.startswith(f"ffdist: error: rank 2 of 3 did not join the rendezvous at "
                           f"127.0.0.1:{port} within 4 s (launch.rdzv_timeout=4); check that "
                           "every rank was started"), line
    assert (out1 + err1).strip() == "" and "Traceback" not in out0
    assert not out.exists()


def test_a_rank_whose_rank_0_never_comes_says_where_it_waited(tmp_path):
    port = free_port()
    proc, = side_by_side([1], 2, tmp_path / "run", port)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # (local rank 1: no progress lines, those are local rank 0's)
    line = lines[0]
    assert line.startswith(f"ffdist: error (rank 1 of 2): rank 0's rendezvous at "
                           f"127.0.0.1:{port} did not answer within 4 s "
                           "(launch.rdzv_timeout=4); check that rank 0 was started"), line
    assert "DistStoreError" not in err + out and not (tmp_path / "run").exists()


def test_several_nodes_need_a_rendezvous_host_they_can_reach(tmp_path):
    line = refused([sys.executable, "-m", "ffdist.cli", "launch", DIGITS, CPU, "launch.nnodes=2",
                    f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert line == ("ffdist: error: launch.nnodes=2 but launch.rdzv_endpoint=localhost:29500 "
                    "names this machine only, so the other nodes cannot join and the first node "
                    "would wait launch.rdzv_timeout=900 s for them; set launch.rdzv_endpoint="
                    "HOST:PORT (or --rdzv-endpoint) to the first node's address, the same on "
                    "every node.")


@pytest.mark.parametrize("variables,named", [
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE=two is not a whole number"),
    ({"RANK": "x1", "WORLD_SIZE": "2"}, "RANK=x1 is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 in the environment, but WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29x"}, "MASTER_PORT=29x is not a whole number"),
])
def test_launcher_variables_that_are_not_numbers(capfd, monkeypatch, tmp_path, variables, named):
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    line = refused(train_main(capfd, CPU, f"output_dir={out}"), out)
    assert named in line and "Traceback" not in line
