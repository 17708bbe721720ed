"""Shared fixtures: ONE small trained digits run for eval/predict/export/TensorBoard tests,
and the digits written out as PNG files (for predict and the filelist fine-tune test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/digits.yaml for 3 epochs (~92% top-1), TensorBoard on, the starting weights
    evaluated before training, the graph logged."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    helpers.train("digits.yaml", "schedule.epochs=3", f"output_dir={out}", "log.progress=false",
                  "schedule.evaluate_before_train=true", "log.graph=true")
    return out


@pytest.fixture(scope="session")
def digits_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sklearn digit as an 8x8 grey PNG, <root>/<index>_<label>.png, with the same
    0..255 scaling as ffdist's digits dataset, and filelists for digit subsets."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_png")
    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, d.target)):
        Image.fromarray(img, "L").save(root / f"{i:04d}_{label}.png")
    return root


def write_filelists(root: Path, digits: list[int], out: Path) -> tuple[Path, Path]:
    """Train/val lists (stratified 80/20, fixed seed) of the given digits, labels 0..k-1."""
    from sklearn.model_selection import train_test_split

    files = sorted(root.glob("*.png"))
    picked = [(f.name, digits.index(int(f.stem.split("_")[1]))) for f in files
              if int(f.stem.split("_")[1]) in digits]
    tr, va = train_test_split(picked, test_size=0.2, random_state=0,
                              stratify=[lab for _, lab in picked])
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.txt", out / "val.txt"
    for path, rows in zip(paths, (tr, va)):
        path.write_text("".join(f"{name} {lab}\n" for name, lab in rows))
    return paths


def pytest_configure(config: pytest.Config) -> None:
    # torchvision 0.29 warns once per decoded image that torchcodec will replace its decoders.
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities:DeprecationWarning")
