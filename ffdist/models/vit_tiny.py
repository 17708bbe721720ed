"""`vit_tiny`: a small Vision Transformer of our own, for tests, benchmarks and CPU runs of
the transformer recipes (FSDP, activation checkpointing) at small image sizes.

The "simple ViT" of Beyer, Zhai and Kolesnikov (2022, "Better plain ViT baselines for
ImageNet-1k"): patch embedding, a FIXED 2-D sin-cos position embedding, pre-norm blocks
(multi-head self-attention + GELU MLP), global average pooling, LayerNorm, linear head.
The position embedding is computed for the patch grid of each input, so one model takes
any image size that its patch size divides, and no parameter depends on the image size.
ViT-Ti's width (192, 3 heads, MLP 768) with 6 blocks and 8-pixel patches: 2.7M parameters.
Its blocks are `blocks.0` ... `blocks.5` (ffdist.models.blocks finds them).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, dim) position embedding: sin/cos of the row and column at dim/4 frequencies."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                          indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4 - 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (torch's RNG, like dropout)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.heads, self.drop_path_rate = heads, drop_path_rate
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attention(self.norm1(x)), self.drop_path_rate, self.training)
        mlp = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + drop_path(mlp, self.drop_path_rate, self.training)


class VitTiny(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0,
                 drop_path_rate: float = 0.0, patch: int = 8, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp: int = 768):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        # drop-path rises linearly over depth to drop_path_rate at the last block (timm's rule)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp, r) for r in rates))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (b, dim, h/p, w/p)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + sincos_2d(h, w, self.dim, x.device, x.dtype)
        x = self.norm(self.blocks(x)).mean(dim=1)
        return self.head(self.drop(x))
