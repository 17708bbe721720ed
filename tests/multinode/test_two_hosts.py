"""Two "hosts" on one machine: network namespaces joined by a veth pair, one torchrun per
namespace (started by `ffdist launch --nnodes 2 --node-rank R`), 2 ranks each.

Checks the 4-rank run across the veth link against a single-host 4-rank torchrun of the
same recipe: world size 4, val top-1 >= 0.98, the same per-step training losses (fp32,
no augmentation, every step logged: same data order and same arithmetic, so they agree to
float rounding; tolerance 1e-4), and exactly one model.pt. Traffic stays on a private
/24 inside this machine. The fixture always deletes the namespaces.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.helpers import CPU, FAST, RECIPES, REPO, end_event, env, events, torchrun

# make test-all: the fast tier's two-node proof is tests/slurm/test_sbatch.py (two network-
# namespace nodes, world size 4, preempted, requeued, resumed).
pytestmark = pytest.mark.extended

SUBNET = "10.213.47"  # private, only ever on the veth pair below
PORT = "29400"        # inside fresh namespaces: nothing else listens there
COMPARE_STEPS = 10
# fp32, no augmentation, every step logged, CPU ranks: the loss comparison needs
# identical math (and 4 ranks need no 4 GPUs).
EXACT = (CPU, "precision=fp32", "data.augment=false", "log.every_steps=1", *FAST)


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = str(os.getpid() % 100000)
    hosts = [Host(f"ffdA{tag}", f"ffvA{tag}", f"{SUBNET}.1"),
             Host(f"ffdB{tag}", f"ffvB{tag}", f"{SUBNET}.2")]
    try:
        for h in hosts:
            _ip("netns", "add", h.netns)
        _ip("link", "add", hosts[0].ifname, "type", "veth", "peer", "name", hosts[1].ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for h in hosts:  # our processes first (a failed test may leave some), then the netns
            pids = _ip("netns", "pids", h.netns, check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], check=False)
            _ip("netns", "del", h.netns, check=False)
        _ip("link", "del", hosts[0].ifname, check=False)  # if it never moved into a netns
        leftover = _ip("netns", "list").stdout
        assert not any(h.netns in leftover for h in hosts), leftover


def _launch(host: Host, node_rank: int, head: Host, overrides: list[str]) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", host.netns, sys.executable, "-m", "ffdist.cli", "launch",
           str(RECIPES / "digits.yaml"), "--nnodes", "2", "--node-rank", str(node_rank),
           "--rdzv-endpoint", f"{head.addr}:{PORT}", "launch.nproc=2",
           f"launch.socket_ifname={host.ifname}", "launch.rdzv_timeout=120", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(run_dir, "train") if e["step"] <= COMPARE_STEPS}


@pytest.mark.parametrize("strategy", [
    ("strategy.name=ddp",),
    ("strategy.name=deepspeed", "strategy.zero_stage=3"),
], ids=["ddp", "zero3"])
def test_two_hosts_match_one_host(two_hosts, tmp_path, strategy):
    head, other = two_hosts
    out = tmp_path / "two_hosts"
    overrides = [f"output_dir={out}", *EXACT, *strategy]
    procs = [_launch(head, 0, head, overrides), _launch(other, 1, head, overrides)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n=====\n".join(s[-3000:] for s in logs)
    # the torchrun each node ran: c10d on the head's address, node 0 hosts the store
    assert f"--rdzv_endpoint {head.addr}:{PORT}" in logs[0] and "is_host=1" in logs[0]
    assert f"--local_addr {other.addr}" in logs[1] and "is_host=0" in logs[1]
    assert f"GLOO_SOCKET_IFNAME={other.ifname}" in logs[1]

    assert {e["world_size"] for e in events(out, "train") + events(out, "val")} == {4}
    end = end_event(out)
    assert end["world_size"] == 4 and end["final_top1"] >= 0.98, end
    assert sorted(p.name for p in out.rglob("model.pt")) == ["model.pt"]
    assert (out / "model.pt").exists()

    single = tmp_path / "one_host"
    torchrun("digits.yaml", f"output_dir={single}", *EXACT, *strategy,
             f"schedule.max_steps={COMPARE_STEPS}", nproc=4, timeout=300)
    assert {e["world_size"] for e in events(single, "train")} == {4}
    a, b = _losses(out), _losses(single)
    assert sorted(a) == sorted(b) == list(range(1, COMPARE_STEPS + 1)), (a, b)
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-4, abs_tol=1e-6), (step, a[step], b[step])
