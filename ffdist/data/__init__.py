"""Data: sources by name (ffdist.data.sources), the streams they build (ffdist.data.stream),
and the device step (DevicePrefetcher).

`build` is the one entry: this rank's train and eval streams for a recipe and the batch plan
the run resolved. It imports no torch itself (the source does, in its build), and
DevicePrefetcher loads ffdist.data.prefetch (and torch) on first use, so that the torch-free
ffdist.data.presence check runs before torch is imported (a missing dataset is reported as
fast as a recipe mistake).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ffdist.data import sources
from ffdist.data.stream import DataSpec, EvalStream, StreamRequest, Streams, TrainStream
from ffdist.errors import DataError, Problems
from ffdist.resolved import BatchPlan

if TYPE_CHECKING:
    import torch

    from ffdist.data.prefetch import DevicePrefetcher
    from ffdist.recipe import Recipe

log = logging.getLogger("ffdist")

DECODE_SAYS = {"cpu": "the loader workers decode and augment each image",
               "gpu": "the loader workers read bytes and draw crop boxes; the GPU decodes the "
                      "JPEGs and crops the boxes",
               "boxes": "the loader workers read bytes and draw crop boxes; the training "
                        "process decodes and crops them on the CPU"}

__all__ = ["DataSpec", "DevicePrefetcher", "EvalStream", "Streams", "TrainStream", "build"]


def build(recipe: Recipe, rank: int, plan: BatchPlan, device: torch.device, *,
          pairs: bool, workers: int, decode: str = "cpu", decode_why: str = "") -> Streams:
    """This rank's streams of the source data.name names, for the batch plan the run
    resolved (ffdist.assemble.resolve: the streams never recompute it). `pairs`: mixup/cutmix
    is on and pairs must share a micro-batch (the caller decides: ffdist.assemble.build_data);
    `workers`: the DataLoader workers per rank it resolved.
    `decode`: data.decode as resolved (ffdist.data.decoding; `decode_why` what decided it,
    said once in the log by rank 0).
    The source's spec is checked against the model's classes and channels. What these
    checks find (sizes, classes, the batch against the data, channels) is reported
    together, one line per problem (errors.Refusals), not one per start."""
    if not isinstance(plan, BatchPlan):
        raise TypeError("ffdist.data.build takes the BatchPlan of ffdist.assemble.resolve() "
                        f"(resolved.plan), not {type(plan).__name__}")
    cfg = recipe.data
    source = sources.get(cfg.name)
    problems = Problems()
    with problems.check():
        source.check_sizes(cfg)
    counted = source.class_count(cfg)  # before building: a batch error must not hide it
    # fewer than 2 classes is its own sentence (spec_problems), not a num_classes mismatch
    mismatch = counted is not None and counted >= 2 and counted != recipe.model.num_classes
    if mismatch:
        problems.add(_classes_error(cfg.name, recipe.model.num_classes, counted))
    eval_global = cfg.eval_batch_size or cfg.batch_size
    # with a class mismatch already found, the rest is checked as if it were fixed, so that
    # only the problems independent of it are added (not "label 5 out of range" again)
    classes = counted if mismatch else recipe.model.num_classes
    req = StreamRequest(plan, rank, recipe.seed, classes,
                        recipe.model.in_channels, pairs, eval_batch=max(1, eval_global //
                                                                        plan.world_size),
                        # pinned host memory only helps (and only works) with CUDA
                        pin_memory=device.type == "cuda", workers=workers, decode=decode)
    if rank == 0 and (decode != "cpu" or cfg.decode != "cpu"):
        log.info("data.decode=%s: %s%s", cfg.decode, DECODE_SAYS[decode],
                 f" ({decode_why})" if decode_why else "")
    streams = None
    with problems.check():
        streams = source.build(cfg, req)
    if streams is not None:
        for e in spec_problems(streams.spec, cfg.name, recipe.model.num_classes,
                               recipe.model.in_channels):
            problems.add(e)
    problems.raise_any()
    assert streams is not None
    return streams


def _classes_error(name: str, num_classes: int, count: int) -> DataError:
    return DataError(f"model.num_classes={num_classes} but data.name={name} has {count} "
                     f"classes; set model.num_classes={count} (or auto).")


def spec_problems(spec: DataSpec, name: str, num_classes: int, channels: int) -> list[DataError]:
    """Where the data and the model disagree: classes, channels."""
    if len(spec.classes) < 2:  # model.num_classes=1 is refused by the schema: say what is
        return [DataError(f"data.name={name} has {len(spec.classes)} class(es) "
                          f"({', '.join(spec.classes[:3]) or 'none'}); a classifier needs at "
                          "least 2: add the images of another class (imagefolder: another "
                          "class folder under train/ and val/).")]
    found = []
    if len(spec.classes) != num_classes:
        found.append(_classes_error(name, num_classes, len(spec.classes)))
    if spec.channels != channels:
        found.append(DataError(f"model.in_channels={channels} but data.name={name} images "
                               f"have {spec.channels} channel(s); set "
                               f"model.in_channels={spec.channels}."))
    return found


def __getattr__(name: str) -> Any:
    if name == "DevicePrefetcher":
        from ffdist.data.prefetch import DevicePrefetcher

        return DevicePrefetcher
    raise AttributeError(f"module 'ffdist.data' has no attribute {name!r}")
