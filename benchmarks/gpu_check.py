"""`make gpu-check`: everything ffdist claims about GPUs, checked on the GPU machine it runs on,
and written up with the hardware, the versions and the commit.

    python3 benchmarks/gpu_check.py [--data IMAGEFOLDER] [--wheels wheels/gpu] [--out FILE]
                                    [--budget SECONDS] [--only STEP ...]
    python3 benchmarks/gpu_check.py --cpu-dry-run      # the same steps, tiny, on the CPU

Steps (each one's failure is recorded and the next still runs):
1. the `gpu`/`multigpu` tests (`pytest tests -m "gpu or multigpu"`);
2. `ffdist bench recipes/resnet50.yaml --synthetic --reference --precision bf16,fp16` at
   batch 256, 224 px, channels_last: eager, then model.compile=true (the Trainer's step
   against a hand-written loop in the same process, fp16 next to bf16, TFLOP/s and MFU);
3. the real-JPEG pipeline: ffdist's loader alone with the recipe's workers (and with all
   cores), then `ffdist bench` on that folder (images/s and data-wait share). Without
   --data it writes a folder of 500x375 JPEGs cut from scikit-learn's sample photos;
4. data.decode on that folder: `ffdist bench` end to end, decode=cpu against decode=gpu
   (the box path: workers read bytes and draw crop boxes, the GPU decodes and crops), eager
   and compiled, with the recipe's workers and with 4, and on tar shards of the same JPEGs
   (`ffdist shard`) against the files; each row with images/s, data wait, host CPU use and
   bench's input pipeline alone, then the ratios, each from this run;
5. DeepSpeed ZeRO-2 and ZeRO-3 (recipes/digits_zero2.yaml) under torchrun on every GPU;
6. FSDP (recipes/vit_b16_fsdp.yaml, synthetic images): `ffdist bench` of FSDP and of DDP on
   a model both can hold, under torchrun on every GPU (NCCL with 2 or more), their median
   steps side by side, and each one's peak CUDA memory against `ffdist plan`'s row;
7. the table, as a dated section at the top of benchmarks/RESULTS-gpu.md (earlier sections
   are kept; a dry run writes runs/gpu-check/ instead:
   its numbers are the CPU's at toy sizes, they only prove the script works).

The table is rewritten after every step, so a run stopped from outside keeps what it
measured. `--budget S` fits the run into S seconds (a lease, a job's time limit): every
command's timeout is capped by what is left, a command cut off or never started is "not
run" (not a failure), and `--only` runs its steps in the order given, so the ones that
matter most go first.

A GPU machine without network lacks omegaconf/deepspeed (docs/performance.md): `make
gpu-wheels` on a machine with one fills wheels/gpu/, and this script installs from there
(`pip install --no-index --target .gpu-deps`) before anything else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEPS = REPO / ".gpu-deps"
NEEDED = ("omegaconf", "deepspeed", "hjson", "pydantic")
WHEELS = ("omegaconf", "hjson", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "typing-extensions", "py-cpuinfo", "deepspeed")

# What each step runs at: the GPU sizes of docs/performance.md, or toys for --cpu-dry-run.
GPU = {"bench": ["data.batch_size=256", "data.micro_batch_size=256", "model.channels_last=true"],
       "bench_args": ["--steps", "30", "--warmup", "10", "--reps", "3", "--eval-steps", "10"],
       "compile": ["model.compile=true"], "jpeg": (10, 400, (500, 375)), "jpeg_batch": 256,
       "jpeg_extra": [], "box": "gpu",
       "zero": ["schedule.epochs=3", "launch.device=cuda"],
       "fsdp": ["launch.device=cuda", "data.image_size=224", "model.name=vit_b_16",
                "data.batch_size_per_gpu=64"],
       "fsdp_args": ["--steps", "20", "--warmup", "5", "--reps", "1", "--eval-steps", "2"],
       "device": "cuda"}
DRY = {"bench": ["model.name=resnet18", "data.image_size=32", "data.batch_size=8",
                 "data.micro_batch_size=8", "model.channels_last=true", "launch.device=cpu"],
       "bench_args": ["--steps", "2", "--warmup", "1", "--reps", "1", "--eval-steps", "1"],
       "compile": ["model.compile=true", "model.compile_backend=eager"],
       "jpeg": (4, 8, (64, 48)), "jpeg_batch": 8, "jpeg_extra": ["data.image_size=32"],
       "box": "boxes",
       "zero": ["schedule.max_steps=4", "schedule.epochs=1", "launch.device=cpu"],
       "fsdp": ["launch.device=cpu", "data.image_size=32", "model.name=vit_tiny",
                "data.batch_size_per_gpu=4"],
       "fsdp_args": ["--steps", "2", "--warmup", "1", "--reps", "1", "--eval-steps", "1"],
       "device": "cpu"}


class Budget:
    """--budget: the seconds this run may take (None: no limit). A command starts only with
    MIN_S left, and its timeout is capped by what is left, so every step ends in time."""

    MIN_S = 30.0
    MARK = "[budget] "
    """How a command's output starts when the budget cut it off or never let it start."""

    def __init__(self, seconds: float | None = None):
        self.start(seconds)

    def start(self, seconds: float | None) -> None:
        """From now on, `seconds` are left (None: no limit)."""
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def spent(self) -> bool:
        return self.left() < self.MIN_S

    def not_run(self) -> str:
        return f"not run: under {self.MIN_S:g} s of the --budget of {self.seconds:g} s was left"


