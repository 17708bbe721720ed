"""The CUDA paths that exist today, on a real GPU (marked `gpu`: "no GPU" skips them on a
machine without one; tests/conftest.py). Written after the PyTorch documentation (CUDA
semantics: streams, `record_stream`, pinned memory; AMP's GradScaler; channels_last;
torch.compile; torch.cuda memory statistics) and not run on a GPU by their author: the
project's CPU machines ran the CPU halves, a GPU machine runs them all.

Where a number is compared across runs on CUDA the tolerance is that of float summation
order (cuDNN picks kernels per shape and memory format, and TF32 is on for convolutions by
default): differences of 1e-6 relative that momentum carries forward, far below what a
wrong layout, a lost update or a wrong batch would do (1e-2 within these steps).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BIN,
    FAST,
    RECIPES,
    end_event,
    env,
    free_port,
    run,
    train,
    train_losses,
)

pytestmark = pytest.mark.gpu
CUDA = "launch.device=cuda"
EXACT = (*FAST, "precision=fp32", "data.augment=false", "log.every_steps=1")


def _cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------ DevicePrefetcher

def _streams(device: torch.device):
    from ffdist import assemble, recipe_load

    rcp = recipe_load.load(RECIPES / "digits.yaml", ["data.batch_size=64"])
    streams = assemble.build_data(rcp, assemble.resolve(rcp, 1, device, None), 0)
    streams.train.set_epoch(3)  # augmentation depends on (epoch, index) only
    return streams


@pytest.mark.parametrize("channels_last", [True, False])
def test_prefetched_cuda_batches_equal_the_cpu_path(channels_last: bool) -> None:
    """The real digits loader (pinned memory on CUDA), one epoch: every batch the side
    stream delivers equals what the CPU path computes, in the asked memory format."""
    from ffdist.data import DevicePrefetcher

    cpu_side, cuda_side = _streams(torch.device("cpu")), _streams(_cuda())
    assert cuda_side.train.loader.pin_memory and not cpu_side.train.loader.pin_memory
    spec = cpu_side.spec
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    want = list(DevicePrefetcher(cpu_side.train, torch.device("cpu"), spec.mean, spec.std,
                                 channels_last))
    got = list(DevicePrefetcher(cuda_side.train, _cuda(), spec.mean, spec.std, channels_last))
    torch.cuda.synchronize()
    assert len(got) == len(want) == cpu_side.train.steps_per_epoch
    for (x, y), (cx, cy) in zip(got, want):
        assert x.device == y.device == _cuda() and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(x.cpu(), cx, rtol=0, atol=1e-5)  # fma vs mul+add: 1 ulp
        assert torch.equal(y.cpu(), cy)


def test_prefetcher_copies_one_batch_ahead_and_records_the_consumer_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch k is handed out after batch k+1 was pulled and its copy queued on the side
    stream; each tensor made there is recorded on the stream that consumes it, so the
    caching allocator does not hand its memory to the side stream while kernels queued on
    the main stream still read it (torch.Tensor.record_stream's contract)."""
    from ffdist.data import DevicePrefetcher

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
                .pin_memory(), torch.arange(16) + 100 * i) for i in range(5)]
    pulled: list[int] = []

    class Loader:
        def __iter__(self):
            for i, batch in enumerate(batches):
                pulled.append(i)
                yield batch

        def __len__(self) -> int:
            return len(batches)

    recorded = []
    real = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: (recorded.append(s), real(t, s))[1])
    main = torch.cuda.current_stream(_cuda())
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    for k, (x, y) in enumerate(DevicePrefetcher(Loader(), _cuda(), mean, std)):
        assert len(pulled) == min(k + 2, len(batches)), (k, pulled)
        assert torch.equal(y.cpu(), batches[k][1])
        x.mul_(2)  # main-stream work on the delivered batch, then it is dropped
    assert len(recorded) == 2 * len(batches) and all(s == main for s in recorded)


# ------------------------------------------------------------------ training paths

def _losses_finite(run_dir: Path) -> dict[int, float]:
    losses = train_losses(run_dir)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    return losses


