"""The command lines of torchrun, `accelerate launch`, the `deepspeed` launcher and `sbatch
slurm/train.sh` for a recipe, and the processes and devices they start on a node.

Each builder returns an argv LIST (never a shell string) plus the environment variables to
add (CUDA_VISIBLE_DEVICES, NCCL/GLOO_SOCKET_IFNAME). `ffdist launch` runs them, `ffdist
plan` asks how many processes a node would start (`local_processes`), and ffdist.slurm
asks the same of a Slurm allocation (`slurm_node_processes`).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ffdist import dist
from ffdist.errors import LaunchError
from ffdist.recipe import Recipe
from ffdist.world import int_env

SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sh"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the caller's environment."""
    notes: list[str] = field(default_factory=list)
    """Why the command looks the way it does (printed with --dry-run)."""

    def render(self) -> str:
        """One copy-pasteable shell line: `VAR=value ... argv` with every word quoted."""
        env = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join(env + [shlex.join(self.argv)])


@dataclass(frozen=True)
class Processes:
    """What runs on this node: processes, the GPU ids they see (None: the visible ones, or
    CPU ranks), and where they run."""

    nproc: int
    gpus: list[int] | None
    threads: int | None = None
    """OMP_NUM_THREADS per CPU rank, when the allocation says how many cores we have."""
    device: str | None = None
    """cuda | cpu, decided for this node by local_processes (launch.device); None where the
    ranks alone decide (Slurm allocations)."""


# ---------------------------------------------------------------------------- devices
def check_gpus(gpus: list[int], count: int) -> None:
    missing = [g for g in gpus if g >= count]
    if missing:
        raise LaunchError(
            f"launch.gpus={gpus}: GPU id(s) {missing} do not exist on this node, which has "
            + (f"{count} GPU(s) (ids 0..{count - 1}); pick ids from `nvidia-smi -L`." if count
               else "no GPU; set launch.device=cpu (and launch.nproc=N for N CPU ranks)."))


def local_processes(rcp: Recipe, dry_run: bool) -> tuple[Processes, list[str]]:
    """Processes and devices for this node from launch.device / launch.gpus / launch.nproc,
    checked against the GPUs here before anything starts (exit 2 when they do not fit)."""
    lc = rcp.launch
    if lc.device == "cpu":
        n = lc.nproc or 1
        notes = [f"launch.device=cpu: {n} CPU rank(s)"
                 + ("" if lc.nproc else " (launch.nproc=null: one)")]
        if lc.gpus:
            notes.append(f"launch.gpus={list(lc.gpus)} ignored: launch.device=cpu")
        return Processes(n, None, device="cpu"), notes
    if lc.gpus:
        gpus = list(lc.gpus)
        if lc.nproc is not None and lc.nproc != len(gpus):
            raise LaunchError(
                f"launch.nproc={lc.nproc} but launch.gpus={gpus} lists {len(gpus)} GPU(s), and "
                f"each process gets one of them; set launch.nproc=null (or {len(gpus)}), or "
                f"list {lc.nproc} GPU id(s).")
        if dry_run:
            return Processes(len(gpus), gpus, device="cuda"), [
                "launch.gpus not checked against this node (--dry-run)"]
        check_gpus(gpus, dist.gpu_count())
        return Processes(len(gpus), gpus, device="cuda"), [f"launch.gpus={gpus}: one process each"]
    count = dist.visible_gpu_count()
    n = lc.nproc or max(count, 1)
    device = dist.device_for(lc.device, n, count, f"launch.nproc={lc.nproc}",
                             f"use launch.nproc={count} or null (one per GPU)")
    if device == "cuda":
        how = f"launch.nproc={lc.nproc}" if lc.nproc else "launch.nproc=null: one per GPU"
        return Processes(n, None, device="cuda"), [
            f"launch.device={lc.device}: {n} process(es) on {n} of {count} visible GPU(s) ({how})"]
    how = f"launch.nproc={lc.nproc}" if lc.nproc else "launch.nproc=null: one"
    return Processes(n, None, device="cpu"), [f"no GPU visible: {n} CPU rank(s) ({how})"]


