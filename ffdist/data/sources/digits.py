"""data.name=digits: scikit-learn's 8x8 handwritten digits (1,797 grey images, 10 classes),
held in memory; the val split is ffdist.data.digits' fixed stratified one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ffdist.data.sources.base import MapSource

if TYPE_CHECKING:
    from ffdist.data.mapstyle import MapData
    from ffdist.recipe import DataConfig


class Digits(MapSource):
    name = "digits"
    native_size = 8
    in_memory, classes_known = True, 10
    mean = (0.3053 * 255,)
    std = (0.3760 * 255,)
    example_images = ("samples", "ffdist samples --out samples",
                      "a few digit PNGs to try predict on")

    def classes(self, cfg: DataConfig, num_classes: int) -> list[str]:
        return [str(c) for c in range(10)]

    def datasets(self, cfg: DataConfig, seed: int, num_classes: int, channels: int) -> MapData:
        import torch

        from ffdist.data import digits
        from ffdist.data import transforms as T
        from ffdist.data.datasets import TensorImages
        from ffdist.data.mapstyle import MapData
        from ffdist.data.stream import DataSpec

        pixels, target = digits.load()
        images = torch.from_numpy(pixels)[:, None]
        labels = torch.from_numpy(target)
        # A fixed split (not the training seed): every run and every rank sees the same val set.
        tr, va = (torch.tensor(ix) for ix in digits.split(target, cfg.val_fraction))
        mean, std = self.normalization(1)
        # Shifts of up to one pixel; never flips (a mirrored 2 is not a 2).
        train = TensorImages(images[tr], labels[tr], pad=1 if cfg.augment else 0, seed=seed,
                             sample_tf=T.sample_transforms(cfg, mean, std))
        spec = DataSpec(self.classes(cfg, 10), 1, 8, mean, std)
        return MapData(train, TensorImages(images[va], labels[va]), spec)
