"""Data a run cannot use: absent datasets (ffdist.data.presence: before torch is imported),
empty or mismatched class folders, bad file lists, broken or odd images, and image sizes
the model cannot take (ffdist.preflight). One sentence naming the file, key or value and
the fix; exit 2, no traceback, and no run directory left behind by what is found before
the run starts (everything but broken images, which training finds as it reads them).

The image-size refusal runs as the real command; the others through ffdist.train.main (the
code path of the CLI, minus seconds of imports each). Images in unusual formats are not a
mistake: they train, as a real process.
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffdist import train
from ffdist.data.presence import check_present
from ffdist.data.sources.torchvision_sets import TORCHVISION_FILES
from ffdist.recipe_load import load
from tests.fault import kit
from tests.fault.user_errors.common import DIGITS, FOLDER, R50, imagefolder, train_cmd, train_main, truncate
from tests.helpers import RECIPES, in_process, refused, run

# ------------------------------------------------------------------ absent datasets


def test_dataset_root_missing(capfd, tmp_path):
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={tmp_path / 'nowhere'}",
                              f"output_dir={out}"), out)
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in line


def test_imagenet_recipe_without_imagenet_says_where_how_and_smoke_test(capfd, tmp_path):
    out = tmp_path / "run"
    line = refused(in_process(capfd, train.main, R50, f"data.root={tmp_path / 'imagenet'}",
                              f"output_dir={out}"), out)
    assert f"{R50}: data.root={tmp_path / 'imagenet'} does not exist" in line
    assert "train/n01440764/*.JPEG" in line and "val/" in line  # the layout to make
    assert "data.name=synthetic" in line  # how to try the recipe anyway


def test_imagefolder_without_val_names_the_missing_folder(capfd, tmp_path):
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    out = tmp_path / "run"
    line = refused(in_process(capfd, train.main, R50, f"data.root={tmp_path / 'imagenet'}",
                              f"output_dir={out}"), out)
    assert "has no val/ folder" in line


@pytest.mark.parametrize("name", sorted(TORCHVISION_FILES))
def test_torchvision_dataset_without_files_suggests_download(capfd, tmp_path, name):
    out = tmp_path / "run"
    line = refused(train_main(capfd, f"data.name={name}", f"data.root={tmp_path}",
                              f"output_dir={out}"), out)
    assert f"no {name} files in data.root={tmp_path}" in line
    assert TORCHVISION_FILES[name][0] in line  # the sub-folder torchvision reads
    assert "data.download=true" in line and "data.name=synthetic" in line


def test_torchvision_files_in_place_pass_and_download_is_not_checked(tmp_path):
    """The check looks for exactly the files torchvision reads: with them it passes (and
    with data.download=true it leaves the fetching to torchvision)."""
    cfg = load(str(RECIPES / "cifar10_resnet18.yaml"), [f"data.root={tmp_path}"]).data
    with pytest.raises(Exception, match="data_batch_1"):
        check_present(cfg)
    sub, files = TORCHVISION_FILES["cifar10"]
    (tmp_path / sub).mkdir()
    for f in files:
        (tmp_path / sub / f).write_bytes(b"")
    check_present(cfg)
    (tmp_path / sub / "test_batch").unlink()
    with pytest.raises(Exception, match="test_batch"):
        check_present(cfg)
    check_present(load(str(RECIPES / "cifar10_resnet18.yaml"),
                       [f"data.root={tmp_path / 'none'}", "data.download=true"]).data)


def test_filelist_without_its_list(capfd, tmp_path):
    out = tmp_path / "run"
    line = refused(train_main(capfd, "data.name=filelist",
                              f"data.train_list={tmp_path / 'train.txt'}",
                              f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={out}"), out)
    assert f"data.train_list={tmp_path / 'train.txt'} does not exist" in line


def test_missing_data_is_reported_before_torch_is_imported(tmp_path):
    """Early means cheap: no torch import, no process group (a second or less)."""
    code = ("import sys; from ffdist import train\n"
            f"rc = train.main([{R50!r}, 'data.root={tmp_path}/x', 'output_dir={tmp_path}/run'])\n"
            "print(rc, 'torch' in sys.modules)")
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


# ------------------------------------------------------------------ folders and file lists

def test_empty_class_folder(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    for f in (root / "train" / "1").iterdir():
        f.unlink()
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", f"output_dir={out}"), out)
    assert f"class folder {root / 'train' / '1'} holds no .jpg/.png images" in line


def test_class_folders_that_differ_are_named(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (root / "val" / "1").rename(root / "val" / "one")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", f"output_dir={out}"), out)
    assert (f"{root / 'train'} and {root / 'val'} must hold the same class folders (only in "
            f"{root / 'train'}: 1; only in {root / 'val'}: one)") in line


def test_a_binary_file_list_is_one_sentence(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (tmp_path / "train.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "val.txt").write_text("val/0/0.jpg 0\n")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, "data.name=filelist", f"data.root={root}",
                              f"data.train_list={tmp_path / 'train.bin'}",
                              f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={out}"), out)
    assert f"{tmp_path / 'train.bin'}: not a text file (byte 128 is not UTF-8)" in line


@pytest.mark.parametrize("key", ["image_size", "eval_image_size", "eval_resize_size"])
def test_a_size_key_a_dataset_ignores_is_refused_before_anything_is_written(capfd, tmp_path,
                                                                           key):
    """digits are 8x8 whatever the recipe says: the key would be recorded in the run's
    recipe.yaml as if it had been used. Refused before the run directory exists."""
    out = tmp_path / "out"
    line = refused(train_main(capfd, f"data.{key}=32", f"output_dir={out}"), out)
    assert line == (f"ffdist: error: data.{key}=32 does not apply to data.name=digits, whose "
                    "images are 8x8 (its own size, for training and evaluation alike); remove "
                    f"it or set data.{key}=null.")


def test_label_out_of_range_in_filelist(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (tmp_path / "train.txt").write_text("train/0/0.jpg 0\ntrain/1/0.jpg 5\n")
    (tmp_path / "val.txt").write_text("val/0/0.jpg 0\n")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, "data.name=filelist", f"data.root={root}",
                              "data.batch_size=2", f"data.train_list={tmp_path / 'train.txt'}",
                              f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={out}"), out)
    assert line.endswith("model.num_classes=2 but data.name=filelist has 6 classes; set "
                         "model.num_classes=6 (or auto).")


def test_label_out_of_range_of_the_named_classes_in_filelist(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    (tmp_path / "train.txt").write_text("train/0/0.jpg 0\ntrain/1/0.jpg 5\n")
    (tmp_path / "val.txt").write_text("val/0/0.jpg 0\n")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, "data.name=filelist", f"data.root={root}",
                              "data.classes=[cat,dog]", "data.batch_size=2",
                              f"data.train_list={tmp_path / 'train.txt'}",
                              f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={out}"), out)
    assert "data.train_list: label 5 is out of range for 2 classes" in line


# ------------------------------------------------------------------ broken images
# Found when training reads them (decoding every image first would cost an epoch): the run
# has started, so its directory is not checked; the error is still one sentence, exit 2.

def test_broken_jpeg_with_bad_images_error_names_the_file(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    truncate(root / "train" / "1" / "3.jpg")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", "data.bad_images=error",
                              f"output_dir={out}"))
    assert f"{root / 'train' / '1' / '3.jpg'}: cannot be decoded as an image" in line


def test_too_many_broken_jpegs_fail_naming_the_fraction(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    for i in range(3):
        truncate(root / "train" / "0" / f"{i}.jpg")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", "data.max_bad_fraction=0.05",
                              f"output_dir={out}"))
    assert "of 24 train images cannot be decoded (more than data.max_bad_fraction=0.05)" in line


def test_decode_errors_are_whole_words_without_source_locations(capfd, tmp_path):
    root = imagefolder(tmp_path / "data")
    bad = root / "train" / "1" / "3.jpg"
    bad.write_bytes(b"%PDF-1.4\n" + bytes(200))  # a PDF named .jpg
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", "data.bad_images=error",
                              f"output_dir={out}"))
    assert f"{bad}: cannot be decoded as an image (not a JPEG, PNG, WebP, GIF, BMP or TIFF " \
           "image)" in line
    assert ".cpp" not in line


def test_broken_jpeg_is_skipped_and_reported(tmp_path):
    root = imagefolder(tmp_path / "data")
    bad = root / "train" / "1" / "3.jpg"
    truncate(bad)
    out = tmp_path / "out"
    proc = kit.run(train_cmd(DIGITS, *FOLDER, f"data.root={root}", "data.max_bad_fraction=0.1",
                             f"output_dir={out}"), timeout=90)
    assert proc.returncode == 0, kit.explain(proc)
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if str(bad) in ln]
    assert len(warnings) == 1 and "skipping unreadable train image" in warnings[0]
    assert (out / "model.pt").is_file()


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
    proc = kit.run(train_cmd(DIGITS, *FOLDER, f"data.root={root}", "data.bad_images=error",
                             f"output_dir={out}"), timeout=120)
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


# ------------------------------------------------------------------ image sizes

def test_an_image_size_the_model_pools_away_is_refused_by_the_command(tmp_path):
    """small_cnn's max-pool leaves nothing of a 1x1 image: refused before the run directory
    exists, not a traceback from inside the model at step 1."""
    out = tmp_path / "run"
    line = refused(train_cmd(DIGITS, "data.name=synthetic", "data.image_size=1",
                             "data.synthetic_size=64", "data.batch_size=8",
                             f"output_dir={out}"), out)
    assert line.startswith("ffdist: error: model.name=small_cnn cannot take 1x1 images "
                           "(data.image_size=1) (")
    assert line.endswith("; set data.image_size=2 or larger.")


def test_an_eval_size_the_model_cannot_take_is_refused_before_training(capfd, tmp_path):
    """data.eval_image_size is used at the first eval, epochs in: checked at the start."""
    root = imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    line = refused(train_main(capfd, *FOLDER, f"data.root={root}", "model.name=lenet",
                              "data.image_size=16", "data.eval_image_size=4",
                              f"output_dir={out}"), out)
    assert "model.name=lenet cannot take 4x4 images (data.eval_image_size=4)" in line
    assert line.endswith("; set data.eval_image_size=16 or larger.")
