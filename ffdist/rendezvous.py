"""How the ranks meet at start, with a deadline: nothing ffdist waits for at start waits
silently or without end.

`join` builds the key-value store the process group is built on (rank 0 hosts it at
MASTER_ADDR:MASTER_PORT, or torchrun's agent does) and waits until every rank has
arrived; `Meeting.decide` is how the ranks agree on something after that (the recipe, the
run directory's verdict, the shared output_dir): every rank hands rank 0 a value, rank 0
decides, every rank learns the decision. Both go through the store, not through a
collective of the process group, so that:

- every wait has a deadline, launch.rdzv_timeout (the process group's own collectives
  wait launch.pg_timeout), and while waiting the primary rank says every PROGRESS_S what
  it waits for ("waiting for 1 of 2 ranks at 10.0.0.1:29500 (rank 1), 30 s of 900 s");
- a rank that never comes ends every rank that did with one sentence naming it and the
  address waited on (exit 2), not a DistStoreError traceback after half an hour;
- nothing a rank decides depends on a collective that ranks started with different
  recipes would call differently (a batch size that differs makes gloo abort).

Keys carry the torchrun restart count (torchrun's agent may keep one store for the whole
job: an earlier attempt's keys must not count) and a sequence number per decision.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ffdist.errors import LaunchError
from ffdist.world import int_env

PROGRESS_S = 30.0
"""A waiting rank says what it waits for this often (a quarter of a shorter deadline)."""
LIMIT_KEY = "launch.rdzv_timeout"


class PeerMissing(LaunchError):
    """Some rank did not arrive in time; rank 0 decided it, every rank that arrived says it."""

    same_on_all_ranks = True


class MeetingFailed(LaunchError):
    """This rank could not reach rank 0, or rank 0 did not decide in time (per rank)."""


def _seconds(s: float) -> str:
    return f"{s:.0f} s"


@dataclass
class Meeting:
    """The ranks' meeting point at start: the store, who this is, the deadline per wait."""

    store: Any
    rank: int
    world: int
    local_rank: int
    where: str
    """MASTER_ADDR:MASTER_PORT, for messages."""
    limit_s: float
    prefix: str
    seq: int = 0

    def decide(self, phase: str, value: Any, judge: Callable[[list[Any]], Any],
               what: str) -> Any:
        """Every rank hands in `value` (JSON); rank 0 calls judge(values in rank order) and
        every rank returns its result. `what` names the point, for messages ("the recipe
        check"). A rank missing at the deadline ends every rank that came (PeerMissing)."""
        self.seq += 1
        key = f"{self.prefix}/{self.seq}-{phase}"
        self.store.set(f"{key}/{self.rank}", json.dumps(value))
        self.store.add(f"{key}/n", 1)
        if self.rank == 0:
            return self._decide_as_primary(key, judge, what, first=phase == "arrive")
        # rank 0 decides at most limit_s after it arrives: wait for it to arrive, then for
        # its verdict (so a rank that came early does not give up before rank 0 does)
        wait_for(lambda: self.store.check([f"{key}/0"]),
                 lambda waited: f"waiting for rank 0 at {what}, {waited}",
                 lambda: MeetingFailed(
                     f"rank 0 did not reach {what} within {_seconds(self.limit_s)} "
                     f"({LIMIT_KEY}={self.limit_s:g}), waited for at {self.where}; it may be "
                     "stuck (a file system, a data set) or gone: see its output."),
                 self.limit_s, speak=self.local_rank == 0)
        wait_for(lambda: self.store.check([f"{key}/verdict"]), str,
                 lambda: MeetingFailed(f"rank 0 reached {what} but gave no verdict within "
                                       f"{_seconds(self.limit_s)}; see its output."),
                 self.limit_s + 10, speak=False)
        verdict = json.loads(self.store.get(f"{key}/verdict"))
        self.store.add(f"{key}/ack", 1)
        if "missing" in verdict:
            raise PeerMissing(verdict["missing"])
        return verdict["value"]

    def _decide_as_primary(self, key: str, judge: Callable[[list[Any]], Any],
                           what: str, first: bool) -> Any:
        def count() -> int:
            return self.store.add(f"{key}/n", 0)

        def progress(waited: str) -> str:
            missing = self._missing(key)
            return (f"waiting for {len(missing)} of {self.world} ranks at {what} "
                    f"({_ranks(missing)}), {waited}")

        try:
            wait_for(lambda: count() >= self.world, progress,
                     lambda: PeerMissing(self._missing_sentence(key, what, first)),
                     self.limit_s, speak=True)
        except PeerMissing as e:
            self._publish(key, {"missing": str(e)}, count())
            raise
        verdict = judge([json.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)])
        self._publish(key, {"value": verdict}, self.world)
        return verdict

    def _publish(self, key: str, verdict: dict, arrived: int) -> None:
        """Tell the ranks that came; before rank 0 goes on (and may exit, taking the store
        it hosts with it), they have read it: a few milliseconds, 5 s at most."""
        self.store.set(f"{key}/verdict", json.dumps(verdict))
        readers, deadline, pause = arrived - 1, time.monotonic() + 5.0, 0.0005
        while self.store.add(f"{key}/ack", 0) < readers and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.05)

    def _missing(self, key: str) -> list[int]:
        return [r for r in range(self.world) if not self.store.check([f"{key}/{r}"])]

    def _missing_sentence(self, key: str, what: str, first: bool) -> str:
        missing = self._missing(key)
        who = f"{_ranks(missing)} of {self.world}"
        limit = f"{_seconds(self.limit_s)} ({LIMIT_KEY}={self.limit_s:g})"
        if first:  # the rank never joined
            return (f"{who} did not join the rendezvous at {self.where} within {limit}; "
                    "check that every rank was started, with the same MASTER_ADDR and "
                    "MASTER_PORT, and that its host can reach this one (or raise "
                    f"{LIMIT_KEY}).")
        return (f"{who} did not reach {what} within {limit}; it may be stuck (a file system, "
                "a data set) or gone: see its output.")


