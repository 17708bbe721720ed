"""slurm/train.sh on a real two-node Slurm cluster (tests/slurm/cluster.py), as users run it:
`sbatch -N 2 slurm/train.sh RECIPE ...` with world size 4, preempted -> checkpoint ->
requeue -> resumed -> trained to the end; bad recipes refused by `ffdist launch` before
queueing, or failing at once when sbatch took them; and the host left as it was.

Each node is a network namespace with 2 CPU ranks; gloo traffic goes over IFNAME, the
interface every node has (launch.socket_ifname, as on a cluster with several networks).
"""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.helpers import CPU, FAST, RECIPES, REPO, end_event, events
from tests.slurm.cluster import IFNAME
from tests.slurm.conftest import host_changes

SCRIPT = str(REPO / "slurm" / "train.sh")
DIGITS = str(RECIPES / "digits.yaml")
NET = (f"launch.socket_ifname={IFNAME}", CPU, "launch.nproc=2")  # 2 CPU ranks per node


def _job_id(stdout: str) -> str:
    return re.search(r"Submitted batch job (\d+)", stdout).group(1)


def test_sbatch_two_nodes_preempted_requeued_resumed_to_the_end(slurm_cluster, tmp_path):
    """`sbatch -N 2 slurm/train.sh digits` with 2 ranks per node (world size 4), preempted
    while it trains, resumes from the checkpoint the signal asked for and trains to the
    end. One job for both claims: each job start costs ~20 s of imports on 2 cores."""
    c, out = slurm_cluster, tmp_path / "run"
    total = 5 * 22
    # Checkpoints only at the very end (every_epochs=100): a resume at step > 0 can only
    # come from the checkpoint the USR1 trap asked for.
    proc = c.run(["sbatch", "-N", "2", "--output", str(tmp_path / "sbatch-%j.out"), SCRIPT,
                  DIGITS, f"output_dir={out}", "schedule.epochs=5", "checkpoint.every_epochs=100",
                  "log.every_steps=2", *NET, *FAST])
    job = _job_id(proc.stdout)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not events(out, "train"):
            assert time.monotonic() < deadline, f"job {job} never trained: {c.job(job)}"
            assert c.job(job).get("JobState") in ("PENDING", "RUNNING"), c.job(job)
            time.sleep(0.3)
        # What Slurm does 90 s before the time limit (--signal=B:USR1@90): USR1 to the
        # batch shell only.
        c.run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
        final = c.wait_done(job, timeout=400)
    finally:
        c.run(["scancel", job], timeout=30, check=False)
    log = (out / f"slurm-{job}.out").read_text()  # the job's log lives in the run dir
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log)
    assert final["NodeList"] == f"ffsl{c.tag}n[1-2]", final
    head, other = c.nodes
    # The rendezvous is at the head's NodeAddr from slurm.conf: no name lookup, no /etc/hosts.
    assert log.count(f"rendezvous {head.addr}:") == 2, log
    torchruns = [ln for ln in log.splitlines() if "torchrun --nnodes 2 --nproc_per_node 2" in ln]
    assert len(torchruns) == 4, log  # per start, one per node, printed by its own srun task
    assert sum("is_host=1" in t and f"--local_addr {head.addr}" in t for t in torchruns) == 2
    assert sum("is_host=0" in t and f"--local_addr {other.addr}" in t for t in torchruns) == 2

    assert "requeueing job" in log and "restart 1" in log, log
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", log)]
    assert len(resumed) == 1 and 0 < resumed[0] < total, log
    assert (out / "checkpoints" / f"step_{resumed[0]:08d}.pt").exists()
    # Both nodes' torchrun stopped on the signal with one line each, and no traceback.
    assert len(re.findall(rf"node {head.name}: torchrun stopped on SIGUSR1", log)) == 1, log
    assert len(re.findall(rf"node {other.name}: torchrun stopped on SIGUSR1", log)) == 1, log
    assert "Traceback" not in log, log

    assert {e["world_size"] for e in events(out, "train") + events(out, "val")} == {4}
    steps = [e["step"] for e in events(out, "train")]
    assert steps == sorted(steps), "metrics.jsonl must continue, not restart from step 0"
    end = end_event(out)
    assert end["world_size"] == 4 and end["step"] == total and end["final_top1"] >= 0.95, end
    assert (out / "model.pt").exists()


