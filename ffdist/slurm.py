"""Slurm beyond building commands (ffdist.launchers builds them): checking a recipe before it
is queued, submitting it, and running torchrun inside a job.

A queued job may wait hours for its nodes, and `sbatch` cannot look inside a batch
script, so the mistakes ffdist can see without the nodes are reported before anything is
queued, as one sentence: `check()`, called by `ffdist launch launch.launcher=slurm`, by
`bash slurm/train.sh --check`, and again by slurm/train.sh when the job starts (then
against the allocation it got, and the job fails at once with that sentence in its log).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ffdist.errors import CheckpointError, LaunchError
from ffdist.launchers import slurm_node_processes
from ffdist.recipe import Recipe
from ffdist.world import int_env


def check(rcp: Recipe, world: int | None = None) -> None:
    """Refuse what would fail at the job's start: an unknown model or log sink, a global
    batch that does not divide over `world` processes (when known), an output_dir that
    cannot be made."""
    from ffdist import sinks
    from ffdist.assemble import batch_plan
    from ffdist.models import check_name

    check_name(rcp.model.name)
    sinks.check(rcp.log)
    if world:
        batch_plan(rcp, world)
    existing = next(p for p in (rcp.run_dir, *rcp.run_dir.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise CheckpointError(f"output_dir={rcp.run_dir} cannot be created or written: "
                              f"{existing} is not a writable folder; choose another output_dir "
                              "or fix its permissions.")


def check_for_script(recipe_path: str, overrides: list[str], environ: dict[str, str]) -> int:
    """slurm/train.sh's check (`python -m ffdist.launch --slurm-check`): the recipe, inside
    a job against its allocation; prints the run directory for the script to use."""
    from ffdist import recipe_load

    rcp = recipe_load.load(recipe_path, overrides)
    in_job = bool(environ.get("SLURM_JOB_ID"))
    check(rcp, allocation_world(rcp, environ) if in_job else None)
    print(rcp.run_dir)
    return 0


def allocation_world(rcp: Recipe, environ: dict[str, str]) -> int:
    """Processes the job will run: nodes x what slurm_node_processes gives this (the batch)
    node; Slurm allocations with --exclusive and one task per node are homogeneous."""
    nodes = int_env("SLURM_JOB_NUM_NODES", "SLURM_NNODES", environ=environ) or 1
    return nodes * slurm_node_processes(rcp, environ)[0].nproc


def submit(argv: list[str], run_dir: Path) -> int:
    """Run `sbatch ...` (its --output is in `run_dir`), then say where the job's log is and
    how to watch or cancel it."""
    if not shutil.which(argv[0]):
        raise LaunchError(f"{argv[0]} not found on PATH: submit from a Slurm login node, or "
                          "use another launcher (launch.launcher=torchrun).")
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot create its --output folder
    proc = subprocess.run([argv[0], "--parsable", *argv[1:]], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return proc.returncode  # sbatch has said why on stderr
    job = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    log = run_dir / f"slurm-{job}.out"
    print(f"Submitted batch job {job}\nffdist: log: {log}\nffdist: watch: squeue -j {job}; "
          f"tail -f {log}\nffdist: cancel: scancel {job}", flush=True)
    return 0


def run_torchrun(argv: list[str], env: dict[str, str], where: str) -> int:
    """torchrun's command line (`argv` without the program name), run in this process.

    Exactly what exec'ing `torchrun` does, except at a stop signal: when USR1 (a
    preemption warning that slurm/train.sh relays) or SIGTERM (scancel, time limit)
    reaches the agent, torchrun passes it on to its workers, waits for them to checkpoint
    and exit, and then lets a SignalException escape its CLI as a traceback in the job log.
    Here that is one line and the shell's exit code for the signal. A failed worker still
    gets torchrun's own failure report.
    """
    os.environ.update(env)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        print(f"ffdist: {where}: torchrun stopped on {sig.name}: its workers were asked to "
              "checkpoint and exit", file=sys.stderr, flush=True)
        return 128 + int(sig)
    return 0
