"""ffdist launch: the argv lists and environments it builds (nothing is started here).

The GPUs of "this node" are injected (ffdist.dist's counts, 0 unless a test says otherwise),
so every command shape is checked on any machine, with or without GPUs."""

from __future__ import annotations

import shlex

import pytest

from ffdist import dist, launch, launchers, recipe_load
from ffdist.cli import main as cli_main
from ffdist.errors import LaunchError
from tests.helpers import RECIPES

DIGITS = str(RECIPES / "digits.yaml")
RESNET = str(RECIPES / "resnet50.yaml")


@pytest.fixture(autouse=True)
def gpus(monkeypatch: pytest.MonkeyPatch):
    """gpus(n): this node has n GPUs (NVML and torch alike), none hidden by an inherited
    CUDA_VISIBLE_DEVICES. Starts at 0."""
    def visible(n: int) -> None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(dist, "gpu_count", lambda: n)
        monkeypatch.setattr(dist, "cuda_device_count", lambda: n)

    visible(0)
    return visible


def build(*args: str, launcher: str | None = None) -> launchers.Command:
    parsed, overrides = launch.parse([DIGITS, *args])
    return launch.build(parsed.recipe, overrides, launcher or parsed.launcher, dry_run=True)


def opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_gpus_0_2_dry_run_sets_the_visible_devices(capsys):
    assert cli_main(["launch", RESNET, "launch.gpus=[0,2]", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(line)
    assert words[0] == "CUDA_VISIBLE_DEVICES=0,2"
    assert words[1].endswith("torchrun")
    assert opt(words, "--nproc_per_node") == "2"
    assert words[-3:] == ["ffdist.train", RESNET, "launch.gpus=[0,2]"]


def test_three_gpus_three_processes():
    cmd = build("launch.gpus=[0,2,3]")
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0,2,3"
    assert opt(cmd.argv, "--nproc_per_node") == "3"
    assert "--standalone" in cmd.argv  # one node: local rendezvous on a free port


def test_one_gpu_is_the_single_device_fallback():
    cmd = build("launch.gpus=[1]")
    assert cmd.argv[1:4] == ["-m", "ffdist.train", DIGITS]
    assert not any("torchrun" in a for a in cmd.argv)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize("visible", [0, 1, 8])
def test_cpu_ranks_from_nproc_on_any_node(gpus, visible):
    gpus(visible)
    cmd = build("launch.device=cpu", "launch.nproc=3")
    assert opt(cmd.argv, "--nproc_per_node") == "3"
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env
    assert build("launch.device=cpu", "launch.nproc=1").argv[1:3] == ["-m", "ffdist.train"]
    assert build("launch.device=cpu").argv[1:3] == ["-m", "ffdist.train"]  # null: one


# (launch.device, launch.nproc, GPUs on the node) -> (processes, where) or the error
@pytest.mark.parametrize("device,nproc,visible,expect", [
    ("auto", "null", 0, (1, "cpu")),   # the CPU is one device
    ("auto", "3", 0, (3, "cpu")),      # N CPU ranks where there is no GPU
    ("auto", "null", 1, (1, "cuda")),
    ("auto", "null", 8, (8, "cuda")),  # null: one per GPU
    ("auto", "2", 8, (2, "cuda")),     # a number: exactly that many (GPUs 0 and 1)
    ("auto", "2", 1, "asks for 2 GPU processes on this node, but only 1 GPU(s)"),
    ("cuda", "null", 2, (2, "cuda")),
    ("cuda", "null", 0, "launch.device=cuda but no GPU is visible"),
    ("cuda", "4", 2, "use launch.nproc=2 or null (one per GPU)"),
    ("cpu", "null", 8, (1, "cpu")),
    ("cpu", "16", 8, (16, "cpu")),     # CPU ranks on a GPU node: no GPU limit
])
def test_nproc_has_one_meaning_on_gpu_and_cpu_nodes(gpus, device, nproc, visible, expect):
    gpus(visible)
    rcp = recipe_load.load(DIGITS, [f"launch.device={device}", f"launch.nproc={nproc}"])
    if isinstance(expect, str):
        with pytest.raises(LaunchError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            launchers.local_processes(rcp, dry_run=True)
        return
    procs, notes = launchers.local_processes(rcp, dry_run=True)
    assert (procs.nproc, procs.device) == expect and notes


def test_launch_gpus_and_nproc_must_agree(gpus):
    gpus(4)
    assert build("launch.gpus=[1,3]", "launch.nproc=2").env["CUDA_VISIBLE_DEVICES"] == "1,3"
    with pytest.raises(LaunchError, match=r"launch.nproc=3 but launch.gpus=\[1, 3\] lists 2"):
        build("launch.gpus=[1,3]", "launch.nproc=3")
    cpu = build("launch.gpus=[1,3]", "launch.device=cpu", "launch.nproc=2")  # a GPU recipe,
    assert "CUDA_VISIBLE_DEVICES" not in cpu.env                            # debugged on CPUs
    assert any("launch.gpus=[1, 3] ignored" in n for n in cpu.notes)


def test_too_many_gpu_processes_exit_2_before_anything_starts(gpus, capsys, monkeypatch):
    gpus(1)

    def never(*args, **kwargs):
        raise AssertionError(f"started {args[0]}")

    monkeypatch.setattr(launch.subprocess, "call", never)
    assert cli_main(["launch", DIGITS, "launch.nproc=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffdist: error: launch.nproc=2 asks for 2 GPU processes") and \
        "only 1 GPU(s)" in err and "launch.device=cpu" in err and "\n" not in err


def test_missing_gpu_is_a_launch_error_exit_2(capsys):
    with pytest.raises(LaunchError, match=r"GPU id\(s\) \[2\] do not exist.*2 GPU\(s\)"):
        launchers.check_gpus([0, 2], count=2)
    launchers.check_gpus([0, 1], count=2)
    # No GPU on this node: without --dry-run the ids are checked, and the CLI says so.
    assert cli_main(["launch", DIGITS, "launch.gpus=[0]"]) == 2
    err = capsys.readouterr().err
    assert "launch.gpus=[0]" in err and "launch.device=cpu" in err and "Traceback" not in err


def test_multinode_torchrun_per_node():
    head = build("--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "10.1.2.3:29400",
                 "launch.rdzv_timeout=60", "launch.max_restarts=3")
    other = build("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.1.2.3:29400")
    for cmd in (head, other):
        assert opt(cmd.argv, "--nnodes") == "2"
        assert opt(cmd.argv, "--rdzv_backend") == "c10d"
        assert opt(cmd.argv, "--rdzv_endpoint") == "10.1.2.3:29400"
        assert opt(cmd.argv, "--rdzv_id") == "ffdist-digits"  # the same on every node
        assert "--standalone" not in cmd.argv
    assert opt(head.argv, "--rdzv_conf") == "timeout=60,is_host=1"
    assert opt(other.argv, "--rdzv_conf") == "timeout=900,is_host=0"
    assert opt(head.argv, "--max_restarts") == "3"
    # the overrides reach the trainer too, so its recipe.yaml re-runs the same way
    assert "launch.node_rank=1" in other.argv


def test_socket_interface_sets_env_and_local_addr():
    cmd = build("--nnodes", "2", "--rdzv-endpoint", "10.1.2.3:29400", "launch.socket_ifname=lo")
    assert cmd.env["GLOO_SOCKET_IFNAME"] == cmd.env["NCCL_SOCKET_IFNAME"] == "lo"
    assert opt(cmd.argv, "--local_addr") == "127.0.0.1"
    with pytest.raises(LaunchError, match="no such network interface"):
        parsed, ov = launch.parse([DIGITS, "launch.socket_ifname=nope0", "--nnodes", "2",
                                   "--rdzv-endpoint", "10.1.2.3:29400"])
        launch.build(parsed.recipe, ov, None, dry_run=False)


@pytest.mark.parametrize("visible", [0, 1, 8])
def test_accelerate_and_deepspeed_cpu_ranks(gpus, visible):
    """launch.device=cpu: the same CPU command on a node with or without GPUs."""
    gpus(visible)
    acc = build("launch.device=cpu", "launch.nproc=2", launcher="accelerate")
    assert acc.argv[1:3] == ["launch", "--multi_gpu"]
    assert opt(acc.argv, "--num_processes") == "2"
    assert acc.env["ACCELERATE_USE_CPU"] == "1"  # else: 2 silent independent processes
    assert acc.argv[-5:-2] == ["-m", "ffdist.train", DIGITS]
    ds = build("launch.device=cpu", "launch.nproc=2", launcher="deepspeed")
    assert opt(ds.argv, "--num_gpus") == "2"  # on the CPU: the number of ranks
    assert ds.env["DS_ACCELERATOR"] == "cpu"  # its device count and the ranks' engine
    with pytest.raises(LaunchError, match="hostfile"):
        build("--nnodes", "2", "--rdzv-endpoint", "h:1234", launcher="deepspeed")


def test_accelerate_and_deepspeed_gpu_ranks(gpus, monkeypatch):
    gpus(2)
    acc = build(launcher="accelerate")
    assert opt(acc.argv, "--num_processes") == "2" and "ACCELERATE_USE_CPU" not in acc.env
    ds = build(launcher="deepspeed")
    assert opt(ds.argv, "--num_gpus") == "2" and "DS_ACCELERATOR" not in ds.env
    ds = build("launch.gpus=[0,2]", launcher="deepspeed")
    assert opt(ds.argv, "--include") == "localhost:0,2"
    assert opt(ds.argv, "--module") == "ffdist.train"
    # The deepspeed launcher drops an inherited CUDA_VISIBLE_DEVICES when given --num_gpus
    # (its ranks would land on GPUs 0..N-1): the visible ids go to --include instead.
    gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert opt(build(launcher="deepspeed").argv, "--include") == "localhost:3,5"


def test_slurm_submission_line(tmp_path):
    cmd = build("--nnodes", "2", f"output_dir={tmp_path}", "launch.nproc=2", launcher="slurm")
    assert cmd.argv[0] == "sbatch"
    assert opt(cmd.argv, "--nodes") == "2"
    assert opt(cmd.argv, "--output") == str(tmp_path / "slurm-%j.out")
    assert opt(cmd.argv, "--cpus-per-task") == "2"
    script = cmd.argv.index(str(launchers.SLURM_SCRIPT))
    assert cmd.argv[script + 1] == DIGITS
    assert launchers.SLURM_SCRIPT.exists()
    gpu = build("launch.gpus=[0,1,2,3]", launcher="slurm")
    assert opt(gpu.argv, "--gpus-per-node") == "4"
    cpu = build("launch.gpus=[0,1,2,3]", "launch.device=cpu", launcher="slurm")
    assert opt(cpu.argv, "--cpus-per-task") == "1"  # nproc null: one CPU rank


def test_render_quotes_paths_with_spaces():
    cmd = launchers.Command(["torchrun", "-m", "ffdist.train", "my recipes/a b.yaml", "name=x;y"],
                         {"CUDA_VISIBLE_DEVICES": "0,2"})
    assert shlex.split(cmd.render()) == ["CUDA_VISIBLE_DEVICES=0,2", *cmd.argv]


@pytest.mark.parametrize("environ,extra,nproc,threads,note", [
    ({"SLURM_CPUS_ON_NODE": "8"}, [], 2, 4, None),             # 2 ranks share 8 cores
    ({"SLURM_CPUS_ON_NODE": "1"}, [], 1, 1, "capped"),         # never more ranks than cores
    ({"SLURM_GPUS_ON_NODE": "4"}, [], 4, None, None),          # GPUs decide
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, [], 3, None, None),    # gres set the visible GPUs
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "8"}, ["launch.device=cpu"], 2, 4,
     None),                                                    # CPU ranks on a GPU node
    ({"SLURM_CPUS_ON_NODE": "8"}, ["launch.nproc=null"], 1, 8, None),  # null: one
])
def test_slurm_node_processes(environ, extra, nproc, threads, note):
    rcp = recipe_load.load(DIGITS, ["launch.nproc=2", *extra])
    procs, notes = launchers.slurm_node_processes(rcp, environ)
    assert (procs.nproc, procs.threads) == (nproc, threads)
    assert (note is None) or any(note in n for n in notes)


def test_slurm_node_torchrun_from_allocation():
    environ = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
               "SLURM_CPUS_ON_NODE": "4"}
    cmd = launch.build_slurm_node(DIGITS, ["launch.rdzv_endpoint=node1:24242", "launch.nproc=2"],
                                  environ)
    assert opt(cmd.argv, "--nnodes") == "2"
    assert opt(cmd.argv, "--rdzv_id") == "slurm-4242"
    assert opt(cmd.argv, "--rdzv_conf").endswith("is_host=0")
    assert "SIGUSR1" in opt(cmd.argv, "--signals_to_handle")
    assert int(opt(cmd.argv, "--shutdown_timeout")) < 90  # inside --signal=B:USR1@90
    assert cmd.env["OMP_NUM_THREADS"] == "2"


def test_inherited_cuda_visible_devices_is_respected(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # e.g. set by a scheduler
    cmd = build()
    assert opt(cmd.argv, "--nproc_per_node") == "2" and "CUDA_VISIBLE_DEVICES" not in cmd.env
    with pytest.raises(LaunchError, match="only 2 GPU.*CUDA_VISIBLE_DEVICES=3,5"):
        build("launch.nproc=3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # "no GPU for you": CPU ranks
    assert opt(build("launch.nproc=3").argv, "--nproc_per_node") == "3"
