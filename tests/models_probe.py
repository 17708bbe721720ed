"""`python -m tests.models_probe MODULE [args ...]`: an ffdist command (ffdist.train,
ffdist.evaluate, ...) with the model of docs/extending.md's worked example registered as
`tiny_mlp`, for tests/integration/test_model_seam.py. The class below is the example, as the
doc prints it."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two residual MLP blocks on an 8x8 average of the image (any image size)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0,
                 width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                                  nn.Linear(in_channels * 64, width))
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width),
                                                    nn.GELU()) for _ in range(2)))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def register() -> None:
    from ffdist import models

    models.OWN["tiny_mlp"] = TinyMLP


if __name__ == "__main__":
    register()
    module = importlib.import_module(sys.argv[1])
    sys.exit(module.main(sys.argv[2:]))
