"""Datasets, transforms, samplers and loaders.

The names below load ffdist.data.loader (and torch) on first use, so that the torch-free
ffdist.data.presence check runs before torch is imported (a missing dataset is reported
as fast as a recipe mistake)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ffdist.data.loader import DevicePrefetcher, Loaders, build

__all__ = ["DevicePrefetcher", "Loaders", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ffdist.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'ffdist.data' has no attribute {name!r}")