BUDGET = Budget()
"""This run's budget: main() sets it from --budget."""


def env() -> dict[str, str]:
    e = dict(os.environ)
    paths = [str(REPO)] + ([str(DEPS)] if DEPS.is_dir() else [])
    e["PYTHONPATH"] = os.pathsep.join([*paths, e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def sh(cmd: list[str], timeout: float, **extra: str) -> tuple[int, str, float]:
    """(exit code, the output's tail, seconds) of one command, never raising. Within
    BUDGET: not started when it is spent, and cut off where it runs out (output starting
    with Budget.MARK, code 124, as for its own timeout)."""
    if BUDGET.spent():
        return 124, Budget.MARK + BUDGET.not_run(), 0.0
    cut, timeout = BUDGET.left() < timeout, min(timeout, BUDGET.left())
    begin = time.perf_counter()
    try:
        code, text = _run(cmd, timeout, {**env(), **extra})
    except subprocess.TimeoutExpired as e:
        why = (f"{Budget.MARK}cut off after {timeout:.0f} s: the --budget of "
               f"{BUDGET.seconds:g} s ran out" if cut else f"timed out after {timeout:.0f} s")
        code, text = 124, f"{why}\n{e.output or ''}"
    except OSError as e:  # no such program (nvidia-smi on a CPU machine, git in a copy)
        code, text = 127, str(e)
    if text.startswith(Budget.MARK):  # the mark first, the output's tail after it
        first, _, rest = text.partition("\n")
        return code, f"{first}\n{rest[-6000:]}", time.perf_counter() - begin
    return code, text[-6000:], time.perf_counter() - begin


def _run(cmd: list[str], timeout: float, environ: dict[str, str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `cmd` in a process group of its own. At its timeout
    the whole group gets SIGINT, which lets pytest write its report and a training run
    stop at a step, then SIGKILL GRACE_S later: no torchrun rank or loader worker is left
    holding the GPU for the next command. TimeoutExpired carries the output."""
    import signal

    with subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
            return proc.returncode, out + err
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out + err) from None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every process of the group has ended already
        pass


GRACE_S = 15.0
"""Seconds between a timed-out command's SIGINT and its SIGKILL."""


def ensure_deps(wheels: Path) -> str:
    """Install the packages this machine lacks from `wheels` (no network), into .gpu-deps."""
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    codec = _torchcodec(wheels) if importlib.util.find_spec("torchcodec") is None else ""
    if not missing:
        return "all present" + codec
    if not wheels.is_dir():
        sys.exit(f"gpu_check: {', '.join(missing)} missing and no wheels in {wheels}; run "
                 "`make gpu-wheels` on a machine with network and copy wheels/gpu here.")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                    "--no-deps", "--find-links", str(wheels), "--target", str(DEPS), *WHEELS],
                   check=True)
    sys.path[:0] = [str(DEPS), str(REPO)]
    return (f"installed {', '.join(missing)} (and their deps) from {wheels} into "
            f"{DEPS.name}/{codec}")


def _torchcodec(wheels: Path) -> str:
    """TorchCodec from `wheels` where make gpu-wheels brought one (optional: without it
    data.decode=gpu decodes with torchvision, and the rows name the decoder that ran)."""
    if not any(wheels.glob("torchcodec-*.whl")):
        return "; no TorchCodec wheel (data.decode=gpu uses torchvision's decoder)"
    code = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                           "--no-deps", "--find-links", str(wheels), "--target", str(DEPS),
                           "torchcodec"]).returncode
    if code:
        return f"; TorchCodec from {wheels} failed to install (pip exit {code})"
    sys.path[:0] = [str(DEPS), str(REPO)]
    return f"; TorchCodec installed from {wheels} into {DEPS.name}/"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "load": "load avg {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())}
    for name in ("torchvision", "deepspeed", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # report, do not stop: the steps say what it costs
            info[name] = f"missing ({type(e).__name__})"
    code, out, _ = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                       "clocks.max.sm,power.limit", "--format=csv,noheader"], 30)
    info["nvidia_smi"] = out.strip().splitlines() if code == 0 else []
    code, out, _ = sh(["git", "rev-parse", "--short", "HEAD"], 30)
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], 30)[1].strip()
    info["commit"] = os.environ.get("FFDIST_COMMIT") or (
        out.strip() + (" (uncommitted changes)" if dirty else "") if code == 0 else "unknown")
    return info


