"""Small models of our own, for tests, tutorials and CPU runs."""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """LeNet-5 as in the classic PyTorch tutorial (conv 6 -> conv 16 -> 120 -> 84 -> classes).

    conv1 pads by 2 so 28x28 MNIST and 32x32 CIFAR both work; an adaptive pool gives the
    tutorial's 5x5 map for any input size, so the head never depends on the image size.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((5, 5)),
        )
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x)))


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head. No BatchNorm on purpose: its result does not
    depend on how the global batch is split over ranks, so 1 and N processes agree."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True),
        )
        # A 2x2 map keeps where strokes are (it matters for 8x8 digits); any input size works.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.flatten(self.pool(self.features(x)), 1)))
