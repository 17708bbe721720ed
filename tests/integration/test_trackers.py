"""The tracker sinks (mlflow, wandb, csv) in real training runs with the real packages, read
back with the packages' own readers: a run stopped on request (SIGTERM, exit 75) and then
resumed, and what the trackers hold afterwards: one MLflow run (KILLED after the stop,
FINISHED at the end) with the recipe as params and every number of metrics.jsonl at its
step, pictures and model.pt; one W&B run id across both offline segments, whose history
is metrics.jsonl's; CSV files holding each record once. A run that fails is marked so by
both trackers, and a tracking store that cannot be written costs one warning, not the run.

Runs use MLFLOW_TRACKING_URI=sqlite:///<tmp>/mlflow.db and W&B's default here (WANDB_MODE
unset: offline), in a temporary working directory (MLflow puts artifacts under ./mlruns),
with W&B's cache, config and data folders there too (not in the home folder)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ffdist.errors import EXIT_DIVERGED
from ffdist.recipe import flatten
from ffdist.sinks import measurements
from tests.helpers import CPU, RECIPES, env, metrics

ARGS = (str(RECIPES / "digits.yaml"), "schedule.epochs=2", "log.every_steps=5", "precision=fp32",
        CPU, "log.tensorboard=false", "log.sinks=[jsonl,csv,mlflow,wandb,progress]")


def kept_home(work: Path) -> dict[str, str]:
    """W&B's own folders (its core's debug logs, settings, staging) inside `work`, and
    MLflow's telemetry off (it keeps an id in ~/.config/mlflow): a test leaves the home
    folder as it was."""
    return {**{f"WANDB_{k}_DIR": str(work / f"wandb-{k.lower()}")
               for k in ("CACHE", "CONFIG", "DATA")}, "MLFLOW_DISABLE_TELEMETRY": "true"}


def tracker_env(work: Path, **extra: str) -> dict[str, str]:
    e = env(MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", **kept_home(work), **extra)
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
        e.pop(key, None)
    return e


def train(work: Path, out: Path, *overrides: str, timeout: float = 300,
          **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffdist.train", *ARGS, f"output_dir={out}",
                           *overrides], cwd=work, env=tracker_env(work, **extra),
                          capture_output=True, text=True, timeout=timeout)


def client(work: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")


def mlflow_id(out: Path) -> str:
    return json.loads((out / "mlflow-run.json").read_text())["run_id"]


def stop_at(work: Path, out: Path, step: int) -> subprocess.CompletedProcess:
    """Train with every step slowed, SIGTERM once metrics.jsonl reaches `step`: exit 75."""
    proc = subprocess.Popen([sys.executable, "-m", "ffdist.train", *ARGS, f"output_dir={out}"],
                            cwd=work, env=tracker_env(work, FFDIST_FAULT="slow:step=1-44:ms=150"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(r.get("step", 0) >= step and r.get("split") == "train" for r in metrics(out)):
                break
        except (FileNotFoundError, ValueError):
            pass  # not written yet, or a line being written
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("trackers")
    out = work / "digits-a"
    first = stop_at(work, out, step=10)
    status = client(work).get_run(mlflow_id(out)).info.status if first.returncode == 75 else None
    second = train(work, out)
    return {"work": work, "out": out, "first": first, "second": second,
            "status_after_stop": status}


def test_a_stopped_run_resumes_into_the_same_mlflow_run(tracked) -> None:
    first, second = tracked["first"], tracked["second"]
    assert first.returncode == 75, first.stdout[-3000:]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step" in second.stdout
    assert tracked["status_after_stop"] == "KILLED"
    c, run_id = client(tracked["work"]), mlflow_id(tracked["out"])
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-a"
    experiment = c.get_experiment(run.info.experiment_id)
    assert experiment.name == "digits"  # log.experiment unset: the recipe's name
    assert [r.info.run_id for r in c.search_runs([experiment.experiment_id])] == [run_id]


def test_mlflow_holds_the_recipe_and_every_number_of_metrics_jsonl(tracked) -> None:
    out, c = tracked["out"], client(tracked["work"])
    run_id = mlflow_id(out)
    run = c.get_run(run_id)
    recipe = flatten(json.loads(json.dumps(_saved_recipe(out))))
    assert run.data.params == {k: str(v) for k, v in recipe.items()}
    want: dict[str, set[tuple[int, float]]] = {}
    for rec in metrics(out):
        prefix = f"{rec['split']}/" if "split" in rec else ""
        for key, value in measurements(rec).items():
            want.setdefault(prefix + key, set()).add((rec["step"], float(value)))
    assert set(run.data.metrics) == set(want)
    for key, points in want.items():
        history = [(m.step, m.value) for m in c.get_metric_history(run_id, key)]
        assert len(history) == len(points) and set(history) == points, key
    files = _artifacts(c, run_id)
    assert "model.pt" in files
    confusions = [f for f in files if f.startswith("images/val~confusion+step+")
                  and f.endswith(".png")]
    assert len(confusions) == len([r for r in metrics(out) if r.get("split") == "val"])


def test_wandb_offline_segments_share_one_run_id_and_hold_the_history(tracked) -> None:
    out = tracked["out"]
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders  # the stopped segment and the resumed one
    ids = {json.loads((out / "wandb-run.json").read_text())["run_id"]}
    history: dict[str, dict[int, Any]] = {}
    exits, config = [], {}
    for folder in folders:
        for rec in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                assert rec.run.project == "digits" and rec.run.display_name == "digits-a"
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "exit":
                exits.append(rec.exit.exit_code)
            elif kind == "history":
                items = history_row(rec)
                for key, value in items.items():
                    history.setdefault(key, {})[items["_step"]] = value
    assert len(ids) == 1 and exits == [75, 0]
    assert config["optim"]["lr"] == 0.1 and config["model"]["name"] == "small_cnn"
    for rec in metrics(out):
        if "split" in rec:
            for key, value in measurements(rec).items():
                assert history[f"{rec['split']}/{key}"][rec["step"]] == pytest.approx(value)
    val_steps = {r["step"] for r in metrics(out) if r.get("split") == "val"}
    assert set(history["val/confusion"]) == val_steps
    assert all(v["_type"] == "image-file" for v in history["val/confusion"].values())


def test_the_csv_files_hold_each_record_of_metrics_jsonl_once(tracked) -> None:
    import csv

    out = tracked["out"]
    for split in ("train", "val"):
        with open(out / "csv" / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        records = [r for r in metrics(out) if r.get("split") == split]
        assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
        assert [float(r["loss"]) for r in rows] == [r["loss"] for r in records]


def test_a_failed_run_is_failed_in_both_trackers(tracked) -> None:
    work = tracked["work"]  # its MLflow store, another experiment
    out = work / "nan"
    proc = train(work, out, "schedule.nan_policy=stop", "log.experiment=failures",
                 FFDIST_FAULT="nan_loss:step=2")
    assert proc.returncode == EXIT_DIVERGED and "NaN" in proc.stderr, proc.stderr[-3000:]
    run = client(work).get_run(mlflow_id(out))
    assert run.info.status == "FAILED"
    assert client(work).get_experiment(run.info.experiment_id).name == "failures"
    folder = next((out / "wandb").glob("offline-run-*"))
    exits = [r.exit.exit_code for r in wandb_records(next(folder.glob("run-*.wandb")))
             if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_a_tracking_store_that_cannot_be_written_costs_one_warning(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"), CPU,
         "precision=fp32", "log.sinks=[jsonl,mlflow]", "schedule.max_steps=3",
         f"output_dir={out}"], cwd=tmp_path,
        env=env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/a-file/mlflow.db",
                **kept_home(tmp_path)),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("log sink 'mlflow' failed in start (") == 1, text[-3000:]
    assert "it is switched off and training goes on without it" in text
    assert (out / "model.pt").is_file() and not (out / "mlflow-run.json").exists()


# ---------------------------------------------------------------------------- readers

def _saved_recipe(out: Path) -> dict:
    import yaml

    return yaml.safe_load((out / "recipe.yaml").read_text())


def _artifacts(c: Any, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for f in c.list_artifacts(run_id, path):
        found += _artifacts(c, run_id, f.path) if f.is_dir else [f.path]
    return found


def history_row(rec: Any) -> dict[str, Any]:
    """A W&B history record as {key: value}. An item names its key in `key` or in
    `nested_key` (a list); a picture's fields come as nested keys (["val/confusion",
    "_type"], ...) and are put back into one dict."""
    row: dict[str, Any] = {}
    for item in rec.history.item:
        value = json.loads(item.value_json)
        path = [item.key] if item.key else list(item.nested_key)  # wandb writes either
        if len(path) == 1:
            row[path[0]] = value
        else:
            row.setdefault(path[0], {})["/".join(path[1:])] = value
    return row


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (run-<id>.wandb), parsed with wandb's own protobuf.

    wandb 0.31 has no Python reader for these files (its Go core writes and reads them).
    The file is LevelDB's log format after a 7-byte header (":W&B", magic, version):
    32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type: full, first,
    middle, last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", data[:7]
    records, parts, pos = [], [], 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


@pytest.mark.extended  # its common path: test_wandb_offline_segments_share_one_run_id_and_hold_the_history
def test_the_wandb_reader_reads_a_run_written_here(tmp_path: Path) -> None:
    """The reader above, on a run written by wandb itself in this test, with records that
    span blocks (a 100 KiB config)."""
    code = f"""
import wandb
run = wandb.init(mode="offline", dir={str(tmp_path)!r}, project="p", id="abc123",
                 config={{"big": "x" * 100_000}}, settings=wandb.Settings(console="off"))
for step in range(3):
    run.log({{"loss": 1.0 / (step + 1)}}, step=step)
run.finish(exit_code=0)
"""
    proc = subprocess.run([sys.executable, "-c", code],
                          env=env(WANDB_MODE="offline", **kept_home(tmp_path)),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = next(tmp_path.glob("wandb/offline-run-*/run-abc123.wandb"))
    recs = wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in recs]
    run = recs[kinds.index("run")].run
    assert run.run_id == "abc123" and len(run.config.update) >= 1
    assert any(json.loads(u.value_json) == "x" * 100_000 for u in run.config.update)
    losses = [history_row(r)["loss"] for r in recs if r.WhichOneof("record_type") == "history"]
    assert losses == [1.0, 0.5, 1.0 / 3] and kinds.count("exit") == 1
    assert os.path.getsize(path) > 32 * 1024
