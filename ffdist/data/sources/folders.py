"""data.name=imagefolder | filelist: image files of any size (up to data.max_image_pixels),
decoded (ffdist.data.datasets.decode) and augmented per sample. imagefolder:
data.root/train/<class>/*.jpg and data.root/val/<class>/, or one folder
data.root/<class>/*.jpg split by data.val_fraction (`split_folder`); filelist: text files of
`relative/path<sep>label` lines (data.train_list, data.val_list), paths under data.root.
Both evaluate on a resize + centre crop, ImageNet-style."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ffdist.data.sources.base import SMOKE, DataMissing, MapSource, Source, where
from ffdist.errors import DataError

if TYPE_CHECKING:
    from ffdist.data.boxes import BoxSampler
    from ffdist.data.mapstyle import MapData
    from ffdist.data.stream import DataSpec, StreamRequest, Streams
    from ffdist.recipe import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
LAYOUT = ("an imagefolder root holds train/ and val/, each with one sub-folder of images per "
          "class (the ImageNet layout: train/n01440764/*.JPEG, val/n01440764/*.JPEG), or only "
          "the class sub-folders (data.val_fraction of each is held out for validation)")

Samples = list[tuple[str, int]]


class FolderSource(MapSource):
    """Files decoded per sample: random resized crops for training, resize + centre crop
    for evaluation (data.eval_image_size, data.eval_resize_size)."""

    folder_like = True
    encoded = True
    in_memory = False

    def splits(self, cfg: DataConfig, num_classes: int) -> tuple[Samples, Samples, list[str]]:
        """(train samples, val samples, class names)."""
        raise NotImplementedError

    def build(self, cfg: DataConfig, req: StreamRequest) -> Streams:
        from ffdist.data.mapstyle import map_streams

        data = self.datasets(cfg, req.seed, req.num_classes, req.channels, req.decode)
        return map_streams(data, cfg, req)

    def datasets(self, cfg: DataConfig, seed: int, num_classes: int, channels: int,
                 decode: str = "cpu") -> MapData:
        from ffdist.data.datasets import FileImages
        from ffdist.data.mapstyle import MapData

        train, val, classes = self.splits(cfg, num_classes)
        train_tf, val_tf, spec = photo_pipeline(self, cfg, channels, classes, decode)
        bad = {"bad_images": cfg.bad_images, "max_bad_fraction": cfg.max_bad_fraction,
               "max_pixels": cfg.max_image_pixels}
        return MapData(FileImages(train, train_tf, channels, seed, split="train", **bad),
                       FileImages(val, val_tf, channels, split="val", **bad), spec)


def photo_pipeline(source: Source, cfg: DataConfig, channels: int, classes: list[str],
                   decode: str = "cpu") -> tuple[Callable | BoxSampler, Callable | BoxSampler,
                                                 DataSpec]:
    """(train transform, eval transform, spec) of photographs of any size, decoded per
    sample (folders, file lists, tar shards): random resized crops (+ the policy and
    erasing) for training, resize + centre crop for evaluation. On the box path (`decode`
    gpu or boxes: ffdist.data.decoding) the "transforms" are the box samplers that draw the
    same crops (ffdist.data.boxes); FileImages then sends bytes and boxes."""
    from ffdist.data import transforms as T
    from ffdist.data.stream import DataSpec

    size = source.train_size(cfg)
    mean, std = source.normalization(channels)
    interp = cfg.interpolation
    if decode in ("gpu", "boxes"):
        from ffdist.data.boxes import EvalBoxes, TrainBoxes

        train_tf: Callable | BoxSampler = TrainBoxes(size) if cfg.augment else EvalBoxes(size)
        val_tf: Callable | BoxSampler = EvalBoxes(source.eval_size(cfg), cfg.eval_resize_size)
    else:
        train_tf = T.folder_train(size, interp, T.sample_transforms(cfg, mean, std)) \
            if cfg.augment else T.folder_eval(size, interp=interp)
        val_tf = T.folder_eval(source.eval_size(cfg), cfg.eval_resize_size, interp)
    spec = DataSpec(classes, channels, size, mean, std, cfg.eval_image_size,
                    cfg.eval_resize_size)
    return train_tf, val_tf, spec


class ImageFolder(FolderSource):
    name = "imagefolder"

    def check_present(self, cfg: DataConfig, of: str) -> None:
        if not cfg.root:
            raise DataMissing(f"{of}data.name=imagefolder needs data.root, the folder of the "
                              f"dataset: {LAYOUT}; set data.root=PATH, {SMOKE}.")
        root = Path(cfg.root)
        absent = [s for s in ("train", "val") if not (root / s).is_dir()]
        if not absent or (len(absent) == 2 and _single_folder(root)):
            return
        what = "does not exist" if not root.is_dir() else f"has no {' or '.join(absent)}/ folder"
        raise DataMissing(f"{of}data.root={where(cfg.root)} {what}; {LAYOUT}: put or link the "
                          f"dataset there or set data.root=PATH, {SMOKE}.")

    def class_count(self, cfg: DataConfig) -> int | None:
        """The class folders of train/ (of data.root in the one-folder layout); None when
        there are none (the data is not there: its own check says so)."""
        return len(_class_folders(_train_folder(Path(cfg.root or "")))) or None

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        """The class folder names of train/ (not a scan of the images in them)."""
        train = _train_folder(Path(cfg.root or ""))
        classes = _class_folders(train)
        if len(classes) != num_classes:
            raise DataError(f"data.root={cfg.root}: {train} should hold the {num_classes} class "
                            "folders the run was trained with (their names are the class "
                            "names); point data.root=... at the training data.")
        return classes

    def splits(self, cfg: DataConfig, num_classes: int) -> tuple[Samples, Samples, list[str]]:
        if not cfg.root:
            raise DataError("data.root is not set; imagefolder needs a folder with train/ and "
                            "val/.")
        root = Path(cfg.root)
        if not (root / "train").is_dir() and not (root / "val").is_dir():
            samples, classes = scan_folder(root)
            train, val = split_folder(samples, cfg.val_fraction)
            return train, val, classes
        train, classes = scan_folder(root / "train")
        val, val_classes = scan_folder(root / "val")
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            diff = "; ".join(f"only in {root / split}: {', '.join(names[:5])}"
                             + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                             for split, names in (("train", only_train), ("val", only_val))
                             if names)
            raise DataError(f"data.root: {root / 'train'} and {root / 'val'} must hold the same "
                            f"class folders ({diff}); add or remove folders so that they match.")
        return train, val, classes


class FileList(FolderSource):
    name = "filelist"

    def check_present(self, cfg: DataConfig, of: str) -> None:
        for key in ("train_list", "val_list"):
            value = getattr(cfg, key)
            if value and not Path(value).is_file():
                raise DataMissing(f"{of}data.{key}={where(value)} does not exist; give a text "
                                  f"file of 'relative/path{cfg.list_sep}label' lines (images "
                                  f"under data.root), {SMOKE}.")

    def class_count(self, cfg: DataConfig) -> int | None:
        """len(data.classes), else the largest label of data.train_list + 1."""
        if cfg.classes:
            return len(cfg.classes)
        if not cfg.train_list or not Path(cfg.train_list).is_file():
            return None
        labels = [label for _, label in read_list(Path(cfg.train_list), Path("."), cfg.list_sep)]
        return max(labels) + 1 if labels else None

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        """data.classes, else the labels as strings."""
        return list(cfg.classes) or [str(i) for i in range(num_classes)]

    def splits(self, cfg: DataConfig, num_classes: int) -> tuple[Samples, Samples, list[str]]:
        if not (cfg.train_list and cfg.val_list):
            raise DataError("data.train_list and data.val_list must both be set for "
                            "data.name=filelist.")
        root = Path(cfg.root or ".")
        train = read_list(Path(cfg.train_list), root, cfg.list_sep)
        val = read_list(Path(cfg.val_list), root, cfg.list_sep)
        classes = self.classes(cfg, num_classes)
        for name, samples in (("data.train_list", train), ("data.val_list", val)):
            bad = [lab for _, lab in samples if not 0 <= lab < len(classes)]
            if bad:
                raise DataError(f"{name}: label {bad[0]} is out of range for {len(classes)} "
                                "classes; labels run from 0 to num_classes-1 (model.num_classes, "
                                "data.classes).")
        return train, val, classes


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _single_folder(root: Path) -> bool:
    """data.root holds class sub-folders and neither train/ nor val/: the one-folder layout."""
    return bool(_class_folders(root)) and not any((root / s).is_dir() for s in ("train", "val"))


def _train_folder(root: Path) -> Path:
    return root if _single_folder(root) else root / "train"


def split_folder(samples: Samples, val_fraction: float) -> tuple[Samples, Samples]:
    """(train, val) of one folder's samples: in each class, round(n x val_fraction) images
    (at least one when the class has two or more) go to val, chosen by a hash of the file
    name, so that the same files always split alike (on every rank, in every run, in eval
    and predict) and adding a file moves at most that file."""
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    train: Samples = []
    val: Samples = []
    for label, paths in sorted(by_class.items()):
        order = sorted(paths, key=lambda p: (zlib.crc32(Path(p).name.encode()), p))
        n_val = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
        val += [(p, label) for p in sorted(order[:n_val])]
        train += [(p, label) for p in sorted(order[n_val:])]
    return train, val


def scan_folder(root: Path) -> tuple[Samples, list[str]]:
    """(path, label) of every image under root/<class>/, and the class names (sorted)."""
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; an imagefolder root holds train/ "
                        "and val/, each with one sub-folder per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data.root: {root} has no class folders; put each class's images in "
                        f"{root}/<class name>/.")
    samples: Samples = []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.suffix in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"data.root: class folder {root / name} holds no .jpg/.png images; "
                            "add images or remove the folder.")
        samples += [(f, label) for f in files]
    return samples, classes


def read_list(path: Path, root: Path, sep: str) -> Samples:
    """(root/path, label) of every `path<sep>label` line of a list file (# comments)."""
    if not path.is_file():
        raise DataError(f"data.train_list/val_list: {path} does not exist; give a text file of "
                        f"'relative/path{sep}label' lines.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file (byte {e.start} is not UTF-8); a file list "
                        f"holds 'relative/path{sep}label' lines.") from None
    samples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, _, label = line.rpartition(sep)
        if not rel or not label.strip().lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: {line!r} is not 'relative/path{sep}label' "
                            f"(data.list_sep={sep!r}); fix the line or the separator.")
        samples.append((str(root / rel.strip()), int(label)))
    return samples
