"""Every user mistake of issue 12's list: one sentence that says what to do, exit 2, no
traceback (or, for images in unusual formats, a run that just works).

Recipe mistakes are found before torch is imported: real processes, ~0.3 s each. Data and
export mistakes run through the functions behind the CLI; one imagefolder of unusual
image formats trains as a real process. Ctrl-C: tests/fault/test_ctrl_c.py; a read-only
checkpoints/ folder: tests/fault/test_run_dir.py; hostile YAML: test_hostile_recipes.py.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffdist import recipe_load, train
from ffdist.errors import EXIT_USER_ERROR
from tests.fault import kit
from tests.fault.test_bad_input import FOLDER, imagefolder, only_error_line
from tests.helpers import RECIPES

DIGITS = str(RECIPES / "digits.yaml")


@pytest.mark.parametrize("overrides,expect", [
    (["optim.name=adamw", "optim.betas=[1.5,0.999]"],
     "command line: optim.betas=[1.5, 0.999] is not valid: give two values in [0, 1), e.g. "
     "[0.9,0.999]."),
    (["data.num_workers=2", "data.prefetch_factor=0"],
     "command line: data.prefetch_factor=0 is out of range: use 1 or more"),
    (["data.list_sep="], "command line: data.list_sep has no value (null); expected a string."),
    (["data.list_sep=a"], "command line: data.list_sep='a' is not valid: use a separator that "
                          "file names and labels do not contain"),
    (["seed=99999999999999999999"], "command line: seed=99999999999999999999 is out of range: "
                                    "use an integer from 0 to 2147483647."),
    (["seed=-1"], "seed=-1 is out of range"),
    (["optim.lr=[0.1"], "command line: the value of optim.lr=[0.1 is not valid YAML"),
    (["optim=3"], "command line: optim=3: 'optim' is a section (name, lr, momentum, nesterov, "
                  "...), not a value; set one of its keys, e.g. optim.name=..."),
    (["launch.gpus=[x]"], "command line: launch.gpus[0]='x' has the wrong type; expected a list "
                          "of integers, e.g. launch.gpus=[0,2] (one value alone is a "
                          "one-element list)."),
    (["optim.lr=0"], "command line: optim.lr=0.0 is out of range"),
], ids=["betas", "prefetch", "list_sep-empty", "list_sep-odd", "seed-overflow", "seed-negative",
        "not-yaml", "section-scalar", "list-item-type", "blamed-on-command-line"])
def test_recipe_slips_are_one_sentence(tmp_path, overrides, expect):
    proc = kit.run([sys.executable, "-m", "ffdist.train", DIGITS, *overrides,
                    f"output_dir={tmp_path / 'run'}"], timeout=60)
    assert proc.returncode == EXIT_USER_ERROR, kit.explain(proc)
    assert expect in only_error_line(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\noptim:\n  lr: 0\n")
    proc = kit.run([sys.executable, "-m", "ffdist.train", str(path), "seed=1"], timeout=60)
    assert f"{path}: optim.lr=0.0 is out of range" in only_error_line(proc.stderr)


def test_a_list_key_takes_one_value_as_a_one_element_list(tmp_path):
    r = recipe_load.load(None, ["model.freeze=backbone", "launch.gpus=0", "schedule.milestones=30",
                           "data.classes=cat"])
    assert r.model.freeze == ["backbone"] and r.launch.gpus == [0]
    assert r.schedule.milestones == [30] and r.data.classes == ["cat"]
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  freeze: backbone\n")
    assert recipe_load.load(path).model.freeze == ["backbone"]


def test_blank_list_sep_is_kept(tmp_path):
    assert recipe_load.load(None, ["data.list_sep= "]).data.list_sep == " "
    assert recipe_load.load(None, ["data.list_sep=\t"]).data.list_sep == "\t"


# ------------------------------------------------------------------ data

def main_fails(capfd, *args: str) -> str:
    code = train.main([DIGITS, *args])
    err = capfd.readouterr().err
    assert code == EXIT_USER_ERROR, err
    return only_error_line(err)


def test_class_folders_that_differ_are_named(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (root / "val" / "1").rename(root / "val" / "one")
    line = main_fails(capfd, *FOLDER, f"data.root={root}", f"output_dir={tmp_path / 'out'}")
    assert (f"{root / 'train'} and {root / 'val'} must hold the same class folders (only in "
            f"{root / 'train'}: 1; only in {root / 'val'}: one)") in line


def test_decode_errors_are_whole_words_without_source_locations(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    bad = root / "train" / "1" / "3.jpg"
    Image.new("RGB", (8, 8)).save(bad, format="TIFF")  # a TIFF named .jpg
    line = main_fails(capfd, *FOLDER, f"data.root={root}", "data.bad_images=error",
                      f"output_dir={tmp_path / 'out'}")
    assert f"{bad}: cannot be decoded as an image (not a JPEG, PNG, WebP or GIF image)" in line
    assert ".cpp" not in line


def png16(path: Path, color_type: int, channels: int, size: int = 8) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only)."""
    rng = np.random.default_rng(0)
    rows = b"".join(b"\x00" + rng.integers(0, 65535, size * channels).astype(">u2").tobytes()
                    for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", size, size, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def odd_images(folder: Path) -> list[Path]:
    """Files that decode to something other than 8-bit RGB/grey CHW."""
    rgb = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8)
    made = {
        "g16.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p),
        "rgb16.png": lambda p: png16(p, 2, 3),
        "rgba16.png": lambda p: png16(p, 6, 4),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p, transparency=0),
        "la.png": lambda p: Image.fromarray(rgb).convert("LA").save(p),
        "rgba.png": lambda p: Image.fromarray(rgb).convert("RGBA").save(p),
        "bilevel.png": lambda p: Image.fromarray(rgb).convert("1").save(p),
        "one_pixel.png": lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
        "gif_named.jpg": lambda p: Image.fromarray(rgb).save(p, format="GIF"),
        "webp_named.jpg": lambda p: Image.fromarray(rgb).save(p, format="WEBP"),
    }
    paths = []
    for name, make in made.items():
        make(folder / name)
        paths.append(folder / name)
    return paths


def test_images_in_unusual_formats_train_as_a_real_process(tmp_path):
    root = imagefolder(tmp_path / "data")
    odd_images(root / "train" / "0")
    odd_images(root / "val" / "1")
    out = tmp_path / "out"
    proc = kit.run([sys.executable, "-m", "ffdist.train", DIGITS, *FOLDER, f"data.root={root}",
                    "data.bad_images=error", f"output_dir={out}"], timeout=120)
    assert proc.returncode == 0, kit.explain(proc)
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("channels", [1, 3])
def test_unusual_formats_decode_to_uint8_with_the_runs_channels(tmp_path, channels):
    import torch

    from ffdist.data.datasets import decode

    for path in odd_images(tmp_path):
        x = decode(str(path), channels)
        assert x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] == channels, path.name
    g16 = decode(str(tmp_path / "g16.png"), 1)
    assert int(g16.max()) <= 255 and int(g16.max()) > 100  # rescaled, not truncated


# ------------------------------------------------------------------ predict / export advice

def test_export_without_weights_names_its_own_flag(capfd, tmp_path):
    from ffdist.cli import main as cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_load.load(RECIPES / "digits.yaml").to_yaml())
    assert cli(["export", str(run), "--format", "onnx"]) == EXIT_USER_ERROR
    err = capfd.readouterr().err
    assert err.strip().endswith("name the weights with --checkpoint PATH.")  # all three take it
