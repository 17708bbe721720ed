"""data.name=synthetic: random uint8 images and labels made in memory (seeded), at any size:
smoke tests and throughput (`ffdist bench --synthetic`) without a dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ffdist.data.sources.base import MapSource

if TYPE_CHECKING:
    from ffdist.data.mapstyle import MapData
    from ffdist.recipe import DataConfig


class Synthetic(MapSource):
    name = "synthetic"
    default_size = 32
    in_memory = True  # and any class count: model.num_classes says it (classes_known None)
    mean, std = (127.5,), (73.9,)  # uniform 0..255

    def datasets(self, cfg: DataConfig, seed: int, num_classes: int, channels: int) -> MapData:
        import torch

        from ffdist.data.datasets import TensorImages
        from ffdist.data.mapstyle import MapData
        from ffdist.data.stream import DataSpec

        size = self.train_size(cfg)
        g = torch.Generator().manual_seed(seed)
        # 256 distinct images cycled: enough for throughput, little memory at 224x224.
        distinct = torch.randint(0, 256, (min(256, cfg.synthetic_size), channels, size, size),
                                 dtype=torch.uint8, generator=g)
        images = distinct.repeat(-(-cfg.synthetic_size // len(distinct)), 1, 1, 1)
        images = images[: cfg.synthetic_size]
        labels = torch.randint(0, num_classes, (cfg.synthetic_size,), generator=g)
        n_val = max(1, int(cfg.synthetic_size * cfg.val_fraction))
        mean, std = self.normalization(channels)
        val = images[:n_val]
        if cfg.eval_image_size and cfg.eval_image_size != size:  # a recipe evaluating larger
            val = torch.randint(0, 256, (n_val, channels, cfg.eval_image_size,
                                         cfg.eval_image_size), dtype=torch.uint8, generator=g)
        spec = DataSpec(self.classes(cfg, num_classes), channels, size, mean, std,
                        eval_image_size=cfg.eval_image_size)
        return MapData(TensorImages(images[n_val:], labels[n_val:]),
                       TensorImages(val, labels[:n_val]), spec)