def row(check: str, ok: bool | None, result: str, seconds: float, target: str = "",
        detail: str = "") -> dict[str, Any]:
    mark = {True: "ok", False: "FAILED", None: "-"}[ok]
    print(f"[{mark}] {check}: {result} ({seconds:.0f} s)", flush=True)
    return {"check": check, "ok": ok, "result": result, "target": target,
            "seconds": round(seconds), "detail": detail}


def failed(check: str, result: str, seconds: float, text: str, target: str = "") -> dict:
    """The row of a command that gave no figure: a failure with its output's tail, or,
    where --budget cut it off or never let it start, "not run" (not measured, not failed)."""
    if text.startswith(Budget.MARK):
        return row(check, None, _budget_note(text), seconds, target)
    return row(check, False, result, seconds, target, detail=text)


def _budget_note(text: str) -> str:
    """What --budget did to a command, from its output's first line (after Budget.MARK)."""
    return text.partition("\n")[0].removeprefix(Budget.MARK)


# ------------------------------------------------------------------ 1. the gpu tests

def gpu_tests(cfg: dict, work: Path) -> list[dict]:
    xml = work / "gpu-tests.xml"
    xml.unlink(missing_ok=True)  # a report from an earlier run is not this one's
    code, out, s = sh([sys.executable, "-m", "pytest", "tests", "-m", "gpu or multigpu", "-q",
                       "-p", "no:cacheprovider", "--timeout", "900", f"--junitxml={xml}"], 3600)
    counts = _junit(xml)
    text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} "
            f"skipped of {counts['tests']}") if counts else f"exit {code} (no report)"
    if counts and cfg["device"] == "cpu":
        text += " (no GPU here: skipped)"
    check = "gpu tests (pytest -m 'gpu or multigpu')"
    if counts and counts["failed"]:  # failures count, also in a run the budget cut off
        return [row(check, False, text, s, "all pass", detail=out)]
    if out.startswith(Budget.MARK):  # the tests that ran passed; pytest's report says which
        return [row(check, None, f"{text}; {_budget_note(out)}", s, "all pass")]
    ok = code == 0 and bool(counts)
    return [row(check, ok, text, s, "all pass", detail="" if ok else out)]


def _junit(xml: Path) -> dict[str, int] | None:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = n["failures"] + n["errors"]
    return {"tests": n["tests"], "failed": failed, "skipped": n["skipped"],
            "passed": n["tests"] - failed - n["skipped"]}


# ------------------------------------------------------------------ 2. bench --reference

def bench(cfg: dict, work: Path, name: str, extra: list[str], recipe: str = "resnet50.yaml",
          flags: tuple[str, ...] = ("--synthetic", "--reference", "--precision", "bf16,fp16"),
          timeout: float = 1800) -> tuple[dict | None, str, float]:
    out = work / f"bench-{name}.json"
    code, text, s = sh([sys.executable, "-m", "ffdist.cli", "bench", f"recipes/{recipe}",
                        *cfg["bench"], *extra, *flags, *cfg["bench_args"], "--out", str(out),
                        f"output_dir={work / ('run-' + name)}"], timeout)
    return (json.loads(out.read_text()) if code == 0 and out.exists() else None), text, s


