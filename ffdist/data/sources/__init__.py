"""The data-source registry: data.name -> the Source that reads it.

A source is one module here plus one line in REGISTRY ("module:Class", imported on first
use, so that asking one source does not import the others). Source modules import without
torch (ffdist.data.sources.base). Code outside this package never tests a source's name:
it asks the source (`get(name)`) for what it needs to know.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ffdist.data.sources.base import DataMissing, MapSource, Source
from ffdist.errors import DataError

REGISTRY: dict[str, str | Callable[[], Source]] = {
    "digits": "ffdist.data.sources.digits:Digits",
    "mnist": "ffdist.data.sources.torchvision_sets:MNIST",
    "fashion_mnist": "ffdist.data.sources.torchvision_sets:FashionMNIST",
    "cifar10": "ffdist.data.sources.torchvision_sets:CIFAR10",
    "cifar100": "ffdist.data.sources.torchvision_sets:CIFAR100",
    "imagefolder": "ffdist.data.sources.folders:ImageFolder",
    "filelist": "ffdist.data.sources.folders:FileList",
    "shards": "ffdist.data.sources.shards:Shards",
    "synthetic": "ffdist.data.sources.synthetic:Synthetic",
}


class UnknownSource(DataError):
    """data.name names no registered source; every rank reads the same recipe."""

    same_on_all_ranks = True


def register(name: str, factory: str | Callable[[], Source]) -> None:
    """Add a source: "module:Class", or a callable that returns a Source (a test's, a
    plugin's). It must be registered in every process that reads its recipes."""
    REGISTRY[name] = factory


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Source:
    """The source data.name names, or a DataError with the closest name."""
    factory = REGISTRY.get(name)
    if factory is None:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(REGISTRY)}."
        raise UnknownSource(f"data.name={name!r} is not a dataset; {hint}")
    if isinstance(factory, str):
        module, _, cls = factory.partition(":")
        factory = getattr(importlib.import_module(module), cls)
    source = factory()
    source.name = name
    return source


__all__ = ["REGISTRY", "DataMissing", "MapSource", "Source", "UnknownSource", "get",
           "names", "register"]
