"""What a data source declares, and the presence vocabulary its checks share.

Torch-free, like every source module's top level: `ffdist train` and `ffdist launch` ask a
source whether its files are there before torch is imported (ffdist.data.presence), and
`ffdist plan` asks it for the image size of a dataset that may not be on this machine.
Whatever needs torch is imported inside `build` (and `classes`, where it must read data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ffdist.errors import DataError, RecipeError

if TYPE_CHECKING:
    from ffdist.data.mapstyle import MapData
    from ffdist.data.stream import StreamRequest, Streams
    from ffdist.recipe import DataConfig

SMOKE = "or smoke-test the recipe without it: data.name=synthetic"

# Per-channel mean/std on the 0..255 scale of uint8 images (torchvision's reference values).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class DataMissing(DataError):
    """The dataset a recipe names is not on disk. Every rank of a node looks at the same
    files, so the first rank of each node prints it (nodes may hold their own copies)."""

    same_on_all_ranks = True
    per_node = True


def where(path: str | Path) -> str:
    """The path as the recipe gives it, and absolute when it is relative (to the folder the
    command ran in, which is what it is relative to)."""
    return str(path) if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"


class Source:
    """A dataset by name: one subclass per source, one line in ffdist.data.sources.REGISTRY.

    Class attributes say what the rest of ffdist would otherwise guess from the name; the
    methods check, describe and build. A source's module imports without torch."""

    name = ""
    native_size: int | None = None
    """The side its images come at (data.image_size cannot change it); None: any size,
    made at data.image_size (default `default_size`)."""
    default_size = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    folder_like = False
    """Eval, predict and export resize the short side and centre-crop (photographs of any
    size); False: images are resized to the model's side as they are."""
    encoded = False
    """Its samples are encoded images (files, tar shard members): data.decode=gpu may move
    their decoding and cropping to the device (ffdist.data.decoding); False: decoded images
    in memory."""
    in_memory = False
    """The images are held in memory and a batch is one indexing: loader workers would only
    add copies (data.num_workers=auto starts none; ffdist.threads)."""
    classes_known: int | None = None
    """A fixed class count (digits: 10, CIFAR-100: 100), for model.num_classes=auto;
    sources whose files say it override class_count instead."""
    example_images: tuple[str, str, str] | None = None
    """(folder, command that writes it, what it holds): images to try `ffdist predict` on,
    suggested at the end of a run."""

    # ------------------------------------------------------------------ torch-free
    def check_present(self, cfg: DataConfig, of: str) -> None:
        """Raise DataMissing when the files `cfg` names are absent (file-system checks only;
        `of` prefixes the sentence with the recipe's path). Nothing to check by default."""

    def train_size(self, cfg: DataConfig) -> int:
        """The side of the square training images, without opening the data."""
        return self.native_size or cfg.image_size or self.default_size

    def eval_size(self, cfg: DataConfig) -> int:
        """The side of the eval (and predict/export) images."""
        return cfg.eval_image_size or self.train_size(cfg)

    def normalization(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel; grey images of an RGB source average its statistics."""
        mean, std = self.mean, self.std
        if len(mean) != channels:
            mean = (sum(mean) / len(mean),) * channels
            std = (sum(std) / len(std),) * channels
        return mean, std

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        """Class names in label order, for predict/export, as cheaply as the source can say
        (never by scanning every file). Default: the labels as strings."""
        return [str(i) for i in range(num_classes)]

    def class_count(self, cfg: DataConfig) -> int | None:
        """How many classes the data holds (model.num_classes=auto), as cheaply as the
        source can say (its class folders, its fixed count); None: it does not say."""
        return self.classes_known

    def check_sizes(self, cfg: DataConfig) -> None:
        """A source of native-size images trains and evaluates at that size: a size key would
        silently change nothing (and the run's recipe.yaml would record it as if it had)."""
        if self.native_size is None:
            return
        for key in ("image_size", "eval_image_size", "eval_resize_size"):
            if getattr(cfg, key) is not None:
                raise RecipeError(f"data.{key}={getattr(cfg, key)} does not apply to data.name="
                                f"{self.name}, whose images are {self.native_size}x"
                                f"{self.native_size} (its own size, for training and "
                                f"evaluation alike); remove it or set data.{key}=null.")

    # ------------------------------------------------------------------ torch
    def build(self, cfg: DataConfig, req: StreamRequest) -> Streams:
        """This rank's train and eval streams (ffdist.data.stream's contract)."""
        raise NotImplementedError


class MapSource(Source):
    """A source whose splits are map-style datasets (index -> uint8 CHW image, label): its
    streams are the generic map-style ones (ffdist.data.mapstyle: sampler + DataLoader)."""

    def datasets(self, cfg: DataConfig, seed: int, num_classes: int, channels: int) -> MapData:
        """The train and val datasets and their spec."""
        raise NotImplementedError

    def build(self, cfg: DataConfig, req: StreamRequest) -> Streams:
        from ffdist.data.mapstyle import map_streams

        return map_streams(self.datasets(cfg, req.seed, req.num_classes, req.channels), cfg, req)
