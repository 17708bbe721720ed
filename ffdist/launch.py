"""`ffdist launch RECIPE [key=value ...]`: the launcher command a recipe's `launch` section asks for.

It builds the command (ffdist.launchers: an argv list and the environment variables to
add) for torchrun, `accelerate launch`, the `deepspeed` launcher or `sbatch
slurm/train.sh`, then runs it and returns its exit code. `--dry-run` prints the exact
command and environment and starts nothing.

Multi-node: run the same `ffdist launch ... --nnodes N --node-rank R --rdzv-endpoint
HEAD:PORT` on every node; node rank 0 must run on HEAD, it hosts the c10d rendezvous store.
Inside a Slurm job, `slurm/train.sh` runs `python -m ffdist.launch --slurm-node ...` once
per node: the allocation (SLURM_* variables) decides processes, node count and head.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ffdist import launchers, outputs, recipe_load
from ffdist import slurm as slurm_job
from ffdist.errors import LaunchError, guard
from ffdist.recipe import LAUNCHERS
from ffdist.world import int_env

# Seconds torchrun gives its workers to checkpoint after a signal before SIGKILL; below
# the 90 s of `#SBATCH --signal=B:USR1@90` so the job is requeued before its time limit.
SHUTDOWN_TIMEOUT_S = 60


def build(recipe_path: str, overrides: list[str], launcher: str | None = None,
          dry_run: bool = False) -> launchers.Command:
    """The command `ffdist launch` runs on this node."""
    rcp = recipe_load.load(recipe_path, overrides)
    launcher = launcher or rcp.launch.launcher
    if launcher == "slurm":
        return launchers.slurm(rcp, recipe_path, overrides, launchers.slurm_request(rcp))
    procs, notes = launchers.local_processes(rcp, dry_run)
    if procs.nproc == 1 and rcp.launch.nnodes == 1:
        # One device: no launcher, no process group: the single-device fallback.
        argv = [sys.executable, *launchers.train_args(recipe_path, overrides)]
        return launchers.Command(argv, launchers.device_env(procs),
                                 notes + ["one device: no launcher"])
    launchers.check_rendezvous(rcp)  # several nodes: a head every node can reach
    make = {"torchrun": launchers.torchrun, "accelerate": launchers.accelerate,
            "deepspeed": launchers.deepspeed}[launcher]
    cmd = make(rcp, recipe_path, overrides, procs, dry_run=dry_run)
    return launchers.Command(cmd.argv, cmd.env, notes + cmd.notes)


def build_slurm_node(recipe_path: str, overrides: list[str],
                     environ: dict[str, str]) -> launchers.Command:
    """The torchrun one Slurm task runs on its node (called by slurm/train.sh via srun)."""
    nnodes = int_env("SLURM_NNODES", "SLURM_JOB_NUM_NODES", environ=environ) or 1
    node_rank = int_env("SLURM_NODEID", environ=environ) or 0
    job = environ.get("SLURM_JOB_ID", "0")
    # The allocation, not the recipe, says how many nodes there are and which one this is.
    rcp = recipe_load.load(recipe_path, [*overrides, f"launch.nnodes={nnodes}",
                                         f"launch.node_rank={node_rank}"])
    procs, notes = launchers.slurm_node_processes(rcp, environ)
    # Workers get SIGUSR1 (preemption warning) forwarded instead of torchrun dying of it,
    # and SHUTDOWN_TIMEOUT_S to write their checkpoint before SIGKILL.
    extra = ("--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
             "--shutdown_timeout", str(SHUTDOWN_TIMEOUT_S))
    cmd = launchers.torchrun(rcp, recipe_path, overrides, procs, rdzv_id=f"slurm-{job}",
                             extra=extra)
    return launchers.Command(cmd.argv, cmd.env, notes + cmd.notes)


# ---------------------------------------------------------------------------- CLI
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="ffdist launch", description="Run a recipe under torchrun / accelerate / "
        "deepspeed / sbatch, as its `launch` section says.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--launcher", choices=LAUNCHERS, help="default: launch.launcher")
    p.add_argument("--nnodes", type=int, help="launch.nnodes")
    p.add_argument("--node-rank", type=int, help="launch.node_rank (0 runs on the head)")
    p.add_argument("--rdzv-endpoint", help="launch.rdzv_endpoint, HOST:PORT of node 0")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command and environment, start nothing")
    p.add_argument("--slurm-node", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slurm-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)  # flags may come after key=value overrides
    overrides = list(args.overrides)
    for flag, key in (("nnodes", "nnodes"), ("node_rank", "node_rank"),
                      ("rdzv_endpoint", "rdzv_endpoint")):
        if getattr(args, flag) is not None:
            overrides.append(f"launch.{key}={getattr(args, flag)}")
    if args.launcher:
        overrides.append(f"launch.launcher={args.launcher}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    if args.slurm_check:
        return slurm_job.check_for_script(args.recipe, overrides, dict(os.environ))
    if args.slurm_node:
        cmd = build_slurm_node(args.recipe, overrides, dict(os.environ))
    else:
        cmd = build(args.recipe, overrides, args.launcher, args.dry_run)
    if cmd.argv[0] == "sbatch":  # a queued job may wait hours: refuse mistakes now
        rcp = recipe_load.load(args.recipe, overrides)
        slurm_job.check(rcp, rcp.launch.nnodes * len(rcp.launch.gpus) or None)
        if not args.dry_run:  # (sbatch's log goes there too)
            outputs.check_folder(rcp.run_dir, "ffdist launch", outputs.Place("output_dir"))
    if not args.dry_run and cmd.argv[0] != "sbatch":  # (a job's data is on its nodes)
        from ffdist.data.presence import check_present

        # absent data, a run folder that takes no files: one sentence here, before a
        # launcher and its N ranks start
        rcp = recipe_load.load(args.recipe, overrides)
        check_present(rcp.data, args.recipe)
        outputs.check_folder(rcp.run_dir, "ffdist launch", outputs.Place("output_dir"))
    for note in cmd.notes:
        print(f"# {note}", file=sys.stderr)
    print(cmd.render(), flush=True)
    if args.dry_run:
        return 0
    if args.slurm_node:  # torchrun, in this process: srun's signals reach it directly
        node = os.environ.get("SLURMD_NODENAME", "this node")
        return slurm_job.run_torchrun(cmd.argv[1:], cmd.env, f"node {node}")
    if cmd.argv[0] == "sbatch":
        return slurm_job.submit(cmd.argv, rcp.run_dir)
    env = {**os.environ, **cmd.env}
    try:
        return subprocess.call(cmd.argv, env=env)
    except FileNotFoundError:
        raise LaunchError(f"{cmd.argv[0]} not found on PATH; install it or pick another "
                          "--launcher.") from None
    except KeyboardInterrupt:  # the launcher got the Ctrl-C too and stops its workers
        return 130


if __name__ == "__main__":
    sys.exit(guard(main))  # the one error printer, as under `ffdist launch`
