"""One place decides a run: `resolve()` derives every fact the recipe leaves to the machine,
`build_model()` and `build_trainer()` assemble what trains.

`resolve(recipe, world_size, device, launcher_precision)` is the only place the batch plan
and the precision are computed. `ffdist train`, `bench`, `eval`, `plan` and `predict` all
call it, so `ffdist plan` reports the batch plan and precision that
`ffdist train` will use on the same machine, and a consumer never recomputes a value (it
receives the frozen `Resolved`). `build_trainer()` is the one assembly of a Trainer, shared
by `ffdist train` and `ffdist bench` (so bench times what train trains: fine-tuning and
freezing included). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ffdist.recipe import DataConfig, Recipe
from ffdist.resolved import BatchPlan, Resolved, plan_batches, scaled_lr

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ffdist.checkpoint import CheckpointManager
    from ffdist.data import Streams
    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.monitor import Monitor

def image_size(data: DataConfig) -> int:
    """The side of the square images the model is fed, without opening the data (it may not
    be on this machine): the data source's native size, else data.image_size, else the
    source's default (ffdist.data.sources)."""
    from ffdist.data import sources

    return sources.get(data.name).train_size(data)


def eval_image_size(data: DataConfig) -> int:
    """The side of the eval (and predict/export) images: data.eval_image_size for sources
    that evaluate larger than they train (FixRes), else the training size."""
    from ffdist.data import sources

    return sources.get(data.name).eval_size(data)


def batch_plan(recipe: Recipe, world_size: int) -> BatchPlan:
    """The recipe's batch plan over `world_size` processes (part of `resolve`; alone where
    the device is not known yet, e.g. checking a Slurm job at submission)."""
    return plan_batches(recipe.data.batch_size, recipe.data.micro_batch_size, world_size)


def resolve(recipe: Recipe, world_size: int, device: torch.device,
            launcher_precision: str | None = None, *, trains: bool = True,
            local_world: int | None = None, streams: bool = True) -> Resolved:
    """The derived facts of a run, or the one-sentence error that refuses it.

    `trains=False` (eval, predict): the refusals that concern only a training strategy
    (strategy.name=single with N processes, a precision the strategy cannot train in, as
    DeepSpeed's fp16 without a GPU) are skipped, since those commands run the plain model.
    `local_world`: the ranks on this node, which share its cores (default: all of them).
    `streams=False` (predict): no data streams are built, so data.decode is not resolved
    (it says "cpu")."""
    from ffdist import precision, strategies, threads
    from ffdist.data import decoding, sources

    plan = batch_plan(recipe, world_size)
    strategy = strategies.resolve_name(recipe, world_size, check=trains)
    prec = precision.resolve(recipe.precision, device, launcher_precision)
    if trains:
        strategies.get(strategy).check_precision(prec, device)
    size = image_size(recipe.data)
    o = recipe.optim
    lr, lr_why = scaled_lr(o.lr, o.lr_reference_batch, plan.global_batch, o.name)
    share = threads.decide(recipe.launch.threads, recipe.data.num_workers,
                           cpu=device.type == "cpu", local_world=local_world or world_size,
                           pixels=plan.micro * size * size,
                           in_memory=sources.get(recipe.data.name).in_memory,
                           omp=threads.omp_threads())
    decode, why = decoding.resolve(recipe.data, recipe.model.in_channels, device,
                                   sources.get(recipe.data.name).encoded) if streams else ("cpu", "")
    return Resolved(plan, prec, strategy, size, device, eval_image_size(recipe.data), lr,
                    share.threads, share.workers, lr_why, share.why, share.workers_note,
                    decode=decode, decode_why=why)


def resolve_for(recipe: Recipe, info: DistInfo, *, trains: bool = True) -> Resolved:
    """`resolve` for this process, as ffdist.dist.init found it; this process then runs
    with the intra-op threads it resolved (set here, before any data or model exists)."""
    from ffdist import threads

    resolved = resolve(recipe, info.world_size, info.device, info.launcher_precision,
                       trains=trains, local_world=info.local_world_size)
    threads.apply(resolved.threads)
    return resolved


def settle(recipe: Recipe) -> Recipe:
    """The recipe with the model's `auto` keys replaced by what they mean for this data,
    so that the run's recipe.yaml (and eval, predict, resume, which read it) hold values:
    model.num_classes from the data source's classes (ffdist.data.sources), model.cifar_stem
    on for a ResNet trained on images of at most SMALL_IMAGES px. The one place they are
    decided; every command that builds a model from a recipe file calls it first."""
    from ffdist.recipe import AUTO

    model = recipe.model
    if model.num_classes != AUTO and model.cifar_stem != AUTO:
        return recipe
    changes: dict[str, Any] = {}
    if model.num_classes == AUTO:
        changes["num_classes"] = class_count(recipe.data)
    if model.cifar_stem == AUTO:
        from ffdist import models

        changes["cifar_stem"] = (image_size(recipe.data) <= SMALL_IMAGES
                                 and models.has_small_image_stem(model.name))
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **changes))


