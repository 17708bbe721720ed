"""benchmarks/gpu_check.py on the CPU: its JPEG and FSDP steps end to end (--cpu-dry-run
--only jpeg, --only fsdp), and the write-up's pieces. The full dry run (`make gpu-check PY=.venv/bin/python
ARGS=--cpu-dry-run`, ~15 min here: DeepSpeed builds its CPU op) is run by hand."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, run

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_make_jpegs_writes_an_imagefolder(tmp_path: Path) -> None:
    n = gpu_check.make_jpegs(tmp_path, classes=3, per_class=4, size=(50, 40))
    train = sorted((tmp_path / "train").rglob("*.jpg"))
    val = sorted((tmp_path / "val").rglob("*.jpg"))
    assert n == len(train) + len(val) == 3 * 4 + 3 * 2
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["c0", "c1", "c2"]
    with Image.open(train[0]) as img:
        assert img.format == "JPEG" and img.size == (50, 40)


# make test-all only; the fast tier covers its path: test_junit_counts_and_the_bench_table
@pytest.mark.extended
def test_dry_run_jpeg_step_measures_the_loader_and_bench(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                "--only", "jpeg", "--out", str(out), "--work", str(tmp_path / "work")],
               timeout=600)
    text = out.read_text()
    assert text.startswith("# ffdist gpu-check: CPU DRY RUN")
    assert "ffdist commit:" in text and "torch " in text and "CPU cores:" in text
    loader = [ln for ln in text.splitlines() if ln.startswith("| JPEG loader alone")]
    bench = [ln for ln in text.splitlines() if ln.startswith("| bench on the JPEG folder")]
    assert "| JPEG folder |" in text and len(bench) == 1, text
    # the recipe's workers (8), and all cores but two when that differs
    assert 1 <= len(loader) <= 2 and all("images/s" in ln for ln in loader), loader
    assert "data wait" in bench[0] and "(the recipe)" in "".join(loader)
    assert "**NO**" not in text, text
    assert "[ok] bench on the JPEG folder" in proc.stdout


def test_junit_counts_and_the_bench_table(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                   "</testsuite></testsuites>")
    assert gpu_check._junit(xml) == {"tests": 5, "failed": 2, "skipped": 2, "passed": 1}
    assert gpu_check._junit(tmp_path / "none.xml") is None
    printed = "noise\nmodel  a\nrow    b\nmodel  c\nrow    d\nwrote x.json\nstderr line\n"
    assert gpu_check._table(printed) == "model  c\nrow    d"


def test_write_adds_a_dated_section_above_the_earlier_ones(tmp_path: Path) -> None:
    """RESULTS-gpu.md is a record: a new run's section goes on top, none is erased."""
    out = tmp_path / "RESULTS-gpu.md"
    out.write_text(gpu_check.HEADER + "\n## 2026-11-22, one H100\n\nmeasured by hand\n")
    info = {"date": "2026-12-05T10:00:00+00:00", "host": "h", "load": "load 1.0",
            "nvidia_smi": ["H100"], "gpus": [], "cpu_cores": 16, "python": "3.12",
            "torch": "2.11", "cuda": "13.0", "cudnn": "9", "torchvision": "0.26",
            "deepspeed": "0.19", "accelerate": "1.15", "commit": "abc1234"}
    row = {"check": "c", "result": "r", "target": "t", "ok": True, "seconds": 1, "detail": ""}
    earlier = gpu_check.earlier_sections(out)  # read once: the file is rewritten every step
    for _ in range(2):
        gpu_check.write(out, info, [row], ["### m, n\n\n```\nx\n```"], False, "wheels", [],
                        earlier)
    text = out.read_text()
    assert text.startswith(gpu_check.HEADER) and text.count("# Measured results (GPU)") == 1
    sections = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert sections == ["## 2026-12-05, gpu-check on H100", "## 2026-11-22, one H100"]
    assert "#### m, n" in text and text.endswith("measured by hand\n")
    # the repository's file has the header write() keeps
    assert (REPO / "benchmarks" / "RESULTS-gpu.md").read_text().startswith(gpu_check.HEADER)