def slurm_node_processes(rcp: Recipe, environ: dict[str, str]) -> tuple[Processes, list[str]]:
    """Processes on this node of a Slurm allocation.

    GPUs: what Slurm gave this node (SLURM_GPUS_ON_NODE, or the CUDA_VISIBLE_DEVICES it
    set, or all the node has). No GPU: launch.nproc CPU ranks, but never more than the
    cores Slurm allocated on this node (SLURM_CPUS_ON_NODE), and the allocated cores are
    split between the ranks through OMP_NUM_THREADS, so a 32-core allocation with 2 ranks
    runs 16 threads each instead of oversubscribing or idling.
    """
    notes = []
    if rcp.launch.gpus:
        notes.append("launch.gpus is ignored under Slurm: the allocation decides the GPUs")
    gpus = int_env("SLURM_GPUS_ON_NODE", environ=environ) or 0
    if not gpus and environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        gpus = len([g for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()])
    if not gpus:
        gpus = dist.gpu_count()
    if rcp.launch.device == "cpu":
        gpus = 0  # CPU ranks on a GPU node: the recipe says so
    if gpus:
        return Processes(gpus, None), notes + [f"{gpus} GPU(s) on this node from the allocation"]
    cpus = int_env("SLURM_CPUS_ON_NODE", environ=environ) or os.cpu_count() or 1
    want = rcp.launch.nproc or 1  # null: one process per device, the CPU is one
    nproc = min(want, cpus)
    if nproc < want:
        notes.append(f"launch.nproc={want} capped to the {cpus} CPU(s) allocated "
                     "on this node (ask for more with sbatch --cpus-per-task)")
    return Processes(nproc, None, max(1, cpus // nproc)), notes + [
        f"no GPU: {nproc} CPU rank(s) x {max(1, cpus // nproc)} thread(s)"]


def interface_ipv4(ifname: str) -> str | None:
    """IPv4 address of a network interface, or None when it does not exist here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # SIOCGIFADDR: no subprocess, no `ip` parsing
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


# ---------------------------------------------------------------------------- commands
def _bin(name: str) -> str:
    """A console script of this Python's environment (a venv need not be activated)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def train_args(recipe_path: str, overrides: list[str]) -> list[str]:
    return ["-m", "ffdist.train", recipe_path, *overrides]


def _net_env(rcp: Recipe, dry_run: bool, notes: list[str]) -> tuple[dict[str, str], list[str]]:
    """Socket interface variables and, for torchrun, the --local_addr of that interface."""
    ifname = rcp.launch.socket_ifname
    if not ifname:
        return {}, []
    env = {"NCCL_SOCKET_IFNAME": ifname, "GLOO_SOCKET_IFNAME": ifname}
    addr = interface_ipv4(ifname)
    if addr is None and not dry_run:
        raise LaunchError(f"launch.socket_ifname={ifname!r}: no such network interface with an "
                          "IPv4 address on this node; list them with `ip -br addr`.")
    if addr is None:
        notes.append(f"interface {ifname} not on this host: --local_addr left out")
        return env, []
    # The rendezvous publishes this address to the other nodes; without it torchrun uses
    # the hostname, which on some hosts resolves to 127.0.0.1.
    return env, ["--local_addr", addr]


def check_rendezvous(rcp: Recipe) -> None:
    """Several nodes need a rendezvous host every node reaches: a loopback endpoint (the
    default, localhost) reaches this machine only, and the first node would wait
    launch.rdzv_timeout for nodes that can never come."""
    lc = rcp.launch
    host = lc.rdzv_endpoint.rsplit(":", 1)[0].strip("[]").lower()
    if lc.nnodes > 1 and (host in ("localhost", "ip6-localhost", "::1")
                          or host.startswith("127.")):
        raise LaunchError(
            f"launch.nnodes={lc.nnodes} but launch.rdzv_endpoint={lc.rdzv_endpoint} names this "
            "machine only, so the other nodes cannot join and the first node would wait "
            f"launch.rdzv_timeout={lc.rdzv_timeout} s for them; set launch.rdzv_endpoint="
            "HOST:PORT (or --rdzv-endpoint) to the first node's address, the same on every "
            "node.")


def torchrun(rcp: Recipe, recipe_path: str, overrides: list[str], procs: Processes,
             dry_run: bool = False, rdzv_id: str | None = None,
             extra: tuple[str, ...] = ()) -> Command:
    lc, notes = rcp.launch, []
    env, local_addr = _net_env(rcp, dry_run, notes)
    argv = [_bin("torchrun"), "--nnodes", str(lc.nnodes), "--nproc_per_node", str(procs.nproc)]
    if lc.nnodes == 1:
        argv += ["--standalone"]  # local rendezvous on a free port: runs never collide
    else:
        # c10d: the store lives in node 0's agent. is_host says so explicitly, because a
        # hostname that resolves to 127.0.0.1 defeats torchrun's own "is this me?" test.
        argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", lc.rdzv_endpoint,
                 "--rdzv_id", rdzv_id or f"ffdist-{rcp.name}",
                 "--rdzv_conf", f"timeout={lc.rdzv_timeout},is_host={int(lc.node_rank == 0)}"]
        argv += local_addr
    if lc.max_restarts:
        argv += ["--max_restarts", str(lc.max_restarts)]
    argv += [*extra, *train_args(recipe_path, overrides)]
    return Command(argv, device_env(procs) | env, notes)