def bench_rows(cfg: dict, work: Path) -> tuple[list[dict], list[str]]:
    """Eager and compiled: per precision the Trainer/loop ratio, and bench's headline
    against its own median step (stalls). Toy sizes judge nothing (ok is left empty)."""
    rows, tables, judge = [], [], cfg["device"] == "cuda"
    for name, extra, target in (("eager", [], 0.98), ("compiled", cfg["compile"], 0.97)):
        r, text, s = bench(cfg, work, name, extra)
        if r is None:
            rows.append(failed(f"bench --reference, {name}", "bench failed", s, text))
            continue
        model = f"{r['model']} b{r['batch_size']} {r['image_size']}px"
        tables.append(f"### {model}, {name}\n\n```\n{_table(text)}\n```")
        for x in r["runs"]:
            ratio, p90 = x["ratio_vs_reference"], x["step_ms_p90"] / x["step_ms_p50"]
            mfu = f", MFU {100 * x['mfu']:.1f}%" if x.get("mfu") is not None else ""
            rows.append(row(
                f"{model} {x['precision']} {name}: Trainer / hand-written loop",
                ratio >= target if judge else None,
                f"{ratio:.3f} ({x['train_images_per_s_p50']:,.0f} vs "
                f"{x['reference']['train_images_per_s_p50']:,.0f} img/s at the median step; "
                f"{x['tflops_per_device']:.1f} TFLOP/s{mfu})", s / len(r["runs"]),
                f">= {target}"))
            headline = x["train_images_per_s"] / x["train_images_per_s_p50"]
            rows.append(row(f"{model} {x['precision']} {name}: bench reported / median step",
                            abs(headline - 1) <= 0.03 and p90 <= 1.05 if judge else None,
                            f"{headline:.3f}, p90/p50 {p90:.3f}", 0,
                            "within 3%, p90/p50 <= 1.05"))
        ips = {x["precision"]: x["train_images_per_s_p50"] for x in r["runs"]}
        if {"bf16", "fp16"} <= ips.keys():
            rows.append(row(f"{model} {name}: fp16 / bf16 images/s", None,
                            f"{ips['fp16'] / ips['bf16']:.3f}", 0))
    return rows, tables


def _table(text: str) -> str:
    """The table bench printed (its last block before 'wrote ...')."""
    lines = text.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("model "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("wrote "))
    return "\n".join(lines[start:end])


# ------------------------------------------------------------------ 3. real JPEGs

def _write_class(job: tuple[Path, int, int, tuple[int, int], int]) -> int:
    """One class folder of JPEGs: random crops of scikit-learn's two sample photos (427 x
    640), flipped at random, resized to `size` (ImageNet's typical 500 x 375), quality 90."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder, c, count, size, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    photos, rng = load_sample_images().images, np.random.default_rng(seed)
    for i in range(count):
        photo = photos[(c + i) % len(photos)]
        h, w = int(rng.integers(200, 420)), int(rng.integers(260, 630))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        img = Image.fromarray(photo[y:y + h, x:x + w]).resize(size)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return count


def make_jpegs(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> int:
    """An imagefolder (train/ and val/) of `classes` x `per_class` JPEGs, made in parallel."""
    from multiprocessing import Pool

    jobs = [(root / "train" / f"c{c}", c, per_class, size, c) for c in range(classes)]
    jobs += [(root / "val" / f"c{c}", c, max(2, per_class // 20), size, 1000 + c)
             for c in range(classes)]
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        return sum(pool.map(_write_class, jobs))


LOADER = """
import sys, time, torch
from ffdist import recipe_load
from ffdist.assemble import build_data, resolve
from ffdist.data import DevicePrefetcher
rcp = recipe_load.load("recipes/resnet50.yaml", sys.argv[2:])
dev = torch.device(sys.argv[1])
streams = build_data(rcp, resolve(rcp, 1, dev), 0)
batches = DevicePrefetcher(streams.train, dev, streams.spec.mean, streams.spec.std, True)
n, begin = 0, None
for epoch in range(100):
    streams.train.set_epoch(epoch)
    for i, (x, _) in enumerate(batches):
        if begin is None and i == 2:  # workers up, first batches out
            torch.cuda.synchronize() if dev.type == "cuda" else None
            begin = time.perf_counter()
        elif begin is not None:
            n += len(x)
    if begin is not None and n >= 8 * len(x):
        break
