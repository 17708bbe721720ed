"""`ffdist export`: TorchScript and ONNX files that compute what the PyTorch model does,
a sidecar that says how to feed them, a dynamic ONNX batch, and a failing check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ffdist import export
from ffdist.cli import main as cli
from ffdist.loading import load_run


def test_export_onnx_dynamic_batch(digits_run: Path, tmp_path: Path, capsys):
    import onnxruntime as ort

    out = tmp_path / "digits.onnx"
    assert cli(["export", str(digits_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    meta = json.loads(out.with_name("digits.onnx.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["model"] == "small_cnn"
    assert meta["input"]["shape"] == ["batch", 1, 8, 8]
    norm = meta["normalization"]
    assert abs(norm["mean"][0] * 255 - norm["mean_255"][0]) < 1e-6
    model = load_run(digits_run).model.float().eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 13):  # other batch sizes than the export's
        x = torch.randn(n, 1, 8, 8)
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(x).numpy()).max() < 1e-4


def test_export_torchscript(digits_run: Path):
    assert cli(["export", str(digits_run), "--format", "torchscript"]) == 0
    path = digits_run / "export" / "model.torchscript.pt"
    scripted = torch.jit.load(str(path))
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["verified"]["max_abs_diff"] <= meta["verified"]["tolerance"]
    x = torch.randn(3, 1, 8, 8)
    model = load_run(digits_run).model.float().eval()
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_verify_fails_on_a_different_model(digits_run: Path, tmp_path: Path):
    model = load_run(digits_run).model.float().eval()
    other = load_run(digits_run).model.float().eval()
    with torch.no_grad():
        other.head.bias.add_(0.5)  # a wrong export: logits shifted
    runner = export.export_torchscript(other, torch.randn(2, 1, 8, 8), tmp_path / "x.pt")
    with pytest.raises(export.ExportMismatch, match="above the tolerance"):
        export.verify(model, runner, [torch.randn(4, 1, 8, 8)], 1e-4)
