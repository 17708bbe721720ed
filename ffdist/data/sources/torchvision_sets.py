"""data.name=mnist | fashion_mnist | cifar10 | cifar100: torchvision's dataset files under
data.root (default data/<name>), read into memory as uint8 tensors.

The presence check looks for exactly the files torchvision's dataset classes read
(torchvision/datasets/mnist.py, cifar.py): the folder under data.root and the names in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ffdist.data.sources.base import SMOKE, DataMissing, MapSource, where
from ffdist.errors import DataError

if TYPE_CHECKING:
    from ffdist.data.mapstyle import MapData
    from ffdist.recipe import DataConfig

_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")


class TorchvisionSource(MapSource):
    """One of torchvision's small classification sets, all in memory."""

    dataset = ""                     # the torchvision.datasets class
    folder = ""                      # what it reads under data.root ...
    files: tuple[str, ...] = ()      # ... and the files there
    crop_flip = False                # augment: 4-pixel padded crops and horizontal flips
    in_memory, classes_known = True, 10

    def root(self, cfg: DataConfig) -> str:
        return cfg.root or f"data/{self.name}"

    def check_present(self, cfg: DataConfig, of: str) -> None:
        if cfg.download:  # torchvision fetches them
            return
        root = self.root(cfg)
        folder = Path(root) / self.folder
        absent = [f for f in self.files if not (folder / f).is_file()]
        if not absent:
            return
        raise DataMissing(f"{of}no {self.name} files in data.root={where(root)} (looked for "
                          f"{Path(self.folder) / absent[0]} there); add data.download=true to "
                          "let torchvision download them (needs a network), or set data.root to "
                          f"the folder that holds them, {SMOKE}.")

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        names = getattr(self._class(), "classes", None)  # MNIST's are class attributes
        return list(names) if isinstance(names, list) else list(self._open(cfg, False).classes)

    def _class(self) -> Any:
        from torchvision import datasets

        return getattr(datasets, self.dataset)

    def _open(self, cfg: DataConfig, train: bool) -> Any:
        root = self.root(cfg)
        try:
            return self._class()(root, train=train, download=cfg.download)
        except RuntimeError as e:
            if cfg.download:
                raise DataError(f"data.name={self.name}: download into {root} failed ({e}); "
                                "check the network, or put the files there by hand.") from None
            raise DataError(f"data.root={root}: no {self.name} files there; set "
                            "data.download=true (needs a network) or data.root to the folder "
                            "that holds them.") from None

    def datasets(self, cfg: DataConfig, seed: int, num_classes: int, channels: int) -> MapData:
        import torch

        from ffdist.data import transforms as T
        from ffdist.data.datasets import TensorImages
        from ffdist.data.mapstyle import MapData
        from ffdist.data.stream import DataSpec

        def as_tensor(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.as_tensor(ds.data)
            x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # NHWC (CIFAR) -> NCHW
            return x.contiguous().to(torch.uint8), torch.as_tensor(ds.targets)

        train = self._open(cfg, True)
        (xt, yt), (xv, yv) = as_tensor(train), as_tensor(self._open(cfg, False))
        aug = cfg.augment and self.crop_flip
        mean, std = self.normalization(xt.shape[1])
        spec = DataSpec(list(train.classes), xt.shape[1], xt.shape[-1], mean, std)
        return MapData(TensorImages(xt, yt, pad=4 if aug else 0, flip=aug, seed=seed,
                                    sample_tf=T.sample_transforms(cfg, mean, std)),
                       TensorImages(xv, yv), spec)


class MNIST(TorchvisionSource):
    name, dataset, folder, files = "mnist", "MNIST", "MNIST/raw", _IDX
    native_size = 28
    mean, std = (0.1307 * 255,), (0.3081 * 255,)  # digits must not be flipped: no crop_flip


class FashionMNIST(TorchvisionSource):
    name, dataset, folder, files = "fashion_mnist", "FashionMNIST", "FashionMNIST/raw", _IDX
    native_size = 28
    mean, std = (0.2860 * 255,), (0.3530 * 255,)


class CIFAR10(TorchvisionSource):
    name, dataset, folder = "cifar10", "CIFAR10", "cifar-10-batches-py"
    files = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    native_size, crop_flip = 32, True
    mean = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
    std = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)


class CIFAR100(TorchvisionSource):
    name, dataset, folder, files = "cifar100", "CIFAR100", "cifar-100-python", ("train", "test",
                                                                                 "meta")
    native_size, crop_flip, classes_known = 32, True, 100
    mean = (0.5071 * 255, 0.4865 * 255, 0.4409 * 255)
    std = (0.2673 * 255, 0.2564 * 255, 0.2762 * 255)


TORCHVISION_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    s.name: (s.folder, s.files) for s in (MNIST, FashionMNIST, CIFAR10, CIFAR100)}
"""name -> (the folder under data.root, the files torchvision reads there)."""
