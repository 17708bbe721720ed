"""`ffdist bench` on real data reports the input pipeline alone next to the step alone, for
each data.decode setting, and says which of the two bounds the run.

Structure and consistency only; speed is never asserted (benchmarks/ prints ratios)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CPU, RECIPES, run

pytestmark = pytest.mark.slow
CLASSES, PER_CLASS = 2, 8
TINY = ("--steps", "3", "--warmup", "1", "--eval-steps", "1")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Baseline JPEGs of mixed sizes, and one PNG per class (which the workers decode)."""
    root, rng = tmp_path_factory.mktemp("benchjpegs"), np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c in range(CLASSES):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                image.save(folder / (f"{i}.png" if i == 0 else f"{i}.jpg"), quality=90)
    return root


def _bench(jpegs: Path, tmp_path: Path, decode: str, *extra: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = run([sys.executable, "-m", "ffdist.cli", "bench", str(RECIPES / "digits.yaml"), CPU,
                "precision=fp32", "data.name=imagefolder", f"data.root={jpegs}",
                "model.in_channels=3", f"model.num_classes={CLASSES}", "data.image_size=16",
                "data.batch_size=4", "data.num_workers=1", f"data.decode={decode}", *extra, *TINY,
                "--out", str(out), f"output_dir={tmp_path / 'run'}"])
    return proc.stdout, json.loads(out.read_text())


# decode=cpu is make test-all only: the boxes case times cpu too (its other setting), and
# test_bench_one_device_writes_bench_json_in_run_dir the cpu pipeline as a run's own
@pytest.mark.parametrize("decode", [pytest.param("cpu", marks=pytest.mark.extended), "boxes"])
def test_bench_reports_the_pipeline_alone_and_what_bounds_the_run(
        jpegs: Path, tmp_path: Path, decode: str) -> None:
    text, r = _bench(jpegs, tmp_path, decode)
    p = r["pipeline"]
    assert p["decode"] == decode
    assert p["images_per_s"] > 0 and p["step_alone_images_per_s"] > 0
    assert p["cores"] is not None and p["cores"] > 0  # Linux: /proc
    bound = "input pipeline" if p["images_per_s"] < p["step_alone_images_per_s"] else "step"
    assert p["bound_by"] == bound
    assert f"data.decode={decode}" in text and "step alone" in text
    assert f"bound by             the {bound}" in text
    if decode == "boxes":  # the PNGs went the workers' way, the JPEGs the box path's
        assert isinstance(p["decoder"], str) and p["decoder"]
        assert p["decoded"]["host"] > 0 and p["decoded"]["device"] > 0
        assert "decoded by the workers (not baseline RGB JPEGs)" in text
    else:
        assert "decoded" not in p and p["decoder"] is None
    # the other setting, on a second stream of the same data, in the same run
    other = p["other"]
    assert other["decode"] == {"cpu": "boxes", "boxes": "cpu"}[decode]
    assert other["images_per_s"] > 0
    assert other["vs_run"] == pytest.approx(other["images_per_s"] / p["images_per_s"])
    assert f"data.decode={other['decode']}" in text and "measured in this run" in text


def test_bench_says_why_the_other_decode_setting_is_not_measured(jpegs: Path,
                                                                 tmp_path: Path) -> None:
    text, r = _bench(jpegs, tmp_path, "cpu", "data.auto_augment=ta_wide")
    other = r["pipeline"]["other"]
    assert other["decode"] == "boxes" and "data.auto_augment=ta_wide" in other["refused"]
    assert "not measured: data.decode=boxes crops" in text


@pytest.mark.parametrize(("decode", "device", "says", "never"), [
    ("cpu", "cuda", "data.decode=gpu", "data.decode=cpu"),
    ("cpu", "cpu", "more data.num_workers", "data.decode=gpu"),  # refused without a GPU
    ("boxes", "cpu", "data.decode=cpu", "data.decode=gpu"),
    ("gpu", "cuda", "more data.num_workers", "data.decode=gpu")])
def test_an_input_bound_run_is_told_a_remedy_that_works_for_its_setting(
        decode: str, device: str, says: str, never: str) -> None:
    from ffdist import bench_report

    p = {"images_per_s": 50.0, "step_alone_images_per_s": 200.0, "cores": 1.5,
         "bound_by": "input pipeline", "decode": decode, "device": device, "decoder": None}
    rows = dict(bench_report._pipeline_rows(p, workers=2))
    assert rows["bound by"].startswith("the input pipeline: ") and says in rows["bound by"]
    assert never not in rows["bound by"]
