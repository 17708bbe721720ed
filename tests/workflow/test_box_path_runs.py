"""The box path (data.decode=boxes: what data.decode=gpu runs, with its device step on the
CPU) in real training processes, on a tiny JPEG folder made here (baseline JPEGs for the
device step, a PNG and a progressive JPEG per class that the loader worker decodes itself):

1. a run resumed from its mid-epoch checkpoint logs the same per-step losses and writes the
   same weights, bit for bit, as the run never stopped (boxes and flips come from the
   per-sample seeds, the decode and the crop are deterministic);
2. two gloo ranks under torchrun train the same schedule as one process: losses agree to
   rtol 1e-5 (fp32 all-reduce rounding, as tests/fault/test_resume_regularization.py
   derives; a rank-dependent box would change a step's loss by ~1e-2);
3. data.decode=gpu where the process runs on the CPU is one sentence and exit 2, before the
   run directory exists.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import helpers
from tests.fault import kit

pytestmark = pytest.mark.slow
CLASSES, PER_CLASS, BATCH, EPOCHS = 4, 8, 8, 3
STEPS = CLASSES * PER_CLASS // BATCH * EPOCHS  # 12; checkpoints at 5 and 10: mid-epoch


def _jpeg_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 3)):
        for c in range(CLASSES):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(18, 48)), int(rng.integers(18, 48))
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([yy * 4.0, xx * 4.0, np.full((h, w), 60.0 * c)], -1)
                image = Image.fromarray((base + rng.normal(0, 20, (h, w, 3))).clip(0, 255)
                                        .astype(np.uint8))
                if i == 0:
                    image.save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=90, progressive=i == 1)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jpeg_folder(tmp_path_factory.mktemp("boxjpegs"))


def _args(jpegs: Path, out: Path, *extra: str) -> list[str]:
    return [str(helpers.RECIPES / "digits.yaml"), helpers.CPU, "precision=fp32",
            "data.name=imagefolder", f"data.root={jpegs}", "model.in_channels=3",
            f"model.num_classes={CLASSES}", "data.image_size=16", f"data.batch_size={BATCH}",
            "data.num_workers=1", "data.decode=boxes", f"schedule.epochs={EPOCHS}",
            "schedule.warmup_epochs=0", "checkpoint.every_steps=5", "checkpoint.keep_last=10",
            "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
            f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def ref(jpegs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("boxref") / "run"
    proc = kit.run([sys.executable, "-m", "ffdist.train", *_args(jpegs, out)], timeout=300)
    assert proc.returncode == 0, kit.explain(proc)
    log = proc.stdout + proc.stderr
    assert "data.decode=boxes: the loader workers read bytes and draw crop boxes" in log, log
    assert "decoded and cropped on the CPU by the loader workers" in log, log
    return out


def test_resume_on_the_box_path_is_bit_exact(ref: Path, jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "model.pt").unlink()
    for ckpt in (out / "checkpoints").glob("step_*.pt"):
        if int(ckpt.stem[5:]) > 5:
            ckpt.unlink()
    (out / "checkpoints" / "latest").write_text("step_00000005.pt\n")
    proc = kit.run([sys.executable, "-m", "ffdist.train", *_args(jpegs, out)], timeout=300)
    assert proc.returncode == 0, kit.explain(proc)
    assert "resumed from step 5" in proc.stdout + proc.stderr
    want, got = kit.train_losses(ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want
    kit.same_weights(out / "model.pt", ref / "model.pt")


# make test-all only: the box path's per-sample boxes come from the same seeded per-sample
# RNG whatever the rank; the fast tier covers it through the bit-exact resume above and tests/
# unit/test_boxes.py, two ranks on one stream through tests/fault/test_resume_regularization.py
@pytest.mark.extended
def test_two_ranks_on_the_box_path_train_what_one_process_trains(ref: Path, jpegs: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = kit.run([str(helpers.BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                    str(helpers.free_port()), "-m", "ffdist.train", *_args(jpegs, out)],
                   timeout=300)
    assert proc.returncode == 0, kit.explain(proc)
    want, got = kit.train_losses(ref), kit.train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    one, two = (helpers.events(r, "val") for r in (ref, out))
    assert [e["n"] for e in one] == [e["n"] for e in two] == [CLASSES * 3] * EPOCHS


def test_decode_gpu_without_a_gpu_is_one_sentence_before_the_run_directory(
        jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = kit.run([sys.executable, "-m", "ffdist.train",
                    *_args(jpegs, out, "data.decode=gpu")], timeout=120)
    assert proc.returncode == 2, kit.explain(proc)
    line = helpers.error_line(proc.stderr)
    assert "data.decode=gpu decodes on a CUDA GPU" in line and "use data.decode=cpu" in line
    assert not out.exists()