def device_env(procs: Processes) -> dict[str, str]:
    env = {}
    if procs.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, procs.gpus))
    if procs.threads is not None:
        env["OMP_NUM_THREADS"] = str(procs.threads)
    return env


def accelerate(rcp: Recipe, recipe_path: str, overrides: list[str], procs: Processes,
               dry_run: bool = False) -> Command:
    lc, notes = rcp.launch, []
    env, _ = _net_env(rcp, dry_run, notes)
    host, port = lc.rdzv_endpoint.rsplit(":", 1)
    argv = [_bin("accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(procs.nproc * lc.nnodes), "--num_machines", str(lc.nnodes),
            "--mixed_precision", "no", "--dynamo_backend", "no"]  # the recipe decides both
    if lc.nnodes > 1:
        argv += ["--machine_rank", str(lc.node_rank), "--main_process_ip", host,
                 "--main_process_port", port, "--same_network"]
    if procs.device == "cpu":
        # accelerate only starts a gloo world on CPUs when told to use the CPU; without it
        # the ranks silently train as independent processes.
        env["ACCELERATE_USE_CPU"] = "1"
    if lc.max_restarts:
        argv += ["--max_restarts", str(lc.max_restarts)]
    argv += [*train_args(recipe_path, overrides)]
    return Command(argv, device_env(procs) | env, notes)


def deepspeed(rcp: Recipe, recipe_path: str, overrides: list[str], procs: Processes,
              dry_run: bool = False) -> Command:
    lc, notes = rcp.launch, []
    if lc.nnodes > 1:
        # Its multi-node mode needs a hostfile naming every node (even with --no_ssh it
        # builds the world from one); torchrun runs strategy.name=deepspeed just as well.
        raise LaunchError(
            f"launch.nnodes={lc.nnodes} with the deepspeed launcher: it spans nodes only with "
            "a hostfile, so run `deepspeed --hostfile FILE ...` on the first node (see "
            "launch/deepspeed/hostfile.example) or use --launcher torchrun, which runs "
            "strategy.name=deepspeed the same way.")
    env, _ = _net_env(rcp, dry_run, notes)
    argv = [_bin("deepspeed"), *_deepspeed_devices(procs, env, notes)]
    argv += ["--module", "ffdist.train", recipe_path, *overrides]
    return Command(argv, env, notes)


def _deepspeed_devices(procs: Processes, env: dict[str, str], notes: list[str]) -> list[str]:
    """The deepspeed launcher's device flags. It sets CUDA_VISIBLE_DEVICES for its ranks
    itself: from --include, or 0..N-1 for --num_gpus N, dropping an inherited one (so
    that is passed on as --include)."""
    if procs.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # its own device count and the ranks' engine: CPU
        return ["--num_gpus", str(procs.nproc)]  # on the CPU: the number of ranks
    ids = [str(g) for g in procs.gpus] if procs.gpus is not None else dist.visible_ids()
    if ids is not None and all(i.isdigit() for i in ids):
        return ["--include", "localhost:" + ",".join(ids[:procs.nproc])]
    if ids is not None:
        notes.append("CUDA_VISIBLE_DEVICES holds GPU UUIDs, which the deepspeed launcher "
                     "cannot take: it will use GPUs 0..N-1")
    return ["--num_gpus", str(procs.nproc)]


def slurm_request(rcp: Recipe) -> Processes:
    """What `ffdist launch` asks Slurm for per node: len(launch.gpus) GPUs, else
    launch.nproc CPU ranks (on a GPU node without launch.gpus the job uses all its GPUs)."""
    if rcp.launch.gpus and rcp.launch.device != "cpu":
        return Processes(len(rcp.launch.gpus), list(rcp.launch.gpus))
    return Processes(rcp.launch.nproc or 1, None)


def slurm(rcp: Recipe, recipe_path: str, overrides: list[str], procs: Processes) -> Command:
    """`sbatch slurm/train.sh RECIPE ...` with the nodes and devices of the recipe."""
    lc = rcp.launch
    argv = ["sbatch", "--job-name", rcp.name, "--nodes", str(lc.nnodes),
            "--output", str(rcp.run_dir / "slurm-%j.out")]
    if procs.gpus is not None:
        argv += ["--gpus-per-node", str(procs.nproc)]
    else:
        argv += ["--cpus-per-task", str(procs.nproc)]  # one task per node, a core per rank
    argv += [str(SLURM_SCRIPT), recipe_path, *overrides]
    return Command(argv, {}, [])