torch.cuda.synchronize() if dev.type == "cuda" else None
print(f"IMAGES_PER_S {n / (time.perf_counter() - begin):.1f} workers {rcp.data.num_workers}")
"""


def jpeg_folder(cfg: dict, work: Path, data: Path | None) -> tuple[Path, list[dict]]:
    """--data, else the generated folder in `work` (written once per run: a row says so)."""
    if data is not None:
        return data, []
    data = work / "jpegs"
    if (data / "train").is_dir():
        return data, []
    begin = time.perf_counter()
    classes, per_class, size = cfg["jpeg"]
    n = make_jpegs(data, classes, per_class, size)
    return data, [row("JPEG folder", None, f"{n} images {size[0]}x{size[1]} written to {data}",
                      time.perf_counter() - begin)]


def jpeg_common(cfg: dict, data: Path) -> list[str]:
    """The overrides every real-JPEG run shares: the folder, its classes, the batch."""
    classes = sum(1 for c in (data / "train").iterdir() if c.is_dir())
    return [f"data.root={data}", f"model.num_classes={classes}",
            f"data.batch_size={cfg['jpeg_batch']}",
            f"data.micro_batch_size={cfg['jpeg_batch']}", *cfg["jpeg_extra"]]


def jpeg_rows(cfg: dict, work: Path, data: Path | None) -> list[dict]:
    data, rows = jpeg_folder(cfg, work, data)
    from_recipe = _recipe_workers()
    common = jpeg_common(cfg, data)
    for workers in sorted({from_recipe, max(1, (os.cpu_count() or 2) - 2)}):
        code, out, s = sh([sys.executable, "-c", LOADER, cfg["device"], *common,
                           f"data.num_workers={workers}"], 1200)
        rate = next((ln.split()[1] for ln in out.splitlines() if ln.startswith("IMAGES_PER_S")),
                    None)
        check = (f"JPEG loader alone, {workers} workers"
                 f"{' (the recipe)' if workers == from_recipe else ''}")
        rows.append(row(check, True, f"{float(rate):,.0f} images/s", s) if code == 0 and rate
                    else failed(check, f"exit {code}", s, out))
    r, text, s = bench(cfg, work, "jpeg", [*common, "data.name=imagefolder"],
                       flags=(), timeout=1800)
    if r is None:
        return [*rows, failed("bench on the JPEG folder", "bench failed", s, text)]
    rows.append(row(f"bench on the JPEG folder, {from_recipe} workers", True,
                    f"{r['train_images_per_s']:,.0f} images/s, data wait "
                    f"{100 * r['data_wait_fraction']:.1f}%", s))
    return rows


# ------------------------------------------------------------------ 4. data.decode

# (label, data.decode is the box path's, compiled, workers: None = the recipe's, shards), the
# runs the targets need first: what fits a --budget is what matters most
DECODE_RUNS = (("box compiled", True, True, None, False), ("cpu compiled", False, True, None, False),
               ("box compiled 4w", True, True, 4, False), ("box eager", True, False, None, False),
               ("cpu eager", False, False, None, False),
               ("box compiled shards", True, True, None, True),
               ("cpu compiled 4w", False, True, 4, False))
TARGET_IPS, TARGET_WAIT, TARGET_4W = 6000, 0.02, 0.9
"""On one H200 (16 cores): ResNet-50 on real JPEGs, bf16 + compile + channels_last, at >=
6,000 images/s with data wait <= 2%; with 4 loader workers >= 0.9 of that."""


def decode_rows(cfg: dict, work: Path, data: Path | None) -> list[dict]:
    """`ffdist bench` end to end on real JPEGs, data.decode=cpu against the box path (gpu;
    boxes on the dry run's CPU), eager and compiled, with the recipe's workers and with 4,
    and the box path on tar shards of the same JPEGs against the files. Each row: images/s,
    data wait, the host CPU the bench process tree used, and bench's input pipeline alone."""
    data, rows = jpeg_folder(cfg, work, data)
    files = [*jpeg_common(cfg, data), "data.name=imagefolder"]
    shards, made = work / "shards", []
    if not (shards / "index.json").is_file():
        code, out, s = sh([sys.executable, "-m", "ffdist.cli", "shard", str(data), "--out",
                           str(shards)], 1800)
        check = "tar shards of the JPEG folder (`ffdist shard`)"
        made.append(row(check, True, "written", s) if code == 0
                    else failed(check, f"exit {code}", s, out))
    rows += made
    workers, figures = _recipe_workers(), {}
    for label, box, compiled, n, on_shards in DECODE_RUNS:
        decode = cfg["box"] if box else "cpu"
        w = n or workers
        source = ([*jpeg_common(cfg, data), "data.name=shards", f"data.train_shards={shards}"]
                  if on_shards else files)
        extra = [*source, f"data.decode={decode}", f"data.num_workers={w}",
                 *(cfg["compile"] if compiled else [])]
        cpu0 = _children_cpu()
        r, text, s = bench(cfg, work, "decode-" + label.replace(" ", "-"), extra, flags=())
        name = (f"real JPEGs, decode={decode}, {'compiled' if compiled else 'eager'}, {w} "
                f"workers, {'shards' if on_shards else 'files'}")
        if r is None:
            rows.append(failed(name, "bench failed", s, text))
            continue
        r["host_cores"] = (_children_cpu() - cpu0) / s if s > 0 else 0.0
        figures[label] = r
        rows.append(row(name, None, _decode_result(r), s))
    return rows + decode_ratios(figures, cfg)


def _decode_result(r: dict) -> str:
    p = r.get("pipeline") or {}
    alone = (f"; pipeline alone {p['images_per_s']:,.0f} images/s on "
             f"{p['cores'] or 0:.1f} cores, step alone {p['step_alone_images_per_s']:,.0f}, "
             f"bound by {p['bound_by']}" if p else "")
    other = p.get("other") or {}
    if "images_per_s" in other:
        alone += (f"; decode={other['decode']}'s pipeline alone {other['images_per_s']:,.0f} "
                  f"images/s (x{other['vs_run']:.2f})")
    decoder = (f"; decoder: {p['decoder']}" if p.get("decoder") else
               f"; decode={other['decode']}'s decoder: {other['decoder']}"
               if other.get("decoder") else "")
    return (f"{r['train_images_per_s']:,.0f} images/s, data wait "
            f"{100 * r['data_wait_fraction']:.1f}%, host CPU {r['host_cores']:.1f} cores "
            f"(the bench process and its workers, start-up included){alone}{decoder}")


def decode_ratios(figures: dict[str, dict], cfg: dict) -> list[dict]:
    """The ratios of decode_rows' runs, each pair from this run; the targets are judged on
    a GPU only (the 6,000 images/s one on an H200 only: it is that chip's figure)."""
    ips = {k: v["train_images_per_s"] for k, v in figures.items()}
    judge = cfg["device"] == "cuda"
    box = cfg["box"]
    out = []
    for mode in ("eager", "compiled"):
        if f"cpu {mode}" in ips and f"box {mode}" in ips:
            out.append(row(f"real JPEGs {mode}: decode={box} / decode=cpu", None,
                           f"{ips[f'box {mode}'] / ips[f'cpu {mode}']:.3f}", 0))
    if "box compiled" in ips and "box compiled 4w" in ips:
        ratio = ips["box compiled 4w"] / ips["box compiled"]
        out.append(row(f"real JPEGs compiled, decode={box}: 4 workers / the recipe's", ratio
                       >= TARGET_4W if judge else None, f"{ratio:.3f}", 0, f">= {TARGET_4W}"))
    if "box compiled" in ips and "box compiled shards" in ips:
        out.append(row(f"real JPEGs compiled, decode={box}: shards / files", None,
                       f"{ips['box compiled shards'] / ips['box compiled']:.3f}", 0))
    if "box compiled" in figures:
        r = figures["box compiled"]
        h200 = judge and any("H200" in g for g in _gpu_names())
        ok = r["train_images_per_s"] >= TARGET_IPS and r["data_wait_fraction"] <= TARGET_WAIT
        out.append(row(f"real JPEGs compiled, decode={box}: the H200 target", ok if h200 else None,
                       f"{r['train_images_per_s']:,.0f} images/s, data wait "
                       f"{100 * r['data_wait_fraction']:.1f}%" + ("" if h200 else
                                                                   " (judged on an H200 only)"),
                       0, f">= {TARGET_IPS:,} images/s, data wait <= {100 * TARGET_WAIT:.0f}%"))
    return out


def _children_cpu() -> float:
    """CPU seconds (user + system) of this script's finished child processes and theirs."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _recipe_workers() -> int:
    import yaml

    return int(yaml.safe_load((REPO / "recipes" / "resnet50.yaml").read_text())["data"]
               ["num_workers"])


# ------------------------------------------------------------------ 5. ZeRO

def zero_rows(cfg: dict, work: Path) -> list[dict]:
    import torch

    nproc = max(1, torch.cuda.device_count()) if cfg["device"] == "cuda" else 2
    rows = []
    for stage in (2, 3):
        out = work / f"zero{stage}"
        code, text, s = sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                            str(nproc), "--master_port", str(_free_port()), "-m", "ffdist.train",
                            "recipes/digits_zero2.yaml", f"strategy.zero_stage={stage}",
                            *cfg["zero"], f"output_dir={out}", "log.tensorboard=false",
                            "log.progress=false"], 1800)
        end = _end(out)
        check = f"ZeRO-{stage} digits, torchrun x {nproc} ({cfg['device']})"
        rows.append(row(check, True, f"top-1 {end['final_top1']:.4f}, fit "
                        f"{end['seconds']:.1f} s", s, "trains, evaluates")
                    if code == 0 and end is not None
                    else failed(check, f"exit {code}", s, text, "trains, evaluates"))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end(run_dir: Path) -> dict | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    ends = [e for e in map(json.loads, lines) if e.get("event") == "end"]
    return ends[-1] if ends else None


# ------------------------------------------------------------------ 6. FSDP

def fsdp_rows(cfg: dict, work: Path) -> list[dict]:
    """FSDP against DDP, the same recipe and model, every GPU (2 CPU ranks in a dry run):
    the step (median ms, FSDP / DDP) and each one's peak memory against `ffdist plan`.
    Peak memory is judged on a GPU only (CUDA's max_memory_allocated; a dry run's is RSS):
    within 0.5x-1.5x of the plan's row (the plan leaves out the CUDA context, workspaces,
    NCCL buffers and fragmentation, and counts one gathered block)."""
    import torch

    nproc = max(1, torch.cuda.device_count()) if cfg["device"] == "cuda" else 2
    per_gpu = int(next(o for o in cfg["fsdp"] if "per_gpu" in o).split("=")[1])
    common = [o for o in cfg["fsdp"] if "per_gpu" not in o] + [
        "data.name=synthetic", f"data.batch_size={per_gpu * nproc}", "data.mix_group=null",
        f"data.micro_batch_size={per_gpu}"]
    rows, steps = [], {}
    for name in ("ddp", "fsdp"):
        out = work / f"bench-{name}-vit.json"
        code, text, s = sh([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                            str(nproc), "--master_port", str(_free_port()), "-m", "ffdist.bench",
                            "recipes/vit_b16_fsdp.yaml", *common, f"strategy.name={name}",
                            "--synthetic", *cfg["fsdp_args"], "--out", str(out),
                            f"output_dir={work / ('run-' + name + '-vit')}"], 1800)
        if code != 0 or not out.exists():
            rows.append(failed(f"{name.upper()} bench, vit x {nproc}", f"exit {code}", s, text))
            continue
        r = json.loads(out.read_text())
        steps[name] = r["step_ms_p50"]
        code, plan_text, _ = sh([sys.executable, "-m", "ffdist.cli", "plan",
                                 "recipes/vit_b16_fsdp.yaml", *common, f"strategy.name={name}",
                                 "--gpus", str(nproc), "--json"], 900)
        planned = None
        if code == 0:  # the JSON object among plan's progress lines (stderr)
            facts, _ = json.JSONDecoder().raw_decode(plan_text[plan_text.index("{"):])
            planned = facts["rows"][name.upper()]["total"]
        ratio = r["peak_mem_bytes"] / planned if planned else None
        judged = cfg["device"] == "cuda" and ratio is not None
        rows.append(row(
            f"{name.upper()} vit x {nproc} ({cfg['device']}{', NCCL' if judged and nproc > 1 else ''}):"
            " peak memory / plan", (0.5 <= ratio <= 1.5) if judged else None,
            f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB / {planned / 2**20:,.0f} MiB = {ratio:.2f}"
            if ratio is not None else "no plan", s, "0.5 - 1.5" if judged else ""))
    if len(steps) == 2:
        rows.append(row(f"FSDP / DDP median step, vit x {nproc}", None,
                        f"{steps['fsdp']:.1f} / {steps['ddp']:.1f} ms = "
                        f"{steps['fsdp'] / steps['ddp']:.3f}", 0))
    return rows


# ------------------------------------------------------------------ 7. the write-up

HEADER = """# Measured results (GPU)