SMALL_IMAGES = 64
"""model.cifar_stem=auto: images of at most this side get the small-image stem. A ResNet's
ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) leaves an 8x8 map of a 32 px
image after its first block, and 1x1 after the last; the CIFAR stem keeps 32x32 there."""


def class_count(data: DataConfig) -> int:
    """The classes the data holds (model.num_classes=auto), as its source counts them."""
    from ffdist.data import sources
    from ffdist.errors import DataError

    count = sources.get(data.name).class_count(data)
    if count is None:
        raise DataError(f"model.num_classes=auto: data.name={data.name} does not say how many "
                        "classes it has; set model.num_classes=N.")
    if count < 2:
        raise DataError(f"model.num_classes=auto: data.name={data.name} has {count} class "
                        f"(data.root={data.root}); a classifier needs at least 2 class "
                        "folders.")
    return count


# ------------------------------------------------------------------------------ assembly

def build_model(recipe: Recipe, load_weights: bool = True) -> nn.Module:
    """The recipe's model with fine-tuning applied (model.pretrained, model.freeze): the ONE
    place a model is built, so every command counts the same trainable parameters.
    `load_weights=False` skips the pretrained weights (resuming: the checkpoint has them;
    plan/bench/eval: they need only the architecture and what is frozen)."""
    import torch

    from ffdist import models

    torch.manual_seed(recipe.seed)  # same initial weights on every rank and world size
    model = models.build(recipe.model)
    if recipe.model.pretrained or recipe.model.freeze:  # transfer learning: ffdist.finetune
        from ffdist import finetune

        model = finetune.prepare(model, recipe.model, load_weights=load_weights)
    return model


def prepare_blocks(model: nn.Module, recipe: Recipe) -> list[str]:
    """The model's blocks (model.blocks, else found by its family: ffdist.models.blocks),
    with model.activation_checkpointing applied to them in place: the ONE place both are
    decided, for training (build_trainer) and for `ffdist plan`'s measurement. Returns the
    block names (FSDP's units)."""
    from ffdist import models
    from ffdist.models import checkpointing

    cfg = recipe.model
    names = models.blocks(model, cfg.blocks)
    checkpointing.apply(model, cfg.activation_checkpointing, cfg.activation_checkpointing_every,
                        names, cfg.name)
    return names


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters; ZeRO-3 placeholders count with their full size."""
    def size(p: Any) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(size(p) for p in params), sum(size(p) for p in params if p.requires_grad)


def build_data(recipe: Recipe, resolved: Resolved, rank: int) -> Streams:
    """This rank's train and eval streams (ffdist.data.build) for the resolved batch plan and
    device. Whether mixing pairs must share a micro-batch is decided here, from the recipe's
    mixup/cutmix (ffdist.mixup), so that the data layer never imports the regularization."""
    from ffdist import data, mixup

    return data.build(recipe, rank, resolved.plan, resolved.device,
                      pairs=mixup.enabled(recipe.data), workers=resolved.workers,
                      decode=resolved.decode, decode_why=resolved.decode_why)


def build_trainer(recipe: Recipe, info: DistInfo, resolved: Resolved, *,
                  data: Streams | None = None, model: nn.Module | None = None,
                  open_monitor: Callable[[], Monitor] | None = None,
                  manager: CheckpointManager | None = None) -> Trainer:
    """The one assembly of a Trainer: data, model (build_model), its blocks and activation
    checkpointing (prepare_blocks), strategy, Trainer.

    What is not given is built here: the data streams (build_data); the model (with its
    pretrained weights left out: ffdist train passes the model it built and vetted); a
    Monitor whose sinks are off and a CheckpointManager that never writes (ffdist bench:
    nothing is left behind). `open_monitor` is called once the strategy exists: building it
    is the last step that can refuse the run (a DeepSpeed config error), and a Monitor
    starts writing the run directory."""
    import torch

    from ffdist import strategies
    from ffdist.checkpoint import CheckpointManager
    from ffdist.engine import Trainer
    from ffdist.monitor import Monitor

    if data is None:
        data = build_data(recipe, resolved, info.rank)
    if model is None:
        model = build_model(recipe, load_weights=False)
    blocks = prepare_blocks(model, recipe)
    torch.manual_seed(recipe.seed + 1000 * info.rank)  # per-rank dropout/augmentation
    strategy = strategies.build(model, recipe, resolved, info, blocks=blocks)
    monitor = open_monitor() if open_monitor else Monitor.off()
    if manager is None:
        manager = CheckpointManager(recipe.run_dir, recipe.checkpoint, is_writer=False)
    return Trainer(recipe, info, resolved, data, strategy, monitor, manager)
