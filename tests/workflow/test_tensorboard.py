"""TensorBoard beyond scalars, read back with tensorboard's own reader; and the command
the end of a run prints, served for real: it shows the confusion matrix of every one of
a run's evaluations (TensorBoard's default would show 10 of them)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

from tests import helpers


def test_images_graph_hparams_and_scalars(digits_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list] = {}
    confusions = 0
    graph = False
    hparams = None
    final = {}
    for f in sorted((digits_run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, []).extend(names)
        graph = graph or acc.Tags()["graph"]
        if "hparam/best_top1" in acc.Tags()["scalars"]:
            hparams = acc.PluginTagToContent("hparams")
            final = {k: acc.Scalars(k)[-1].value for k in ("hparam/best_top1", "hparam/final_top1")}
        if "val/confusion" in acc.Tags()["images"]:
            confusions += len(acc.Images("val/confusion"))
            first = acc.Images("train/sample_images")[0]
            assert first.width > 100 and first.height > 10
    assert "train/sample_images" in tags["images"]
    assert confusions == 4  # every evaluation, the one before training included
    assert {"train/lr", "train/loss", "val/top1"} <= set(tags["scalars"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert hparams is not None and "_hparams_/session_start_info" in hparams
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == 0.1
    assert start.session_start_info.hparams["model.name"].string_value == "small_cnn"
    end = helpers.end_event(digits_run)
    assert abs(final["hparam/best_top1"] - end["best_top1"]) < 1e-6
    assert abs(final["hparam/final_top1"] - end["final_top1"]) < 1e-6
    assert graph  # log.graph=true in the fixture


def served_images(command: str, tag: str, want: int, timeout: float = 240) -> list[dict]:
    """Start `command` (a tensorboard command line) on a free loopback port and ask its
    images route for `tag` until `want` images are served (it loads files in the
    background) or `timeout` passes; the images it served last. (Its start on a loaded
    2-core machine has taken over 90 s: the wait ends as soon as all are served.)"""
    port = helpers.free_port()
    argv = [str(helpers.BIN / "tensorboard"), *shlex.split(command)[1:],
            "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/images/images?run=.&tag={tag}"
    served: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(served) < want:
            assert proc.poll() is None, f"{argv} exited {proc.returncode}"
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    served = json.load(answer)
            except OSError:  # not listening yet
                pass
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return served


def test_the_printed_tensorboard_command_shows_every_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 12 epochs of 2 steps (batch 512): 12 evaluations, more than TensorBoard's 10
    proc = helpers.train("digits.yaml", "schedule.epochs=12", "data.batch_size=512",
                         "precision=fp32", helpers.CPU, "log.progress=false",
                         f"output_dir={out}")
    command = re.search(r"^  (tensorboard --logdir \S+.*?)  # ", proc.stdout, re.M)[1].strip()
    assert command.startswith(f"tensorboard --logdir {out}/tb ")
    val_steps = [e["step"] for e in helpers.events(out, "val")]
    assert len(val_steps) == 12
    served = served_images(command, "val/confusion", want=12)
    assert [image["step"] for image in served] == val_steps