def wait_for(ready: Callable[[], bool], progress: Callable[[str], str],
             failure: Callable[[], Exception], limit_s: float, speak: bool) -> None:
    """Poll `ready` until it holds (quickly at first, then every 0.2 s); say progress(...)
    every PROGRESS_S (a quarter of a shorter limit) when `speak`; raise failure() at limit_s."""
    start = time.monotonic()
    every = min(PROGRESS_S, max(1.0, limit_s / 4))
    said, pause = 0, 0.0005
    while not ready():
        waited = time.monotonic() - start
        if waited >= limit_s:
            raise failure()
        if speak and waited >= (said + 1) * every:
            said += 1
            print(f"ffdist: {progress(f'{_seconds(waited)} of {_seconds(limit_s)} ({LIMIT_KEY})')}",
                  file=sys.stderr, flush=True)
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


# ----------------------------------------------------------------------------- joining

def _address() -> tuple[str, int]:
    host = os.environ.get("MASTER_ADDR", "")
    port = int_env("MASTER_PORT")
    if not host or port is None:
        raise LaunchError("MASTER_ADDR and MASTER_PORT must both be set when RANK and "
                          "WORLD_SIZE are; start ffdist with torchrun or `ffdist launch`, "
                          "which set them.")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port; use 1024 to 65535.")
    return host, port


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except socket.gaierror:
        raise LaunchError(f"MASTER_ADDR={host} is not a host name this machine can resolve; "
                          "set it to the address of rank 0's host.") from None
    except OSError:
        return False


def _store(host: str, port: int, world: int, rank: int, limit_s: float, local_rank: int,
           agent: bool) -> Any:
    """The store: hosted here by rank 0 (not under torchrun's agent, which hosts its own),
    else reached as a client once its port answers; a wait with progress and a deadline
    (torch's own connect retries log C++ stack traces while it waits)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=limit_s)
    where = f"{host}:{port}"
    if rank == 0 and not agent:
        try:
            return dist.TCPStore(host, port, world, is_master=True, timeout=timeout,
                                 wait_for_workers=False, multi_tenant=True)
        except dist.DistNetworkError as e:
            if "EADDRINUSE" in str(e):
                raise LaunchError(f"MASTER_PORT={port} is already in use on this host (another "
                                  "run?); choose a free port (torchrun --master_port, or "
                                  "MASTER_PORT=...).") from None
            raise
    wait_for(lambda: _reachable(host, port),
             lambda waited: f"waiting for rank 0's rendezvous at {where}, {waited}",
             lambda: MeetingFailed(
                 f"rank 0's rendezvous at {where} did not answer within {_seconds(limit_s)} "
                 f"({LIMIT_KEY}={limit_s:g}); check that rank 0 was started, with the same "
                 "MASTER_ADDR and MASTER_PORT, and that this host can reach it (a firewall, "
                 "launch.socket_ifname)."),
             limit_s, speak=local_rank == 0)
    return dist.TCPStore(host, port, world, is_master=False, timeout=timeout,
                         wait_for_workers=False)


def join(rank: int, world: int, local_rank: int, local_world: int, limit_s: float,
         pg_timeout: datetime.timedelta) -> tuple[Meeting, Any]:
    """Meet every rank at MASTER_ADDR:MASTER_PORT (at most limit_s), then return the
    Meeting and the store for init_process_group."""
    import torch.distributed as dist

    host, port = _address()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restart = int_env("TORCHELASTIC_RESTART_COUNT") or 0
    raw = _store(host, port, world, rank, limit_s, local_rank, agent)
    meeting = Meeting(raw, rank, world, local_rank, f"{host}:{port}", limit_s,
                      f"ffdist/start/attempt_{restart}")
    meeting.decide("arrive", socket.gethostname(), lambda hosts: None,
                   f"the rendezvous at {meeting.where}")
    raw.set_timeout(pg_timeout)  # from here on, the process group's own limit
    return meeting, dist.PrefixStore(_group_prefix(agent, restart, world, local_world), raw)


def _group_prefix(agent: bool, restart: int, world: int, local_world: int) -> str:
    """The process group's keys. After a torchrun restart on one node, keys private to the
    attempt: the agent keeps ONE store for the whole job, and the group writes its keys
    there under the same names at every attempt, so a restarted rank could read the
    address its dead peer published before ("Gloo connectFullMesh failed ... Connection
    refused", seen about one restart in three). Across nodes the agents' default is kept."""
    if agent and restart > 0 and world == local_world:
        return f"ffdist/attempt_{restart}"
    return "default_pg"


def on_default_store(rank: int, world: int, limit_s: float) -> Meeting:
    """A Meeting on the store of a process group ffdist did not build (a test's own)."""
    from torch.distributed import distributed_c10d

    return Meeting(distributed_c10d._get_default_store(), rank, world, 0, "the process "
                   "group's store", limit_s, "ffdist/start/adopted")