def test_fp16_grad_scaler_trains_digits_and_stays_finite(tmp_path: Path) -> None:
    """precision=fp16 on CUDA: loss scaling by GradScaler (the first steps overflow by
    design and are skipped); the run stays finite and learns (0.9889 on an H100)."""
    out = tmp_path / "fp16"
    proc = train("digits.yaml", CUDA, "precision=fp16", "log.every_steps=5",
                 f"output_dir={out}", *FAST)
    assert "on cuda x1" in proc.stdout and "fp16" in proc.stdout
    _losses_finite(out)
    assert end_event(out)["final_top1"] >= 0.95
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / latest, map_location="cpu", weights_only=True)
    scale = state["scaler"]["scale"]  # GradScaler.state_dict(): it was on, and is sane
    assert math.isfinite(scale) and scale > 0, state["scaler"]
    final = torch.load(out / "model.pt", weights_only=True)  # default map_location
    assert all(v.device.type == "cpu" for v in final.values())  # loads without a GPU
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_write_weights_moves_cuda_tensors_to_the_cpu(tmp_path: Path) -> None:
    from ffdist.checkpoint import write_weights

    w = torch.randn(3, 4, device="cuda")
    write_weights(tmp_path / "model.pt", {"w": w.t(), "b": torch.ones(2, device="cuda")})
    back = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {v.device.type for v in back.values()} == {"cpu"}
    assert back["w"].is_contiguous() and torch.equal(back["w"], w.t().cpu())


def test_channels_last_trains_like_nchw_on_cuda(tmp_path: Path) -> None:
    runs = {}
    for fmt in ("true", "false"):
        out = tmp_path / fmt
        train("digits.yaml", CUDA, f"model.channels_last={fmt}", "schedule.max_steps=10",
              f"output_dir={out}", *EXACT)
        runs[fmt] = _losses_finite(out)
    assert sorted(runs["true"]) == sorted(runs["false"]) == list(range(1, 11))
    for step, loss in runs["true"].items():
        assert loss == pytest.approx(runs["false"][step], rel=1e-3), step
    assert runs["true"][10] < runs["true"][1] - 0.01  # it learns, so agreeing means something


def test_compile_inductor_on_cuda_trains_and_saves_plain_keys(tmp_path: Path) -> None:
    """model.compile=true with the default backend (inductor: Triton kernels on CUDA)."""
    from ffdist.checkpoint import load_torch
    from ffdist.models.small import SmallCNN

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train("digits.yaml", CUDA, "schedule.max_steps=6", f"output_dir={eager}", *EXACT)
    train("digits.yaml", CUDA, "model.compile=true", "schedule.max_steps=6",
          f"output_dir={compiled}", *EXACT, timeout=600)
    a, b = _losses_finite(eager), _losses_finite(compiled)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-3), step
    state = load_torch(compiled / "model.pt")
    assert not [k for k in state if "_orig_mod" in k or k.startswith("module.")]
    SmallCNN(num_classes=10, in_channels=1).load_state_dict(state)


# ------------------------------------------------------------------ counts and memory

def _counts(**variables: str) -> list[int]:
    """[NVML count, ffdist's visible count, torch's count] in a fresh process."""
    e = env(**variables)
    if "CUDA_VISIBLE_DEVICES" not in variables:
        e.pop("CUDA_VISIBLE_DEVICES", None)
    code = ("import torch; from ffdist import dist; "
            "print(dist.gpu_count(), dist.visible_gpu_count(), torch.cuda.device_count())")
    proc = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                          timeout=120, check=True)
    return [int(v) for v in proc.stdout.split()]


def test_nvml_count_is_torch_count() -> None:
    nvml, visible, torch_count = _counts()
    assert nvml == visible == torch_count >= 1
    assert _counts(CUDA_VISIBLE_DEVICES="0")[1:] == [1, 1]   # ffdist reads it as torch does
    assert _counts(CUDA_VISIBLE_DEVICES="")[1:] == [0, 0]    # "no GPU for you"
    assert _counts(CUDA_VISIBLE_DEVICES="-1")[1:] == [0, 0]


