"""The log-sink seam without training: which sinks a recipe selects (log.sinks and the
log.tensorboard / log.progress switches), unknown and repeated names refused in one
sentence before anything is written, the fan-out's guard (a failing sink reported once,
switched off, the others still fed), how the run ended told to every sink before it
closes, TensorBoard's tags from a record, metrics.jsonl and the CSV files cut back on
resume (and a CSV header widened for a new key), the line the progress sink prints
without a terminal (its whole-run ETA), a tracker whose package is missing saying how to
install it, and TensorBoard imported only when its sink is built."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from ffdist import recipe, recipe_load, sinks
from ffdist.errors import RecipeError
from ffdist.monitor import Monitor
from ffdist.sinks import Record, Sink, SinkSetup
from ffdist.sinks.jsonl import JsonlSink
from tests.helpers import RECIPES, REPO, env


def _log(*overrides: str) -> recipe.LogConfig:
    return recipe_load.load(RECIPES / "digits.yaml", list(overrides)).log


@pytest.mark.parametrize("overrides, want", [
    ((), ["jsonl", "tensorboard", "progress"]),
    (("log.tensorboard=false",), ["jsonl", "progress"]),
    (("log.progress=false", "log.tensorboard=false"), ["jsonl"]),
    (("log.sinks=[progress,jsonl]",), ["progress", "jsonl"]),
    (("log.sinks=[jsonl]", "log.tensorboard=true"), ["jsonl"]),  # true adds nothing
    (("log.sinks=[tensorboard,jsonl]", "log.tensorboard=false"), ["jsonl"]),
    (("log.sinks=[]",), []),
])
def test_log_sinks_less_the_switched_off_ones(overrides: tuple[str, ...], want: list[str]) -> None:
    assert sinks.selected(_log(*overrides)) == want


def test_an_unknown_sink_gets_did_you_mean() -> None:
    with pytest.raises(RecipeError) as e:
        sinks.check(_log("log.sinks=[jsonl,tensorbord]"))
    assert str(e.value) == ("log.sinks: 'tensorbord' is not a log sink (the sinks are csv, "
                            "jsonl, mlflow, progress, tensorboard, wandb); did you mean "
                            "'tensorboard'?")
    sinks.check(_log())  # the default names are all registered


def test_a_sink_named_twice_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"log.sinks=.*list jsonl once"):
        _log("log.sinks=[jsonl,progress,jsonl]")


def test_train_refuses_an_unknown_sink_before_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ffdist.train", str(RECIPES / "digits.yaml"),
                           "log.sinks=[jsonl,progres]", f"output_dir={out}"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ffdist: error: log.sinks: 'progres' is not a log sink (the sinks are csv, jsonl, "
        "mlflow, progress, tensorboard, wandb); did you mean 'progress'?"]
    assert not out.exists()


class Fine(Sink):
    def __init__(self, setup: SinkSetup | None = None) -> None:
        self.records: list[Record] = []
        self.closed = 0

    def record(self, rec: Record) -> None:
        self.records.append(rec)
        rec["loss"] = -1.0  # its own copy: no other sink sees this

    def close(self) -> None:
        self.closed += 1


class Broken(Fine):
    def __init__(self, fail_in: str) -> None:
        super().__init__()
        self.fail_in, self.calls = fail_in, []

    def _maybe_fail(self, member: str) -> None:
        self.calls.append(member)
        if member == self.fail_in:
            raise OSError("disk full")

    def record(self, rec: Record) -> None:
        self._maybe_fail("record")

    def progress(self, epoch: int, done: int, total: int) -> None:
        self._maybe_fail("progress")


@pytest.mark.parametrize("fail_in", ["record", "progress"])
def test_a_failing_sink_is_reported_once_and_the_others_go_on(
        fail_in: str, caplog: pytest.LogCaptureFixture) -> None:
    first, broken, last = Fine(), Broken(fail_in), Fine()
    monitor = Monitor({"first": first, "broken": broken, "last": last})
    with caplog.at_level(logging.WARNING, logger="ffdist"):
        monitor.start_epoch(0, total=3)
        for step in (1, 2, 3):
            monitor.advance()
            monitor.record({"split": "train", "step": step, "loss": 0.5})
        assert list(monitor.sinks) == ["first", "last"]
        monitor.close()
    assert monitor.sinks == {}  # closed: nothing reaches a sink any more
    # failed once, never called again, its files let go
    assert broken.calls[-1] == fail_in and broken.calls.count(fail_in) == 1
    assert broken.closed == 1
    warnings = [r.getMessage() for r in caplog.records if "log sink" in r.getMessage()]
    assert warnings == [f"log sink 'broken' failed in {fail_in} (OSError: disk full); it is "
                        "switched off and training goes on without it"]
    for sink in (first, last):
        assert [r["step"] for r in sink.records] == [1, 2, 3] and sink.closed == 1
    assert last.records[0]["loss"] == -1.0 and "time" in last.records[0]


class Unstartable(Sink):
    def __init__(self, setup: SinkSetup) -> None:
        raise ImportError("No module named 'nothing_here'")


def test_a_sink_that_cannot_start_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sinks.REGISTRY, "unstartable", f"{__name__}:Unstartable")
    rcp = recipe_load.load(RECIPES / "digits.yaml",
                      [f"output_dir={tmp_path}", "log.sinks=[unstartable,jsonl]"])
    with caplog.at_level(logging.WARNING, logger="ffdist"):
        monitor = Monitor.open(rcp, primary=True)
    assert list(monitor.sinks) == ["jsonl"]
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "log sink 'unstartable' failed in start (ImportError: No module named 'nothing_here')"]
    assert Monitor.open(rcp, primary=False).sinks == {}  # only rank 0 has sinks


def test_tensorboard_writes_the_measurements_as_split_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ffdist.sinks.tensorboard import TensorBoardSink

    rcp = recipe_load.load(RECIPES / "digits.yaml", [f"output_dir={tmp_path}"])
    tb = TensorBoardSink(SinkSetup(tmp_path, None, rcp))
    tb.record({"split": "train", "epoch": 0, "step": 5, "world_size": 2, "loss": 0.25,
               "lr": 0.1, "skipped_steps": 1, "note": "text", "time": 1.0})
    tb.record({"event": "end", "step": 5, "best_top1": 0.9, "time": 2.0})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr", "train/skipped_steps"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(5, 0.25)]


def test_jsonl_cuts_back_to_the_checkpoint_on_resume(tmp_path: Path) -> None:
    rcp = recipe_load.load(RECIPES / "digits.yaml", [f"output_dir={tmp_path}"])
    path = tmp_path / "metrics.jsonl"
    lines = [{"split": "train", "step": s} for s in (5, 10, 15)] + [{"event": "end", "step": 15}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"split": "tr')  # torn
    sink = JsonlSink(SinkSetup(tmp_path, 10, rcp))
    sink.record({"split": "train", "step": 15})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [5, 10, 15]
    JsonlSink(SinkSetup(tmp_path, None, rcp))  # a fresh run starts the file again
    assert not path.exists()


def test_tensorboard_is_imported_only_when_its_sink_is_built(tmp_path: Path) -> None:
    code = f"""