# make test-all: a second configuration of the requeue path
# (test_sbatch_two_nodes_preempted_requeued_resumed_to_the_end, DDP)
@pytest.mark.extended
def test_fsdp_on_two_nodes_preempted_requeued_resumed_to_the_end(slurm_cluster, tmp_path):
    """strategy.name=fsdp under `sbatch -N 2 slurm/train.sh` (world size 4): USR1 to the
    batch script -> every rank writes its DCP shards of the checkpoint -> requeue -> the
    4 ranks reshard-load them (the same world size here) and train to the end."""
    c, out = slurm_cluster, tmp_path / "run"
    total = 3 * 22
    proc = c.run(["sbatch", "-N", "2", "--output", str(tmp_path / "sbatch-%j.out"), SCRIPT,
                  DIGITS, f"output_dir={out}", "schedule.epochs=3", "checkpoint.every_epochs=100",
                  "log.every_steps=2", "strategy.name=fsdp", *NET, *FAST])
    job = _job_id(proc.stdout)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not events(out, "train"):
            assert time.monotonic() < deadline, f"job {job} never trained: {c.job(job)}"
            assert c.job(job).get("JobState") in ("PENDING", "RUNNING"), c.job(job)
            time.sleep(0.3)
        c.run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
        final = c.wait_done(job, timeout=400)
    finally:
        c.run(["scancel", job], timeout=30, check=False)
    log = (out / f"slurm-{job}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log)
    assert "requeueing job" in log and "Traceback" not in log, log
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", log)]
    assert len(resumed) == 1 and 0 < resumed[0] < total, log
    folder = out / "checkpoints" / f"step_{resumed[0]:08d}"
    assert sorted(p.name for p in folder.glob("__*_0.distcp")) == [
        f"__{r}_0.distcp" for r in range(4)] and (folder / "ffdist_state.pt").is_file()
    steps = [e["step"] for e in events(out, "train")]
    assert steps == sorted(steps) and {e["world_size"] for e in events(out, "train")} == {4}
    end = end_event(out)
    assert end["world_size"] == 4 and end["step"] == total and end["final_top1"] >= 0.9, end
    assert (out / "model.pt").exists()


def test_bad_submissions_fail_at_once_with_one_line(slurm_cluster, tmp_path):
    """sbatch cannot refuse a script: such a job fails within seconds, exit code 2, and its
    log is one line saying why. A batch of 66 suits one node's 2 ranks but not 2 nodes x 2:
    the job checks the recipe against the allocation it got; that one goes through
    `ffdist launch`, which says where the log is."""
    c = slurm_cluster
    cases = {  # name: (slurm/train.sh's arguments, the log's line)
        "norecipe": ([], "ffdist: slurm/train.sh: no recipe given; usage: sbatch"),
        "nofile": (["recipes/nope.yaml", f"output_dir={tmp_path / 'nofile'}"],
                   "ffdist: error: recipes/nope.yaml: no such recipe file"),
    }
    jobs, logs = {}, {}
    for name, (args, _) in cases.items():
        proc = c.run(["sbatch", "--output", str(tmp_path / f"{name}-%j.out"), SCRIPT, *args])
        jobs[name] = _job_id(proc.stdout)
        logs[name] = tmp_path / f"{name}-{jobs[name]}.out"
    run_dir = tmp_path / "world"
    proc = c.run([sys.executable, "-m", "ffdist.cli", "launch", DIGITS, "launch.launcher=slurm",
                  "--nnodes", "2", "data.batch_size=66", CPU, "launch.nproc=2",
                  f"output_dir={run_dir}"])
    jobs["world"] = _job_id(proc.stdout)
    logs["world"] = run_dir / f"slurm-{jobs['world']}.out"
    assert f"ffdist: log: {logs['world']}" in proc.stdout, proc.stdout
    cases["world"] = ([], "ffdist: error: data.batch_size=66 is the global batch and does not "
                      "divide over 4 processes")

    for name, (_, line) in cases.items():
        state = c.wait_done(jobs[name], timeout=120)
        log = logs[name].read_text()
        assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (name, state, log)
        assert log.startswith(line) and len(log.splitlines()) == 1, (name, log)
        h, m, s = map(int, state["RunTime"].split(":"))
        assert h * 3600 + m * 60 + s <= 20, (name, state["RunTime"])
    assert not (tmp_path / "nofile").exists()  # no empty run directory left behind


def test_ffdist_launch_refuses_before_queueing(slurm_cluster, tmp_path):
    c = slurm_cluster
    before = c.run(["squeue", "-h", "-o", "%A", "--states=all"]).stdout.split()
    proc = c.run([sys.executable, "-m", "ffdist.cli", "launch", DIGITS, "launch.launcher=slurm",
                  "model.name=resnet5", f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == ("ffdist: error: model.name='resnet5' is not a known model; "
                                   "did you mean 'resnet50'?"), proc.stderr
    assert "Submitted" not in proc.stdout
    assert c.run(["squeue", "-h", "-o", "%A", "--states=all"]).stdout.split() == before
    assert not (tmp_path / "run").exists()


def test_host_untouched_by_the_slurm_tests(host_before):
    """/etc/slurm, /etc/munge and /etc/hosts as before the Slurm tests (checksums, modes,
    owners; absent ones still absent), and every Slurm/munge daemon that ran before them
    still runs. Last in tests/slurm/, so the cluster (if this machine can run one) is
    still up; its fixture checks the same again after its teardown."""
    assert host_changes(host_before) == []
