"""slurm/train.sh on a real (one-node) Slurm: a world of 2, and preemption + requeue."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from tests.helpers import CPU, FAST, RECIPES, REPO, end_event, events, run
from tests.slurm.cluster import job_state, wait_done

SCRIPT = str(REPO / "slurm" / "train.sh")


def test_sbatch_trains_world_of_two(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    proc = run(["sbatch", "--wait", "--output", str(tmp_path / "sbatch-%j.out"), SCRIPT,
                str(RECIPES / "digits.yaml"), f"output_dir={out}", CPU, "launch.nproc=2", *FAST],
               timeout=400)
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    log = (out / f"slurm-{job}.out").read_text()  # the job's log lives in the run dir
    assert "--nproc_per_node 2" in log and "--standalone" in log
    assert {e["world_size"] for e in events(out, "train") + events(out, "val")} == {2}
    end = end_event(out)
    assert end["world_size"] == 2 and end["final_top1"] >= 0.98, end
    assert (out / "model.pt").exists()


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    # Checkpoints only at the very end (every_epochs=100): a resume at step > 0 can only
    # come from the checkpoint the USR1 trap asked for. Submitted by `ffdist launch`.
    proc = run([sys.executable, "-m", "ffdist.cli", "launch", str(RECIPES / "digits.yaml"),
                "--launcher", "slurm", "schedule.epochs=3", "checkpoint.every_epochs=100",
                "log.every_steps=5", f"output_dir={out}", CPU, "launch.nproc=2", *FAST],
               timeout=60)
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not events(out, "train"):
            assert time.monotonic() < deadline, f"job {job} never trained: {job_state(job)}"
            assert job_state(job).get("JobState") in ("PENDING", "RUNNING"), job_state(job)
            time.sleep(0.5)
        # What Slurm does 90 s before the time limit (--signal=B:USR1@90): USR1 to the
        # batch shell only.
        run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
        final = wait_done(job, timeout=400)
    finally:
        run(["scancel", job], timeout=30, check=False)
    log = (out / f"slurm-{job}.out").read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log)
    assert "requeueing job" in log and "restart 1" in log
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", log)]
    assert len(resumed) == 1 and 0 < resumed[0] < 66, log
    assert Path(out / "checkpoints" / f"step_{resumed[0]:08d}.pt").exists()
    assert end_event(out)["step"] == 66 and end_event(out)["world_size"] == 2
    steps = [e["step"] for e in events(out, "train")]
    assert steps == sorted(steps), "metrics.jsonl must continue, not restart from step 0"