def test_a_new_out_file_starts_from_the_repository_record(tmp_path: Path) -> None:
    """--out in a folder that is copied back gives a file that can replace the record."""
    record = gpu_check.earlier_sections(REPO / "benchmarks" / "RESULTS-gpu.md")
    assert record.startswith("## ")
    assert gpu_check.earlier_sections(tmp_path / "elsewhere" / "RESULTS-gpu.md") == record


def test_the_budget_cuts_a_running_command_off_and_starts_none_once_spent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.Budget, "MIN_S", 0.5)
    monkeypatch.setattr(gpu_check, "BUDGET", gpu_check.Budget(3.0))
    code, text, s = gpu_check.sh([sys.executable, "-c", "import time; print('started', "
                                  "flush=True); time.sleep(60)"], 600)
    assert code == 124 and 1.0 < s < 20, (code, s)
    assert text.startswith(gpu_check.Budget.MARK + "cut off after 3 s") and "started" in text
    cut = gpu_check.failed("bench", "bench failed", s, text)
    assert cut["ok"] is None and cut["result"].startswith("cut off after") and not cut["detail"]
    marker = tmp_path / "ran"
    code, text, s = gpu_check.sh([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], 600)
    assert code == 124 and s == 0 and not marker.exists()
    assert gpu_check.failed("x", "y", s, text)["result"] == (
        "not run: under 0.5 s of the --budget of 3 s was left")
    # a cut reaches the command's own children too: none is left holding the GPU
    monkeypatch.setattr(gpu_check, "GRACE_S", 1.0)
    monkeypatch.setattr(gpu_check, "BUDGET", gpu_check.Budget(3.0))
    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    code, text, s = gpu_check.sh([sys.executable, "-c", "import subprocess, sys, time; "
                                  f"subprocess.Popen([sys.executable, '-c', {child!r}]); "
                                  "time.sleep(60)"], 600)
    assert code == 124 and s < 20 and text.startswith(gpu_check.Budget.MARK + "cut off")
    pid = int(pid_file.read_text())
    for _ in range(50):  # reaped by init, or a zombie at worst
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the command's child {pid} outlived the cut")
    # without a budget, a command that fails is a failure, with its output
    monkeypatch.setattr(gpu_check, "BUDGET", gpu_check.Budget())
    code, text, s = gpu_check.sh([sys.executable, "-c", "raise SystemExit('boom')"], 60)
    failure = gpu_check.failed("x", f"exit {code}", s, text)
    assert failure["ok"] is False and failure["result"] == "exit 1" and "boom" in failure["detail"]


