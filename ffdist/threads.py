"""How much of the CPU one process uses: its intra-op threads and its loader workers
(launch.threads, data.num_workers), from the cores it may use.

`ffdist.assemble.resolve` decides both once per run (`Resolved.threads`, `Resolved.workers`,
with the reason the start line prints); `ffdist.assemble.resolve_for` applies the threads to
this process before any data or model is built. The rule for `auto` (docs/performance.md
has the measurements it comes from):

- cores = the CPUs this process may run on (`os.sched_getaffinity`: taskset, Slurm's and
  the container's cpusets), lowered to the cgroup CPU quota when there is one (cgroup v2
  `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`: Docker's `--cpus`, Kubernetes'
  limits), rounded down: a 1.5-core quota throttles a second busy thread.
- per rank = cores // ranks of this node (LOCAL_WORLD_SIZE).
- workers (data.num_workers=auto): none for data held in memory (the source declares it:
  a batch is one indexing, workers would only add copies); else per rank - 1, at most 8.
  A number larger than the cores per rank is capped there (one line says so: otherwise
  torch warns once per DataLoader).
- threads (launch.threads=auto): OMP_NUM_THREADS when it is set (the user's or the
  launcher's choice: torchrun sets 1 per rank when it is unset); else on the CPU
  min(per rank - workers, micro-batch pixels // PIXELS_PER_THREAD), at least 1: spare cores
  are left idle when each operation is too small to split (intra-op threads meet at a
  barrier after every operation; with little work per operation the barrier costs more
  than the split saves, and a thread that loses its core to another process stalls every
  operation). On a GPU the CPU only feeds the device: per rank - workers.
- launch.threads=N is used as given, over OMP_NUM_THREADS.
Interop threads (torch.set_num_interop_threads) are left alone: an eager training step
runs its operations one after another, so only intra-op threads do work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PIXELS_PER_THREAD = 65_536
"""Pixels of one micro-batch (images x side^2) that keep one more intra-op thread busy:
64 images of 32x32 per thread. Measured on the shipped recipes (docs/performance.md)."""
MAX_AUTO_WORKERS = 8
"""data.num_workers=auto never starts more loader workers per rank than this."""

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cores:
    count: int
    why: str
    """How the count was found, for the start line: '2 cores', '1 core (affinity, of 2)'."""


@dataclass(frozen=True)
class Share:
    """What resolve decided for this process."""

    threads: int
    workers: int
    why: str
    """The start line's words: '2 threads (auto: 2 cores, 1 rank)'."""
    workers_note: str | None = None
    """A sentence when data.num_workers was capped (printed once)."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup and its parents, in cores (the smallest one
    found), or None without a quota. cgroup v2: `cpu.max` ("max 100000" or "150000 100000");
    v1: `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    found: list[float] = []
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            folders = [root, root / "unified"]  # unified: v2 beside v1 (hybrid mode)
            quota_of = _v2_quota
        elif "cpu" in controllers.split(","):
            folders = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            quota_of = _v1_quota
        else:
            continue
        inside = path.strip("/")
        for base in folders:
            here = base / inside if inside else base
            while True:  # this cgroup and every parent up to the mount point
                quota = quota_of(here)
                if quota is not None:
                    found.append(quota)
                if here == base:
                    break
                here = here.parent
    return min(found) if found else None


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if not quota or not period or not period.isdigit() or quota.startswith("-"):
        return None
    if not quota.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def usable_cores() -> Cores:
    """The cores this process may use: its affinity mask, lowered to its cgroup quota."""
    machine = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: every core
        affinity = machine
    quota = cgroup_quota()
    if quota is not None and int(quota) < affinity:
        n = max(1, int(quota))
        return Cores(n, f"{_plural(n, 'core')} (cgroup CPU quota {quota:g})")
    if affinity < machine:
        return Cores(affinity, f"{_plural(affinity, 'core')} (affinity, of {machine})")
    return Cores(affinity, _plural(affinity, "core"))


def omp_threads() -> int | None:
    """OMP_NUM_THREADS as a positive count, or None when unset or not a count (torch then
    ignores it too)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def decide(threads: int | str, workers: int | str, *, cpu: bool, local_world: int,
           pixels: int, in_memory: bool, cores: Cores | None = None,
           omp: int | None = None) -> Share:
    """launch.threads and data.num_workers for one rank, by the rule of the module
    docstring. `pixels`: the pixels of one micro-batch of this rank (micro x side^2);
    `in_memory`: the data source holds its images in memory."""
    cores = cores or usable_cores()
    ranks = max(1, local_world)
    per_rank = max(1, cores.count // ranks)
    where = f"{cores.why}, {_plural(ranks, 'rank')}"
    note = None
    if workers == "auto":
        n_workers = 0 if in_memory else min(MAX_AUTO_WORKERS, per_rank - 1)
    else:
        n_workers = int(workers)
        if n_workers > per_rank:
            note = (f"data.num_workers={n_workers} is more than the cores this rank may use "
                    f"({where}): {_plural(per_rank, 'loader worker')} per rank instead")
            n_workers = per_rank
    if threads != "auto":
        return Share(int(threads), n_workers, f"{_plural(int(threads), 'thread')} "
                     "(launch.threads)", note)
    if omp is not None:
        return Share(omp, n_workers, f"{_plural(omp, 'thread')} (OMP_NUM_THREADS={omp})", note)
    budget = max(1, per_rank - n_workers)
    why = where + (f", {_plural(n_workers, 'loader worker')}" if n_workers else "")
    if not cpu:
        return Share(budget, n_workers, f"{_plural(budget, 'thread')} (auto: {why})", note)
    useful = max(1, pixels // PIXELS_PER_THREAD)
    if useful < budget:
        why += f"; {pixels:,} pixels per micro-batch keep {useful} busy"
    n = min(budget, useful)
    return Share(n, n_workers, f"{_plural(n, 'thread')} (auto: {why})", note)


def apply(threads: int) -> None:
    """This process's intra-op threads (before the data and the model are built)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