def _bench(tmp_path: Path, batch: int) -> dict:
    out = tmp_path / f"bench{batch}.json"
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"), CUDA,
                f"data.batch_size={batch}", "--synthetic", "--steps", "5", "--warmup", "2",
                "--eval-steps", "2", "--out", str(out), f"output_dir={tmp_path / 'run'}"])
    assert "CUDA allocated" in proc.stdout
    return json.loads(out.read_text())


def test_bench_reports_cuda_peak_memory_that_grows_with_the_batch(tmp_path: Path) -> None:
    small, large = _bench(tmp_path, 64), _bench(tmp_path, 1024)
    total = torch.cuda.get_device_properties(0).total_memory
    for r in (small, large):
        assert r["device"] == "cuda"
        assert 3 * 4 * 97_802 < r["peak_mem_bytes"] < total  # weights+grads+momentum at least
    # activations (~27 KiB per 8x8 sample, ffdist plan): 16x the batch is ~25 MiB more;
    # a constant, or a number that ignored the batch, would not move so
    assert large["peak_mem_bytes"] > small["peak_mem_bytes"] + 4 * 2**20


# ------------------------------------------------------------------ where ranks run

def _probe(tmp_path: Path, name: str, nproc: int, *overrides: str) -> list[dict]:
    out = tmp_path / name
    args = ["-m", "tests.cuda_probe", str(out), str(RECIPES / "digits.yaml"),
            "schedule.max_steps=3", "checkpoint.every_steps=2", *FAST,
            f"output_dir={tmp_path / (name + '_run')}", *overrides]
    launcher = ([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    run([*launcher, *args], timeout=300)
    return [json.loads((tmp_path / f"{name}.{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("strategy", ["strategy.name=ddp", "strategy.name=deepspeed",
                                      "strategy.name=fsdp"])
def test_cpu_ranks_on_a_gpu_machine_create_no_cuda_context(tmp_path: Path, strategy: str) -> None:
    """2 CPU ranks under bare torchrun (no ffdist launch, no CUDA_VISIBLE_DEVICES trick) on
    a machine with a GPU: gloo, DeepSpeed on its CPU accelerator, CUDA never initialised.
    The control: one rank with launch.device=cuda does initialise it (the probe sees it)."""
    (control,) = _probe(tmp_path, "control", 1, CUDA, strategy)
    assert control["cuda_initialized"] is True
    ranks = _probe(tmp_path, "cpu", 2, "launch.device=cpu", strategy)
    for rank in ranks:
        assert rank["exit"] == 0 and rank["backend"] == "gloo"
        assert rank["cuda_initialized"] is False and rank["ds_accelerator"] == "cpu"
        if control["nvml_gpus_holding_me"]:  # NVML shows our processes' contexts here
            assert rank["nvml_gpus_holding_me"] == [], rank


def test_more_gpu_ranks_than_gpus_stop_before_anything_starts(tmp_path: Path) -> None:
    """One process more than there are GPUs: `ffdist launch` refuses before it spawns, and
    under bare torchrun every rank exits 2 before a process group exists (none hangs)."""
    from tests.helpers import cuda_gpus

    n = cuda_gpus()
    out = tmp_path / "run"
    common = (f"data.batch_size={8 * (n + 1)}", f"output_dir={out}", *FAST)  # divides
    proc = run([sys.executable, "-m", "ffdist.cli", "launch", str(RECIPES / "digits.yaml"),
                f"launch.nproc={n + 1}", *common], timeout=120, check=False)
    assert proc.returncode == 2 and "torchrun" not in proc.stdout, proc.stdout
    assert f"launch.nproc={n + 1} asks for {n + 1} GPU processes" in proc.stderr
    assert f"only {n} GPU(s)" in proc.stderr and not out.exists()
    proc = run([str(BIN / "torchrun"), "--nproc_per_node", str(n + 1), "--master_port",
                str(free_port()), "-m", "ffdist.train", str(RECIPES / "digits.yaml"), *common],
               timeout=180, check=False)
    # Each rank that got that far printed the same sentence (torchrun stops the others as
    # soon as one exits), rank 0 included: it has a GPU, but the node is overfull.
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: error")]
    assert errors and all(f"asks for {n + 1} GPU processes" in ln for ln in errors), \
        proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr and not out.exists()
