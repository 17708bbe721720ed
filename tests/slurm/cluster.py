"""A private two-node Slurm cluster for the tests in tests/slurm/.

It is what a user gets from `slurm/local_cluster.sh` (docs/slurm.md), with each node's
slurmd in a network namespace of its own, so that `sbatch -N 2` runs on two hosts that
talk over a bridge (each namespace has one veth end, named IFNAME inside every node, on a
private /24; slurmctld is reached at the bridge's address). Hermetic: its own munged, key,
socket, slurm.conf (SLURM_CONF), ports, state, spool and cluster name, all in one temp
folder; nothing under /etc is read for it or written, and no daemon it did not start is
touched. Node names need no /etc/hosts: slurm.conf gives each node its NodeAddr, and
slurm/train.sh rendezvous at that address.

Skips, saying why, where it cannot run (not root, packages missing, no network
namespaces); a failed bring-up fails the tests and shows the daemons' logs. Stopping
removes everything it made, and checks that nothing is left.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import REPO, run

SCRIPT = REPO / "slurm" / "local_cluster.sh"
IFNAME = "ffslurm0"  # the interface of every node inside its namespace
NEEDS = {"munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
         "sbatch": "slurm-wlm", "ip": "iproute2", "nsenter": "util-linux"}
# Private /24s, tried in order; tests/multinode uses 10.213.47.0/24, so both can run.
SUBNETS = [f"10.213.{n}" for n in range(58, 100)]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED")


class CannotRun(Exception):
    """This machine cannot host the test cluster (the reason is the message): skip."""


def missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd starts jobs as their user)"
    missing = sorted({pkg for cmd, pkg in NEEDS.items() if not shutil.which(cmd)})
    if missing:
        return (f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)}; "
                "CI's .ci/system-setup does)")
    return None


def skip_unless_possible() -> None:
    """Skip, saying why, where no private cluster can run; in CI as root that is a failure
    (.ci/system-setup installs the packages), not a skip that would hide it."""
    import pytest

    reason = missing_capability()
    if reason and os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"no private Slurm cluster in CI: {reason}", pytrace=False)
    if reason:
        pytest.skip(f"no private Slurm cluster: {reason}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _free_subnet() -> str:
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    for net in SUBNETS:
        if f"{net}." not in used:
            return net
    raise RuntimeError(f"every subnet of {SUBNETS[0]}.0/24 .. {SUBNETS[-1]}.0/24 is in use here")


def free_port_pair() -> int:
    """P and P+1 both free here: slurmctld listens on P (slurmd's P+1 is in the netns)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free TCP ports")


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    netns: str
    host_if: str  # its veth end in the root namespace, on the bridge


@dataclass
class Cluster:
    dir: Path
    tag: str
    subnet: str
    port: int = 0
    nodes: list[Node] = field(default_factory=list)
    bridge: str = ""
    bringup_s: float = 0.0

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def controller_addr(self) -> str:
        return f"{self.subnet}.254"

    def run(self, cmd: list[str], timeout: float = 60, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        """A command from the repo root, as a user with SLURM_CONF exported runs it."""
        return run(cmd, timeout=timeout, check=check, SLURM_CONF=str(self.conf), **env)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", job_id], timeout=30, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        """Block until the job ends (a requeued job counts as running); its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job(job_id)
            if state.get("JobState") in TERMINAL:
                return state
            time.sleep(0.5)
        self.run(["scancel", job_id], timeout=30, check=False)
        raise AssertionError(f"Slurm job {job_id} still {self.job(job_id).get('JobState')} "
                             f"after {timeout:.0f} s (cancelled)\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The daemons' last log lines, for failure messages."""
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ bring-up
    def start(self) -> None:
        started = time.monotonic()
        self._network()
        self.port = free_port_pair()
        cmd = ["bash", str(SCRIPT), "start", str(self.dir), "--port", str(self.port),
               "--name", f"ffdtest{self.tag}", "--controller-addr", self.controller_addr]
        for n in self.nodes:
            cmd += ["--node", f"{n.name}={n.addr}@{n.netns}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}"
                               f"{proc.stderr}")
        self.bringup_s = time.monotonic() - started

    def _network(self) -> None:
        """A bridge in this namespace (slurmctld's side), one namespace per node on it."""
        self.bridge = f"ffslbr{self.tag}"
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except RuntimeError as e:
            if "Operation not permitted" in str(e):
                raise CannotRun(f"cannot create network devices here ({e})") from None
            raise
        _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in (1, 2):
            node = Node(f"ffsl{self.tag}n{i}", f"{self.subnet}.{i}", f"ffsl{self.tag}n{i}",
                        f"ffsl{self.tag}h{i}")
            self.nodes.append(node)
            _ip("netns", "add", node.netns)
            _ip("link", "add", node.host_if, "type", "veth", "peer", "name", IFNAME,
                "netns", node.netns)
            _ip("link", "set", node.host_if, "master", self.bridge, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", IFNAME)
            _ip("-n", node.netns, "link", "set", IFNAME, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")

    # ------------------------------------------------------------------ teardown
    def stop(self) -> list[str]:
        """Stop and remove everything; what could not be removed (empty when clean)."""
        problems = []
        if (self.dir / "run").is_dir():
            proc = subprocess.run(["bash", str(SCRIPT), "stop", str(self.dir)],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode:
                problems.append(f"local_cluster.sh stop: {proc.stdout}{proc.stderr}")
        for n in self.nodes:  # job processes a failed test may have left, then the netns
            for pid in _ip("netns", "pids", n.netns, check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            _ip("netns", "del", n.netns, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        for n in self.nodes:  # gone with its peer's namespace (asynchronously)
            _ip("link", "del", n.host_if, check=False)
        problems += self._leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    def _leftovers(self) -> list[str]:
        left = []
        deadline = time.monotonic() + 10
        while True:
            links = _ip("-o", "link").stdout
            netns = _ip("netns", "list").stdout
            names = [self.bridge] + [x for n in self.nodes for x in (n.netns, n.host_if)]
            left = [n for n in names if n and (f" {n}:" in links or f" {n}@" in links
                                               or n in netns.split())]
            procs = [p for p in Path("/proc").glob("[0-9]*") if cmdline_has(p, str(self.dir))]
            if not left and not procs:
                return []
            if time.monotonic() > deadline:
                return [f"left behind: {left} processes {[p.name for p in procs]}"]
            time.sleep(0.2)


def cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def new_cluster() -> Cluster:
    tag = str(os.getpid() % 100000)
    folder = Path(tempfile.mkdtemp(prefix="ffdist-slurm-"))
    return Cluster(dir=folder, tag=tag, subnet=_free_subnet())
