"""TensorBoard beyond scalars, read back with tensorboard's own reader."""

from __future__ import annotations

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
