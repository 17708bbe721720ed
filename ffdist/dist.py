"""Where we run: the device and the process group. With ffdist.world (which process this
is: rank, world size, launcher), the only modules that read the launcher's environment.

torchrun, `accelerate launch` and the `deepspeed` launcher all export RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT (deepspeed also passes `--local_rank=N`, which the
entry point accepts and ignores). `accelerate launch --multi_gpu` IS torchrun underneath
(torch.distributed.run) plus ACCELERATE_* variables: ffdist never builds an `Accelerator`,
so it joins the real process group on CPUs too (a plain `Accelerator()` on a CPU-only
machine would silently make N independent processes). Of accelerate's variables we honour
ACCELERATE_USE_CPU (stay on the CPU although GPUs exist) and ACCELERATE_MIXED_PRECISION
(`launcher_precision`, checked against the recipe by ffdist.precision), and refuse
ACCELERATE_USE_FSDP (`--use_fsdp`: ffdist's own strategy.name=fsdp shards the model).
A bare `srun` task has only SLURM_* variables and an `mpirun` task only OMPI_* / PMI_*
ones; for those we derive the rendezvous ourselves.
No launcher at all means one process on one device: the single-device fallback.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ffdist import rendezvous
from ffdist.errors import FfdistError, LaunchError
from ffdist.world import int_env, world_from_env

if TYPE_CHECKING:
    import torch

    from ffdist.recipe import LaunchConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    launcher: str
    """torchrun | accelerate | deepspeed | slurm | mpi | none: who started this process."""
    launcher_precision: str | None = None
    """bf16/fp16/fp8 asked of `accelerate launch --mixed_precision` (None: not asked)."""

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launcher_precision() -> str | None:
    """`accelerate launch --mixed_precision X` (or the config file's mixed_precision) exports
    ACCELERATE_MIXED_PRECISION; "no" is also its silent default, so it means "not asked"."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    return None if value in ("", "no") else value


def refuse_launcher_sharding() -> None:
    """`accelerate launch --use_fsdp` (or `distributed_type: FSDP` in its config) exports
    ACCELERATE_USE_FSDP for an Accelerator to shard the model; ffdist builds none and shards
    the model itself (strategy.name=fsdp), so the flag and its FSDP_* options would be
    silently ignored: refused instead, before any process group exists."""
    if _truthy("ACCELERATE_USE_FSDP"):
        raise LaunchError("accelerate launch --use_fsdp (ACCELERATE_USE_FSDP) has no effect on "
                          "ffdist, which shards the model itself: drop the flag (or "
                          "distributed_type: FSDP in the accelerate config) and set "
                          "strategy.name=fsdp in the recipe (strategy.reshard_after_forward, "
                          "strategy.fsdp_offload replace accelerate's FSDP options).")


def _rendezvous_for(launcher: str) -> None:
    """srun/mpirun do not export MASTER_ADDR/PORT the way torchrun does: derive them."""
    if launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                                 text=True, check=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise LaunchError(f"Slurm task without MASTER_ADDR and `scontrol show hostnames` "
                              f"failed ({e}); export MASTER_ADDR=<head node> in the job "
                              "script.") from None
        os.environ["MASTER_ADDR"] = out[0]
    if launcher == "slurm" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + (int_env("SLURM_JOB_ID") or 0) % 20000)
    if launcher == "mpi":
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", "29500")


# ---------------------------------------------------------------------------- devices
# `launch.device` (recipe) decides where ranks run; the counts below are what there is.
# `ffdist launch` asks before it starts anything (visible_gpu_count), every rank asks again
# before a process group exists (cuda_device_count): both go through device_for().

def gpu_count() -> int:
    """Physical GPUs on this node: NVML (no CUDA context, cheap), else torch.cuda."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no library: ask torch, which says 0 on a CPU machine
        import torch

        return torch.cuda.device_count()


def visible_ids() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list (None: unset). CUDA stops at the first invalid entry;
    a negative id is the usual way to hide every GPU ("-1"), so the list ends there."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = []
    for entry in (v.strip() for v in visible.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids


def visible_gpu_count() -> int:
    """GPUs the processes started from here may use, without creating a CUDA context: an
    inherited CUDA_VISIBLE_DEVICES is respected (NVML counts every GPU of the node and would
    widen it), else the node's GPUs. Numeric ids count up to the first one the node does
    not have, as CUDA reads them; UUIDs and MIG names are taken as listed."""
    ids = visible_ids()
    if ids is None:
        return gpu_count()
    if not ids or not ids[0].isdigit():
        return len(ids)
    physical = gpu_count()
    return next((i for i, g in enumerate(ids) if not g.isdigit() or int(g) >= physical),
                len(ids))


def cuda_device_count() -> int:
    """GPUs torch can use in this process (0 when CUDA is unusable). Neither call creates
    a CUDA context: torch initialises CUDA lazily, at the first tensor or stream."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible_text() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"