Dated sections, newest first, each with the machine, the versions and the code it
measured. `make gpu-check` (benchmarks/gpu_check.py) adds its section at the top; how each
figure is made: [docs/performance.md](../docs/performance.md). CPU results:
[RESULTS.md](RESULTS.md).
"""


def earlier_sections(out: Path) -> str:
    """The dated sections already in `out` (from its first `## ` heading on): kept below
    the new one, so that a run never erases the record of another. A new `out` (elsewhere:
    a folder that is copied back) starts from the repository's record, so that it can
    replace benchmarks/RESULTS-gpu.md as it is."""
    if not out.is_file():
        out = REPO / "benchmarks" / "RESULTS-gpu.md"
    lines = out.read_text().splitlines(keepends=True) if out.is_file() else []
    for i, line in enumerate(lines):
        if line.startswith("## "):
            return "".join(lines[i:])
    return ""


def write(out: Path, info: dict, rows: list[dict], tables: list[str], dry: bool,
          deps: str, argv: list[str], earlier: str = "", left: tuple[str, ...] = ()) -> None:
    """The run's section above `earlier` (read once, before the first write: the file is
    rewritten after every step). `left`: the steps still to run, said while there are any."""
    gpus = ", ".join(info["nvidia_smi"]) or ", ".join(info["gpus"]) or "none"
    head = (["# ffdist gpu-check: CPU DRY RUN (toy sizes; these are NOT GPU numbers)", ""]
            if dry else [HEADER])
    lines = [*head, f"## {info['date'][:10]}, gpu-check on {gpus}", "",
             f"- date: {info['date']}, host {info['host']}, {info['load']}",
             f"- GPUs (name, driver, memory, max SM clock, power limit): {gpus}",
             f"- CPU cores: {info['cpu_cores']}; Python {info['python']}; torch "
             f"{info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}); torchvision "
             f"{info['torchvision']}; deepspeed {info['deepspeed']}; accelerate "
             f"{info['accelerate']}",
             f"- ffdist commit: {info['commit']}; dependencies: {deps}",
             f"- command: `python3 benchmarks/gpu_check.py {' '.join(argv)}`",
             *([f"- **in progress**: steps still to run: {', '.join(left)}"] if left else []),
             "",
             "| check | result | target | ok | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        mark = {True: "yes", False: "**NO**", None: ""}[r["ok"]]
        lines.append(f"| {r['check']} | {r['result']} | {r['target']} | {mark} | {r['seconds']} |")
    lines += ["", "Targets: Trainer step / hand-written loop >= 0.98 eager, >= 0.97 "
              "compiled; bench's reported images/s within 3% of its median step, no stall "
              "spikes; real JPEGs with data.decode=gpu, compiled: >= 6,000 images/s and data "
              "wait <= 2% on an H200, 4 workers >= 0.9 of the recipe's. How each figure is "
              "made: docs/performance.md.", "",
              *[f"#{t}" for t in tables]]
    failed = [r for r in rows if r["ok"] is False and r["detail"]]
    if failed:
        lines += ["", "### Failures (output tails)"]
        for r in failed:
            lines += ["", f"#### {r['check']}", "", "```", r["detail"][-3000:].strip(), "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + (f"\n{earlier}" if earlier else ""))
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="every step at toy sizes on the CPU (proves the script, not the GPU)")
    p.add_argument("--data", type=Path, help="an imagefolder (train/, val/) of JPEGs to time")
    p.add_argument("--wheels", type=Path, default=REPO / "wheels" / "gpu")
    p.add_argument("--out", type=Path, help="default benchmarks/RESULTS-gpu.md "
                                            "(dry run: runs/gpu-check/RESULTS-gpu-dry-run.md)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "gpu-check",
                   help="scratch folder: bench.json files, run folders, the JPEGs")
    p.add_argument("--only", nargs="*", choices=tuple(STEPS),
                   help="run these steps only, in this order")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="end within this many seconds: commands are cut off where it runs "
                        "out, and the steps not reached are listed as not run")
    args = p.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget {args.budget:g}: give the seconds the run may take, more than 0")
    BUDGET.start(args.budget)
    deps = ensure_deps(args.wheels)
    import torch

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible; run it on a GPU machine, or --cpu-dry-run.")
    cfg = DRY if dry else GPU
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    steps = tuple(args.only or STEPS)
    out = args.out or (work / "RESULTS-gpu-dry-run.md" if dry
                       else REPO / "benchmarks" / "RESULTS-gpu.md")
    earlier = "" if dry else earlier_sections(out)
    rows: list[dict] = []
    tables: list[str] = []
    for i, step in enumerate(steps):
        if BUDGET.spent():
            rows.append(row(f"step {step}", None, BUDGET.not_run(), 0))
        else:
            more, more_tables = STEPS[step](cfg, work, args.data)
            rows, tables = rows + more, tables + more_tables
        write(out, info, rows, tables, dry, deps, argv, earlier, steps[i + 1:])
    return 1 if any(r["ok"] is False for r in rows) else 0


Step = Callable[[dict, Path, "Path | None"], tuple[list[dict], list[str]]]
STEPS: dict[str, Step] = {
    "tests": lambda cfg, work, data: (gpu_tests(cfg, work), []),
    "bench": lambda cfg, work, data: bench_rows(cfg, work),
    "jpeg": lambda cfg, work, data: (jpeg_rows(cfg, work, data), []),
    "decode": lambda cfg, work, data: (decode_rows(cfg, work, data), []),
    "zero": lambda cfg, work, data: (zero_rows(cfg, work), []),
    "fsdp": lambda cfg, work, data: (fsdp_rows(cfg, work), []),
}
"""The steps of the module docstring, in their default order: (rows, tables) of each."""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