import sys
from ffdist import recipe, recipe_load
from ffdist.monitor import Monitor
for switch in ("false", "true"):
    rcp = recipe_load.load({str(RECIPES / "digits.yaml")!r},
                      ["output_dir={tmp_path}", "log.tensorboard=" + switch])
    monitor = Monitor.open(rcp, primary=True)
    monitor.record({{"split": "train", "step": 1, "loss": 0.5}})
    print(list(monitor.sinks), any("tensorboard" in m for m in sys.modules))
    monitor.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['jsonl', 'progress'] False",
                                        "['jsonl', 'tensorboard', 'progress'] True"]


class Ending(Fine):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def end(self, status: str) -> None:
        self.calls.append(f"end {status}")

    def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize("status", ["finished", "stopped", "failed"])
def test_close_tells_every_sink_how_the_run_ended_then_closes_it(status: str) -> None:
    a, b = Ending(), Ending()
    monitor = Monitor({"a": a, "b": b})
    monitor.close(status)
    monitor.close(status)  # a second close reaches no sink
    assert a.calls == b.calls == [f"end {status}", "close"]
    with pytest.raises(ValueError, match="use one of finished, stopped, failed"):
        Monitor({}).close("done")


def _csv(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_writes_a_file_per_split_and_widens_its_header_for_a_new_key(tmp_path: Path) -> None:
    from ffdist.sinks.csv import CsvSink

    rcp = recipe_load.load(RECIPES / "digits.yaml", [f"output_dir={tmp_path}"])
    sink = CsvSink(SinkSetup(tmp_path, None, rcp))
    train = {"split": "train", "epoch": 0, "world_size": 1, "time": 1.5}
    sink.record({**train, "step": 5, "loss": 0.5, "lr": 0.1})
    sink.record({"split": "val", "epoch": 0, "step": 10, "world_size": 1, "time": 2.0,
                 "top1": 0.75, "n": 360})
    sink.record({**train, "step": 10, "loss": 0.25, "lr": 0.1, "skipped_steps": 1})
    sink.record({**train, "step": 15, "loss": 0.125, "lr": 0.05, "skipped_steps": 2})
    sink.record({"event": "end", "step": 15, "world_size": 1, "time": 3.0, "best_top1": 0.75})
    assert _csv(tmp_path / "csv" / "train.csv") == [
        ["step", "epoch", "time", "world_size", "loss", "lr", "skipped_steps"],
        ["5", "0", "1.5", "1", "0.5", "0.1", ""],
        ["10", "0", "1.5", "1", "0.25", "0.1", "1"],
        ["15", "0", "1.5", "1", "0.125", "0.05", "2"]]
    assert _csv(tmp_path / "csv" / "val.csv") == [
        ["step", "epoch", "time", "world_size", "top1", "n"], ["10", "0", "2.0", "1", "0.75", "360"]]
    assert _csv(tmp_path / "csv" / "end.csv")[1] == ["15", "3.0", "1", "0.75"]

    # resumed from the checkpoint of step 10: later rows and the end go, the header stays
    again = CsvSink(SinkSetup(tmp_path, 10, rcp))
    again.record({**train, "step": 15, "loss": 0.0625, "lr": 0.05})
    rows = _csv(tmp_path / "csv" / "train.csv")
    assert [r[0] for r in rows[1:]] == ["5", "10", "15"] and rows[-1][4] == "0.0625"
    assert rows[0][-1] == "skipped_steps" and len(_csv(tmp_path / "csv" / "end.csv")) == 1
    CsvSink(SinkSetup(tmp_path, None, rcp))  # a fresh run starts the files again
    assert list((tmp_path / "csv").iterdir()) == []


def test_progress_without_a_terminal_prints_a_line_per_training_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ffdist.sinks import progress

    rcp = recipe_load.load(RECIPES / "digits.yaml", [f"output_dir={tmp_path}"])
    clock = iter([100.0, 130.0])  # the segment starts at 100 s; step 40's line comes at 130 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    sink = progress.ProgressSink(SinkSetup(tmp_path, 10, rcp, total_steps=100))  # resumed at 10
    assert not sink.bars  # pytest's stdout is no terminal
    sink.progress(0, 10, 50)
    with caplog.at_level(logging.INFO, logger="ffdist"):
        sink.record({"split": "val", "step": 10, "epoch": 0, "loss": 1.0})  # no line
        sink.record({"split": "train", "epoch": 0, "step": 40, "loss": 0.51234, "lr": 0.1,
                     "images_per_s": 812.4, "data_wait_fraction": 0.031})
    # 30 steps in 30 s: the 60 left take 60 s
    assert [r.getMessage() for r in caplog.records] == [
        "step 40/100 (40%)  epoch 0  loss 0.5123  lr 0.1  812 img/s  data wait 3.1%  ETA 0:01:00"]
    assert progress.clock(3 * 3600 + 65.4) == "3:01:05"


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_tracker_whose_package_is_missing_says_how_to_install_it(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    rcp = recipe_load.load(RECIPES / "digits.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(ImportError) as e:
        sinks.build(name, SinkSetup(tmp_path, None, rcp))
    assert str(e.value) == (f"the {name} sink needs the {name} package: pip install {name} "
                            f'(or pip install -e ".[{name}]" in a checkout of ffdist)')
