"""Which process this is, from the launcher's environment: rank, local rank, world size,
launcher (`world_from_env`); and the file in which torchrun's agent looks for a worker's
failure reason (`report_to_launcher`).

torchrun, `accelerate launch` and the `deepspeed` launcher export RANK / LOCAL_RANK /
WORLD_SIZE; a bare `srun` task has only SLURM_* variables and an `mpirun` task only
OMPI_* / PMI_* ones. ffdist.dist builds the device and the process group on top of this.
It imports nothing of ffdist, so that the error printer (ffdist.errors) can ask it which
rank is speaking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class EnvError(ValueError):
    """A launcher variable that is not what launchers write (WORLD_SIZE=two). Not an
    FfdistError (this module imports nothing of ffdist): ffdist.errors.guard prints it as
    the user error it is, one sentence, exit 2."""


def int_env(*names: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The first of `names` that is set, as an integer (None: none is set); EnvError
    naming the variable when it holds something else. `environ`: another mapping than
    os.environ (ffdist launch reads a Slurm job's copy)."""
    for n in names:
        v = (os.environ if environ is None else environ).get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                shown = v if len(v) <= 40 and v.isprintable() else repr(v[:40])
                raise EnvError(f"the environment variable {n}={shown} is not a whole number; "
                               "launchers set it to one: unset it, or start ffdist with "
                               "torchrun or `ffdist launch`.") from None
    return None


def world_from_env() -> tuple[int, int, int, int, str]:
    """(rank, local_rank, world_size, local_world_size, launcher) from the environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate, deepspeed launcher
        world = int_env("WORLD_SIZE") or 0
        # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE (and CROSS_RANK).
        local_world = int_env("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
        return _checked(int_env("RANK") or 0, int_env("LOCAL_RANK") or 0, world, local_world,
                        _rank_launcher(), "RANK", "WORLD_SIZE")
    slurm_world = int_env("SLURM_NTASKS")
    if slurm_world and slurm_world > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        local_world = int_env("SLURM_NTASKS_PER_NODE") or max(1, slurm_world // (
            int_env("SLURM_NNODES") or 1))
        return _checked(int_env("SLURM_PROCID") or 0, int_env("SLURM_LOCALID") or 0,
                        slurm_world, local_world, "slurm", "SLURM_PROCID", "SLURM_NTASKS")
    mpi_world = int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
    if mpi_world and mpi_world > 1:
        rank = int_env("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
        local = int_env("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        local_world = int_env("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or mpi_world
        return _checked(rank, local, mpi_world, local_world, "mpi", "the MPI rank",
                        "the MPI world size")
    return 0, 0, 1, 1, "none"


def _checked(rank: int, local_rank: int, world: int, local_world: int, launcher: str,
             rank_name: str, world_name: str) -> tuple[int, int, int, int, str]:
    """A world a process group can be built from: 1 or more ranks, this one among them."""
    if world < 1:
        raise EnvError(f"{world_name}={world} in the environment: a world has 1 or more "
                       "processes; unset it, or start ffdist with torchrun or `ffdist launch`.")
    if not 0 <= rank < world:
        raise EnvError(f"{rank_name}={rank} in the environment, but {world_name}={world}: "
                       f"ranks go from 0 to {world - 1}; start ffdist with torchrun or "
                       "`ffdist launch`, which set both.")
    return rank, max(local_rank, 0), world, max(local_world, 1), launcher


def _rank_launcher() -> str:
    """Which launcher exported RANK/WORLD_SIZE (for logs; all three rendezvous alike)."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        return "accelerate"
    if "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ:
        return "deepspeed"
    return "torchrun"


def report_to_launcher(message: str) -> None:
    """Leave `message` where torchrun's agent looks for a worker's failure reason (the
    file named by TORCHELASTIC_ERROR_FILE): its summary then prints our one sentence."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # a nicer summary is not worth failing over