def test_steps_run_in_the_order_given_the_table_is_written_after_each_and_the_budget_ends_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped from outside keeps what it measured; steps the budget did not reach are
    listed as not run, and are not failures."""
    out, seen = tmp_path / "out" / "results.md", []

    def step(name: str, spend: bool = False):
        def run(cfg: dict, work: Path, data: Path | None) -> tuple[list[dict], list[str]]:
            seen.append((name, out.read_text() if out.exists() else ""))
            if spend:  # as if this step had taken the rest of the budget
                gpu_check.BUDGET.end = 0.0
            return [gpu_check.row(f"{name} ran", True, "fine", 0)], []
        return run

    for name in gpu_check.STEPS:
        monkeypatch.setitem(gpu_check.STEPS, name, step(name, spend=name == "zero"))
    monkeypatch.setattr(gpu_check, "BUDGET", gpu_check.Budget())
    code = gpu_check.main(["--cpu-dry-run", "--only", "fsdp", "zero", "tests", "--budget", "600",
                           "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0 and [name for name, _ in seen] == ["fsdp", "zero"]
    before_zero = seen[1][1]
    assert "| fsdp ran |" in before_zero
    assert "in progress**: steps still to run: zero, tests" in before_zero
    text = out.read_text()
    assert "| fsdp ran |" in text and "| zero ran |" in text and "in progress" not in text
    assert "| step tests | not run: under 30 s of the --budget of 600 s was left |" in text
    assert "**NO**" not in text


def test_a_budget_that_is_not_positive_is_refused_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--cpu-dry-run", "--budget", "0"])
    assert stop.value.code == 2
    assert "--budget 0: give the seconds the run may take" in capsys.readouterr().err


def test_decode_ratios_pair_the_runs_of_one_run_and_judge_targets_on_a_gpu_only() -> None:
    def fig(ips: float, wait: float) -> dict:
        return {"train_images_per_s": ips, "data_wait_fraction": wait}

    figures = {"cpu eager": fig(100, 0.3), "box eager": fig(150, 0.01),
               "cpu compiled": fig(120, 0.4), "box compiled": fig(240, 0.01),
               "box compiled 4w": fig(180, 0.05), "box compiled shards": fig(264, 0.01)}
    dry = {r["check"]: r for r in gpu_check.decode_ratios(figures, gpu_check.DRY)}
    assert dry["real JPEGs eager: decode=boxes / decode=cpu"]["result"] == "1.500"
    assert dry["real JPEGs compiled: decode=boxes / decode=cpu"]["result"] == "2.000"
    four = dry["real JPEGs compiled, decode=boxes: 4 workers / the recipe's"]
    assert four["result"] == "0.750" and four["ok"] is None  # a CPU judges nothing
    assert dry["real JPEGs compiled, decode=boxes: shards / files"]["result"] == "1.100"
    gpu = {r["check"]: r for r in gpu_check.decode_ratios(figures, gpu_check.GPU)}
    assert gpu["real JPEGs compiled, decode=gpu: 4 workers / the recipe's"]["ok"] is False
    # a run that failed leaves its ratios out instead of inventing them
    del figures["box compiled 4w"]
    assert not any("4 workers" in r["check"] for r in gpu_check.decode_ratios(figures, gpu_check.DRY))


# make test-all only; the fast tier trains FSDP for real (tests/distributed/test_fsdp.py) and
# covers the write-up (test_write_adds_a_dated_section_above_the_earlier_ones)
@pytest.mark.extended
def test_dry_run_fsdp_step_benches_fsdp_and_ddp_against_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                "--only", "fsdp", "--out", str(out), "--work", str(tmp_path / "work")],
               timeout=900)
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ")]
    peaks = [ln for ln in rows if "peak memory / plan" in ln]
    assert [ln.split()[1] for ln in peaks] == ["DDP", "FSDP"], rows
    assert all(" MiB / " in ln for ln in peaks)  # measured / planned, both there
    step = [ln for ln in rows if ln.startswith("| FSDP / DDP median step")]
    assert len(step) == 1 and " ms = " in step[0], rows
    assert "**NO**" not in out.read_text() and "[-] FSDP / DDP" in proc.stdout


def test_a_decode_row_names_what_bench_measured_and_whose_decoder() -> None:
    r = {"train_images_per_s": 4100.4, "data_wait_fraction": 0.031, "host_cores": 6.25,
         "pipeline": {"images_per_s": 3900, "cores": 11.5, "step_alone_images_per_s": 5600,
                      "bound_by": "input pipeline", "decoder": None,
                      "other": {"decode": "gpu", "images_per_s": 7800, "vs_run": 2.0,
                                "decoder": "TorchCodec 0.17.0 (nvjpeg) on cuda:0"}}}
    text = gpu_check._decode_result(r)
    assert text.startswith("4,100 images/s, data wait 3.1%, host CPU 6.2 cores")
    assert "pipeline alone 3,900 images/s on 11.5 cores, step alone 5,600" in text
    assert "bound by input pipeline" in text and "(x2.00)" in text
    assert text.endswith("decode=gpu's decoder: TorchCodec 0.17.0 (nvjpeg) on cuda:0")