def device_for(want: str, nproc: int, visible: int, started: str, fix: str) -> str:
    """'cuda' or 'cpu' for `nproc` processes on a node with `visible` GPUs, as launch.device
    asks (auto | cuda | cpu). `started` says where nproc comes from and `fix` how to start
    fewer, for the error. auto never falls back to the CPU when GPUs exist but are too few:
    a GPU job would silently run 100x slower; the user decides (fewer processes, or cpu)."""
    if want == "cpu":
        return "cpu"
    if visible == 0:
        if want == "cuda":
            raise LaunchError(f"launch.device=cuda but no GPU is visible here ({_visible_text()}"
                              "); run where a GPU is visible, or set launch.device=cpu (or "
                              "auto) for CPU ranks.")
        return "cpu"
    if nproc > visible:
        raise LaunchError(f"{started} asks for {nproc} GPU processes on this node, but only "
                          f"{visible} GPU(s) are visible ({_visible_text()}); {fix}, or set "
                          f"launch.device=cpu to run {nproc} CPU ranks.")
    return "cuda"


def pick_device(local_rank: int, local_world: int = 1, want: str = "auto",
                gpus: list[int] | tuple[int, ...] = (), launcher: str = "none") -> torch.device:
    """This rank's device: cuda:<local_rank> or the CPU, as launch.device says.

    launch.device=cpu touches nothing of CUDA (no context, no count). accelerate's
    ACCELERATE_USE_CPU (`accelerate launch --cpu`, `use_cpu: true`) means cpu for auto and
    contradicts cuda. Every rank of a node checks the node's process count, so that all of
    them fail alike before any process group exists (none waits for a peer that died)."""
    import torch

    if _truthy("ACCELERATE_USE_CPU"):
        if want == "cuda":
            raise LaunchError("ACCELERATE_USE_CPU is set (accelerate launch --cpu or use_cpu: "
                              "true) but the recipe says launch.device=cuda; drop one of them.")
        want = "cpu"
    if want == "cpu":
        return torch.device("cpu")
    ranks = max(local_world, local_rank + 1)
    check_gpus(list(gpus), ranks)  # GPUs named by id must exist, also where there are none
    count = cuda_device_count()
    started = f"{launcher} (local world size {ranks})" if launcher != "none" else "this process"
    if device_for(want, ranks, count, started, f"start at most {count} per node (torchrun "
                  f"--nproc_per_node {count}, or launch.nproc={count} with ffdist launch)") == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_gpus(gpus: list[int], ranks: int = 1) -> None:
    """launch.gpus must name GPUs that exist, and be the GPUs the ranks of this node get.
    Ids are physical (what CUDA_VISIBLE_DEVICES takes): `ffdist launch` exports them there,
    so rank r runs on the r-th visible GPU; a bare launcher without that variable would put
    launch.gpus=[2] on GPU 0, which is refused rather than done silently."""
    if not gpus:
        return
    ids = visible_ids()
    if ids is not None and not all(i.isdigit() for i in ids):
        return  # GPU UUIDs / MIG names: nothing to compare ids with
    available = [int(i) for i in ids] if ids is not None else list(range(cuda_device_count()))
    missing = [g for g in gpus if g not in available]
    if missing:
        have = (f"GPU ids {available}" if available else "no GPU")
        raise LaunchError(f"launch.gpus={gpus} names GPU {missing[0]}, but this machine has "
                          f"{have} visible; use ids from that list, or launch.gpus=[] for "
                          "all of them (launch.device=cpu for CPU ranks).")
    used = available[:ranks]
    if sorted(used) != sorted(gpus):
        raise LaunchError(f"launch.gpus={gpus}, but the {ranks} process(es) of this node would "
                          f"run on GPU(s) {used} ({_visible_text()}): start them with "
                          "`ffdist launch` (it exports launch.gpus as CUDA_VISIBLE_DEVICES), or "
                          f"set CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} yourself.")


def init(launch: LaunchConfig | None = None) -> DistInfo:
    """Read the environment, pick the device (launch.device, launch.gpus), then join the
    process group if there is one: device errors come first, so every rank exits alike."""
    import torch.distributed as dist

    if launch is None:
        from ffdist.recipe import LaunchConfig

        launch = LaunchConfig()
    rank, local_rank, world, local_world, launcher = world_from_env()
    refuse_launcher_sharding()
    device = pick_device(local_rank, local_world, launch.device, launch.gpus, launcher)
    if device.type == "cpu":
        _deepspeed_on_cpu()
    if world > 1 and not dist.is_initialized():
        _rendezvous_for(launcher)
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        # nccl for GPUs; gloo is the one CPU backend that all launchers support.
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=launch.pg_timeout)
        global _meeting
        # every rank arrives (or one sentence after launch.rdzv_timeout), then the group
        _meeting, kwargs["store"] = rendezvous.join(rank, world, local_rank, local_world,
                                                    launch.rdzv_timeout, timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timeout, **kwargs)
    # Threads per rank (launch.threads) are decided with the rest of the run:
    # ffdist.assemble.resolve_for, by ffdist.threads' rule.
    return DistInfo(rank, local_rank, world, local_world, device, launcher, launcher_precision())


def _deepspeed_on_cpu() -> None:
    """DeepSpeed picks its accelerator by itself (CUDA whenever torch sees a GPU), at its
    import: CPU ranks on a GPU machine must say so first, or ZeRO would move to cuda:0."""
    chosen = os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if chosen != "cpu":
        raise LaunchError(f"DS_ACCELERATOR={chosen} but this rank runs on the CPU "
                          "(launch.device, or no GPU visible); unset DS_ACCELERATOR or set "
                          "launch.device=cuda.")


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group for libraries that need one even alone (DeepSpeed under
    `python -m ffdist.train`): an in-memory store, no port, nothing to rendezvous with."""
    import torch.distributed as dist

    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # DeepSpeed asserts LOCAL_RANK is set
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)


def shutdown() -> None:
    """The end of every command's process group. Objects in reference cycles (DDP's reducer,
    an evaluation's all-reduce) hold gloo work objects; freed at interpreter exit, after the
    group is gone, they were seen to abort a rank ("terminate called without an active
    exception", train and a 2-rank eval): collect them first, then destroy the group."""
    import gc

    import torch.distributed as dist

    global _meeting
    _meeting = None
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


_meeting: rendezvous.Meeting | None = None
"""Where this process's ranks met (dist.init), for the decisions they take at start."""


def decide(phase: str, value: Any, judge: Callable[[list[Any]], Any], what: str) -> Any:
    """Every rank hands in `value`; rank 0 decides judge(values, in rank order); every rank
    returns the decision. Through the store, with launch.rdzv_timeout and progress lines
    (ffdist.rendezvous): for what the ranks settle at start, before any collective. One
    process: judge([value])."""
    import torch.distributed as dist

    global _meeting
    if _meeting is None and dist.is_initialized() and dist.get_world_size() > 1:
        from ffdist.recipe import LaunchConfig  # a group built elsewhere (a test's own)

        _meeting = rendezvous.on_default_store(dist.get_rank(), dist.get_world_size(),
                                               LaunchConfig().rdzv_timeout)
    if _meeting is None:
        return judge([value])
    return _meeting.decide(phase, value, judge, what)


def primary_check(info: DistInfo, check: Callable[[], None], phase: str, what: str) -> None:
    """Run `check` on the primary rank only (what only it writes: a report, bench.json) and
    raise its user error on every rank, so that no rank goes on to wait in a collective
    for a primary that stopped (`decide`: a deadline, no collective)."""
    refusal = None
    if info.is_primary:
        try:
            check()
        except FfdistError as e:
            refusal = str(e)
    refusal = decide(phase, refusal, lambda verdicts: verdicts[0], what)
    if refusal:
        raise RefusedByPrimary(refusal)


class RefusedByPrimary(FfdistError):
    """The primary rank's user error, raised on every rank (printed once, by rank 0)."""

    same_on_all_ranks = True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
