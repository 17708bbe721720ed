"""The recipe: what to train. The schema: one dataclass per section, one docstring per key
(docs/recipe-reference.md is generated from them by ffdist.docs), and the range checks in
each section's `__post_init__`.

ffdist.recipe_load reads a YAML file onto these dataclasses and applies `key=value`
overrides, with one `RecipeError` sentence for whatever is wrong.

Nothing here names a rank or a device index: the environment says *where* (ffdist.dist).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SECTIONS = (
    "model", "data", "optim", "schedule", "strategy", "launch", "checkpoint", "log",
)
AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")
AC_MODES = ("none", "blocks", "every_n", "selective")
LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "slurm")  # launch.launcher, ffdist launch --launcher

AUTO = "auto"
"""The value of keys whose number is decided from the data or the machine."""
MAX_CLASSES = 1_000_000
MAX_THREADS = 4096


class Invalid(ValueError):
    """Raised by __post_init__ checks; ffdist.recipe_load.load adds the file name."""

    def __init__(self, key: str, value: Any, fix: str):
        super().__init__(f"{key}={value!r}: {fix}")
        self.key, self.value, self.fix = key, value, fix


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise Invalid(key, value, fix)


MAX_IMAGE_SIDE = 4096
"""Largest data.image_size / eval_image_size / eval_resize_size. One 4096x4096 RGB image is
50 MB as uint8 and 200 MB as the fp32 the model sees, so a batch of 32 needs 6.4 GB before
the first layer; classification trains at 224 to 600 (EfficientNet-B7) and high-resolution
fine-tuning stays below 2048. A larger side is a slip (a pixel count, a file size) that would
otherwise run for a minute and die in the allocator."""

MAX_IMAGE_PIXELS = 89_478_485
"""Default of data.max_image_pixels: Pillow's own decompression-bomb threshold (its
MAX_IMAGE_PIXELS, 0.25 GiB of 24-bit pixels), which photo tools already respect. A file
claiming more (a 109 KB PNG can claim 30000x30000 = 900 M pixels, 2.7 GB decoded) is refused
from its header, before any decoder allocates; a 100-megapixel camera raises the key."""

DECODE_MODES = ("cpu", "gpu", "auto", "boxes")
"""data.decode: who decodes and crops encoded images (ffdist.data.decoding)."""

MAX_NPROC = 512
"""Largest launch.nproc: processes on ONE node. A GPU node has at most 16 GPUs (one process
each); CPU ranks go up to the cores of the largest nodes (2 x 192 today). Every process
imports torch (about 0.5 GB), so 100000 is a typo, not a plan."""

MAX_NNODES = 16384
"""Largest launch.nnodes: 131,072 GPUs at 8 per node, beyond the largest clusters built."""


def _port_of(endpoint: str) -> int | None:
    """The port of 'host:port' (an IPv6 host in brackets), or None when it is not 1..65535."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isascii() or not port.isdigit():
        return None
    return int(port) if 1 <= int(port) <= 65535 else None


def _non_finite(section: Any, prefix: str) -> tuple[str, Any, Any] | None:
    """(key, value, default) of the first float (or list of floats) field of `section` that
    is inf or NaN: no recipe number is right at infinity, and NaN passes no comparison."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            default = f.default_factory() if callable(f.default_factory) else f.default
            return prefix + f.name, value, default
    return None


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    """Registry name: a torchvision classification model (resnet50, vit_b_16, ...) or ours
    (lenet, small_cnn). `ffdist.models.available()` lists them."""
    num_classes: int | str = 10
    """Output classes; must match the dataset. auto: the data's own count (its class
    folders, or the dataset's fixed classes), written as a number into the run's
    recipe.yaml."""
    in_channels: int = 3
    """Input channels (1 for grey digits/MNIST); torchvision stems are rebuilt for != 3."""
    cifar_stem: bool | str = False
    """ResNets only: 3x3 stride-1 conv1 and no max-pool, for 32x32 images. auto: on for a
    ResNet trained on images of at most 64 px (ffdist.assemble.settle), written as true or
    false into the run's recipe.yaml."""
    pretrained: str | None = None
    """null, 'true' (torchvision's weights, needs a network) or a path to a local .pt/.pth
    (ffdist checkpoint: its raw weights, of a best.pt the ones it was picked by; model.pt;
    or a plain state dict). The head is replaced when the class count differs."""
    freeze: list[str] = field(default_factory=list)
    """Parameters not trained: [] (none), [backbone] (all but the head) or name prefixes.
    Frozen BatchNorm layers stay in eval mode."""
    pool: str = "avg"
    """Global pooling of CNN backbones: avg or gem (generalized mean)."""
    dropout: float = 0.0
    """Dropout before the classifier of our own models."""
    channels_last: bool = True
    """NHWC memory format for conv nets (faster with AMP on GPUs and with bf16 on CPUs)."""
    compile: bool = False
    """torch.compile the model before the DDP wrap."""
    compile_backend: str = "inductor"
    """torch.compile backend when model.compile is true: inductor (generated kernels; the
    first steps take a while to compile), or aot_eager / eager to check a model compiles."""
    drop_path_rate: float | None = None
    """Stochastic depth: the drop probability of the LAST residual block, rising linearly
    from 0 over depth (torchvision's stochastic_depth_prob for convnext, efficientnet, swin,
    maxvit; timm's drop_path_rate; ResNets: a drop-path on each residual branch). null:
    the architecture's own default (0.1 for convnext_tiny, none for ResNets)."""
    blocks: list[str] = field(default_factory=list)
    """The model's blocks, by module name (e.g. [layer1, layer2, layer3, layer4]): the units
    strategy.name=fsdp shards and model.activation_checkpointing wraps. []: found by the
    model's family (ResNet stages layer1..4, torchvision ViT encoder layers, the children
    of `features` for ConvNeXt/EfficientNet/Swin, timm's `blocks` or `stages`, vit_tiny's
    blocks); `ffdist models --blocks NAME` lists them."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them (any strategy): none |
    blocks (every block) | every_n (every model.activation_checkpointing_every-th block) |
    selective (every block, but the outputs of matmuls and convolutions are kept and only
    the cheap ops between them are recomputed). The gradients are the same; the memory of
    the activations of a checkpointed block is traded for a second forward of it."""
    activation_checkpointing_every: int = 2
    """With activation_checkpointing=every_n: checkpoint blocks N, 2N, ... (1-based)."""

    def __post_init__(self) -> None:
        _check(self.num_classes == AUTO or (isinstance(self.num_classes, int)
                                            and 2 <= self.num_classes <= MAX_CLASSES),
               "model.num_classes", self.num_classes,
               f"use auto (the data's classes) or a count from 2 to {MAX_CLASSES}")
        _check(isinstance(self.cifar_stem, bool) or self.cifar_stem == AUTO,
               "model.cifar_stem", self.cifar_stem, "use true, false or auto")
        _check(self.in_channels >= 1, "model.in_channels", self.in_channels, "use 1 or 3")
        _check(self.pool in ("avg", "gem"), "model.pool", self.pool, "use avg or gem")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "use 0 <= p < 1")
        _check(self.drop_path_rate is None or 0.0 <= self.drop_path_rate < 1.0,
               "model.drop_path_rate", self.drop_path_rate, "use 0 <= p < 1 or null")
        _check(not self.name.startswith("timm/") or len(self.name) > 5, "model.name", self.name,
               "name a timm architecture after the prefix, e.g. timm/resnet50")
        _check(self.activation_checkpointing in AC_MODES, "model.activation_checkpointing",
               self.activation_checkpointing, f"use {', '.join(AC_MODES)}")
        _check(self.activation_checkpointing_every >= 1, "model.activation_checkpointing_every",
               self.activation_checkpointing_every, "use 1 or more")
        _check(len(set(self.blocks)) == len(self.blocks) and all(self.blocks), "model.blocks",
               self.blocks, "list each module name once, e.g. [layer1, layer2]")


@dataclass
class DataConfig:
    name: str = "digits"
    """digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder | filelist | shards |
    synthetic."""
    root: str | None = None
    """Folder of the data: torchvision's files, or train/ and val/ class folders for
    imagefolder (or only the class folders: see val_fraction), or the image root for
    filelist. Default: data/<name>."""
    download: bool = False
    """Let torchvision download mnist/cifar into `root` (needs a network)."""
    batch_size: int = 64
    """GLOBAL batch per optimizer step, over all ranks and accumulation micro-steps."""
    micro_batch_size: int | None = None
    """Cap on what one device holds at once; the rest becomes gradient accumulation."""
    eval_batch_size: int | None = None
    """Global eval batch (default: batch_size)."""
    image_size: int | None = None
    """Side of the (square) training crop, at most 4096; default: 224 for folders, 32 for
    synthetic data. Datasets of their own size (digits, mnist, cifar) refuse it."""
    num_workers: int | str = 0
    """DataLoader worker processes per rank (0: load in the training process). A number is
    capped at the cores this process may use (one line says so); auto: none for data held
    in memory, else the cores of this rank but one, at most 8 (ffdist.threads)."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready (only with num_workers > 0)."""
    persistent_workers: bool = True
    """Keep workers alive between epochs (only with num_workers > 0)."""
    augment: bool = True
    """Training augmentation of the dataset's preset (crop/flip); eval never augments."""
    val_fraction: float = 0.2
    """digits/synthetic, and imagefolder with one folder of class sub-folders (no train/ and
    val/): the fraction held out for validation (per class for digits and folders; a
    folder's files are chosen by a hash of their names, the same in every run)."""
    train_list: str | None = None
    """filelist: text file of `relative/path<sep>label` lines for training."""
    val_list: str | None = None
    """filelist: the same for validation."""
    list_sep: str = " "
    """filelist: separator between path and label."""
    classes: list[str] = field(default_factory=list)
    """filelist: class names in label order (default: the labels as strings)."""
    train_shards: str | None = None
    """shards: the training tar shards (WebDataset layout: key.jpg + key.cls): a folder
    written by `ffdist shard`, a brace pattern (/data/in1k/train-{000000..000146}.tar),
    http(s):// URLs or a `pipe:` command (run only with FFDIST_ALLOW_PIPE=1 in the
    environment); several joined with `::` (docs/data.md)."""
    val_shards: str | None = None
    """shards: the validation shards, as train_shards (default: the val split of the
    train_shards folder)."""
    shard_index: str | None = None
    """shards: the index.json (path or URL) that lists the shards, their sample counts and
    offsets (default: index.json beside them; without one, every process scans the shards
    once at start)."""
    label_key: str | None = None
    """shards: read each label from this key of the sample's .json member (samples without a
    .cls member)."""
    shuffle_buffer: int = 10000
    """shards: the shuffle window in samples: each epoch shuffles the shards, then moves each
    sample fewer than this many places (a seeded shuffle buffer); 0 or 1: shard order only."""
    synthetic_size: int = 2048
    """synthetic: number of generated images."""
    bad_images: str = "skip"
    """Unreadable images in a folder dataset (corrupt, not an image, or more pixels than
    data.max_image_pixels): skip (count, warn once) or error."""
    max_bad_fraction: float = 0.01
    """With bad_images=skip: fail when more than this fraction of a split is unreadable."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Largest image (width x height) decoded, read from the file's header before any
    decoder runs: a larger one counts as unreadable (data.bad_images). Default: Pillow's
    decompression-bomb threshold, 89,478,485 (0.27 GB as RGB)."""
    decode: str = "cpu"
    """Where encoded images (image folders, file lists, tar shards) are decoded and cropped:
    cpu (the loader workers decode and augment each image) | gpu (the workers read bytes
    and draw each crop box; the GPU decodes the batch's JPEGs with nvjpeg and crops the
    boxes in one batched kernel) | auto (gpu on a CUDA device when the recipe's
    augmentation runs there, else cpu) | boxes (gpu's path run on the CPU: a reference
    for tests and benchmarks). docs/performance.md."""
    auto_augment: str | None = None
    """Policy augmentation of training images (torchvision.transforms.v2 on uint8, seeded
    per sample): ra (RandAugment) | ta_wide (TrivialAugmentWide) | augmix | imagenet,
    cifar10, svhn (AutoAugment with that policy) | null (none)."""
    ra_num_ops: int = 2
    """auto_augment=ra: operations applied per image."""
    ra_magnitude: int = 9
    """auto_augment=ra: magnitude of each operation, 0..30 (torchvision's 31 bins)."""
    augmix_severity: int = 3
    """auto_augment=augmix: severity of the mixed operations, 1..10."""
    random_erase: float = 0.0
    """Random erasing (Zhong et al.): probability per training image of erasing a random
    rectangle (2-33% of the area), after the policy."""
    random_erase_mode: str = "mean"
    """What fills the erased rectangle: mean (the dataset mean colour, i.e. 0 after
    normalization, as torchvision's reference) | pixel (per-pixel Gaussian noise of the
    dataset's mean/std, timm's default)."""
    interpolation: str = "bilinear"
    """Resampling of resized crops, eval resizes and the policies' geometric operations:
    nearest | bilinear | bicubic (policies use bilinear then: torchvision's tensor
    rotations and shears have no bicubic)."""
    eval_image_size: int | None = None
    """Folder datasets: side of the eval center crop, at most 4096 (default: image_size). Training at a
    smaller crop than evaluation is torchvision's FixRes mitigation (176 / 224)."""
    eval_resize_size: int | None = None
    """Folder datasets: short side the eval image is resized to before the center crop
    (default: eval_image_size / 0.875, 256 for 224)."""
    repeated_augmentation: int = 1
    """Repeated augmentation (DeiT's RASampler, torchvision's --ra-reps): each image
    appears this many times in a row in an epoch's order, each copy with its own
    augmentation, spread over ranks; an epoch stays len(dataset) samples. 1: off."""
    mixup_alpha: float = 0.0
    """Mixup: Beta(alpha, alpha) mixing of image pairs and their labels (0: off)."""
    cutmix_alpha: float = 0.0
    """CutMix: Beta(alpha, alpha) area of a box pasted from the partner image (0: off)."""
    cutmix_minmax: list[float] | None = None
    """CutMix box side as [min, max] fractions of the image side instead of cutmix_alpha
    (timm's cutmix_minmax); null: use cutmix_alpha."""
    mix_prob: float = 1.0
    """Probability that mixup/cutmix is applied to a batch (or pair/element by mix_mode)."""
    mix_switch_prob: float = 0.5
    """With both mixup and cutmix on: probability of cutmix instead of mixup."""
    mix_mode: str = "batch"
    """batch (one draw per mix_group images) | pair (one per image pair) | elem (one per
    image), as timm's Mixup mode."""
    mix_group: int | None = None
    """mix_mode=batch: images that share one draw, a divisor of batch_size (null: the whole
    global batch). Set it to a reference recipe's per-GPU batch to mix as it did on its
    GPUs, on any number of devices."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "use a positive batch")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1,
               "data.micro_batch_size", self.micro_batch_size, "use a positive value or null")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1,
               "data.eval_batch_size", self.eval_batch_size, "use a positive value or null")
        _check(self.num_workers == AUTO or (isinstance(self.num_workers, int)
                                            and self.num_workers >= 0),
               "data.num_workers", self.num_workers, "use auto, 0 or more")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor,
               "use 1 or more (batches each loader worker keeps ready)")
        _check(bool(self.list_sep) and not any(c.isalnum() or c in "/\\.\r\n" for c in
                                               self.list_sep), "data.list_sep", self.list_sep,
            "use a separator that file names and labels do not contain, e.g. ' ', ',', ';' or "
            "a tab (quote a blank: data.list_sep=' ')")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "use a fraction between 0 and 1")
        _check(self.bad_images in ("skip", "error"), "data.bad_images", self.bad_images,
               "use skip or error")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction",
               self.max_bad_fraction, "use a fraction between 0 and 1")
        _check(self.decode in DECODE_MODES, "data.decode", self.decode,
               f"use one of {', '.join(DECODE_MODES)}")
        _check(self.max_image_pixels >= 1, "data.max_image_pixels", self.max_image_pixels,
               f"use a positive pixel count, e.g. {MAX_IMAGE_PIXELS}")
        for key in ("image_size", "eval_image_size", "eval_resize_size"):
            value = getattr(self, key)
            _check(value is None or 1 <= value <= MAX_IMAGE_SIDE, f"data.{key}", value,
                   f"use a side from 1 to {MAX_IMAGE_SIDE} pixels (larger images do not fit "
                   f"a batch in memory), e.g. data.{key}=224, or null")

        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer,
               "use 0 (shard order only) or a window in samples, e.g. 10000")
        self._check_augmentation()
        self._check_mixing()

    def _check_augmentation(self) -> None:
        _check(self.auto_augment in (None, *AUTO_AUGMENT), "data.auto_augment", self.auto_augment,
               f"use one of {', '.join(AUTO_AUGMENT)} or null")
        _check(self.auto_augment is None or self.augment, "data.auto_augment", self.auto_augment,
               "a policy is training augmentation: set data.augment=true or auto_augment=null")
        _check(self.ra_num_ops >= 1, "data.ra_num_ops", self.ra_num_ops, "use 1 or more")
        _check(0 <= self.ra_magnitude <= 30, "data.ra_magnitude", self.ra_magnitude,
               "use 0..30 (torchvision's 31 magnitude bins)")
        _check(1 <= self.augmix_severity <= 10, "data.augmix_severity", self.augmix_severity,
               "use 1..10")
        _check(0.0 <= self.random_erase <= 1.0, "data.random_erase", self.random_erase,
               "use a probability between 0 and 1")
        _check(self.random_erase == 0 or self.augment, "data.random_erase", self.random_erase,
               "erasing is training augmentation: set data.augment=true or random_erase=0")
        _check(self.random_erase_mode in ("mean", "pixel"), "data.random_erase_mode",
               self.random_erase_mode, "use mean or pixel")
        _check(self.interpolation in ("nearest", "bilinear", "bicubic"), "data.interpolation",
               self.interpolation, "use nearest, bilinear or bicubic")
        _check(self.repeated_augmentation >= 1, "data.repeated_augmentation",
               self.repeated_augmentation, "use 1 (off) or more repeats per image")

    def _check_mixing(self) -> None:
        _check(self.mixup_alpha >= 0, "data.mixup_alpha", self.mixup_alpha, "use 0 (off) or more")
        _check(self.cutmix_alpha >= 0, "data.cutmix_alpha", self.cutmix_alpha, "use 0 (off) or more")
        mm = self.cutmix_minmax
        _check(mm is None or (len(mm) == 2 and 0.0 < mm[0] < mm[1] <= 1.0), "data.cutmix_minmax",
               mm, "give [min, max] fractions with 0 < min < max <= 1, or null")
        _check(0.0 <= self.mix_prob <= 1.0, "data.mix_prob", self.mix_prob,
               "use a probability between 0 and 1")
        _check(0.0 <= self.mix_switch_prob <= 1.0, "data.mix_switch_prob", self.mix_switch_prob,
               "use a probability between 0 and 1")
        _check(self.mix_mode in ("batch", "pair", "elem"), "data.mix_mode", self.mix_mode,
               "use batch, pair or elem")
        g = self.mix_group
        _check(g is None or (g >= 2 and g % 2 == 0 and self.batch_size % g == 0), "data.mix_group",
               g, f"use an even divisor of data.batch_size={self.batch_size}, or null")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd | adamw."""
    lr: float = 0.1
    """Peak learning rate (after warmup), for the global batch (or, with
    lr_reference_batch, for that batch)."""
    lr_reference_batch: int | None = None
    """The global batch optim.lr is given for; the run's lr is scaled to data.batch_size:
    linearly for sgd (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), by the square
    root of the ratio for adamw. null: optim.lr is the run's lr as given."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay; not applied to biases and norms."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (null: no clipping)."""
    ema_decay: float = 0.0
    """EMA of the weights: decay per EMA update, ema = decay * ema + (1 - decay) * weights,
    over an fp32 copy of all parameters and float buffers (0: off). torchvision's
    --model-ema-decay 0.99998 is 'adjusted' to 1 - 2e-5 * batch * ema_every_steps / epochs
    before use; give the adjusted value here."""
    ema_every_steps: int = 1
    """Update the EMA every N optimizer steps (torchvision's --model-ema-steps, e.g. 32)."""
    ema_warmup_epochs: float = 0.0
    """The EMA copies the weights (instead of averaging them) until this many epochs have
    passed, as torchvision's reference does during its lr warm-up."""
    ema_buffers: str = "average"
    """Float buffers (BatchNorm running statistics) in the EMA: average (as timm and
    torchvision) | copy (the raw model's latest)."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "adamw"), "optim.name", self.name, "use sgd or adamw")
        _check(self.lr > 0, "optim.lr", self.lr, "use a positive learning rate, e.g. 0.1")
        _check(self.lr_reference_batch is None or self.lr_reference_batch >= 1,
               "optim.lr_reference_batch", self.lr_reference_batch,
               "use the global batch optim.lr was tuned for, e.g. 256, or null")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", self.momentum, "use 0 <= m < 1")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
               self.betas, "give two values in [0, 1), e.g. [0.9,0.999]")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use 0 or more")
        _check(0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing",
               self.label_smoothing, "use 0 <= s < 1")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip",
               self.grad_clip, "use a positive norm or null")
        _check(0.0 <= self.ema_decay < 1.0, "optim.ema_decay", self.ema_decay,
               "use 0 (off) or a decay in (0, 1), e.g. 0.9999")
        _check(self.ema_every_steps >= 1, "optim.ema_every_steps", self.ema_every_steps,
               "use 1 or more")
        _check(self.ema_warmup_epochs >= 0, "optim.ema_warmup_epochs", self.ema_warmup_epochs,
               "use 0 or more")
        _check(self.ema_buffers in ("average", "copy"), "optim.ema_buffers", self.ema_buffers,
               "use average or copy")


@dataclass
class ScheduleConfig:
    epochs: int = 10
    """Training epochs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (for smoke tests and benchmarks)."""
    scheduler: str = "cosine"
    """cosine | step | multistep | constant, after linear warmup."""
    warmup_epochs: float = 0.0
    """Linear warmup from warmup_start_factor*lr to lr, in (fractional) epochs."""
    warmup_steps: int = 0
    """The same warmup in optimizer steps (for small datasets, where an epoch is a few
    steps); set warmup_epochs or warmup_steps, not both."""
    warmup_start_factor: float = 0.1
    """Warmup starts at this fraction of lr."""
    step_size: int = 30
    """step: epochs between decays."""
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    """multistep: epochs at which lr is multiplied by gamma, positive and increasing."""
    gamma: float = 0.1
    """step/multistep decay factor."""
    min_lr: float = 0.0
    """cosine: final learning rate, from 0 to optim.lr."""
    eval_every_epochs: int = 1
    """Evaluate every N epochs (and always after the last)."""
    evaluate_before_train: bool = False
    """Evaluate the starting weights before the first epoch."""
    nan_policy: str = "stop"
    """Non-finite loss: stop (exit naming the step) or skip (skip the step, stop after
    max_bad_steps in a row)."""
    max_bad_steps: int = 5
    """With nan_policy=skip: consecutive skipped steps before stopping."""
    stop_if_not_learning: bool = False
    """A run that is not learning (val top-1 at chance for two evaluations in a row, or the
    training loss 10x its first logged value) is reported once, with its likely causes;
    true: it then stops with exit 2 (the last checkpoint is kept). ffdist.not_learning."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "schedule.epochs", self.epochs, "train at least 1 epoch")
        _check(self.max_steps is None or self.max_steps >= 1, "schedule.max_steps",
               self.max_steps, "use a positive number or null")
        _check(self.scheduler in ("cosine", "step", "multistep", "constant"),
               "schedule.scheduler", self.scheduler, "use cosine, step, multistep or constant")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "use 0 or more")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "use 0 or more")
        _check(not (self.warmup_steps and self.warmup_epochs), "schedule.warmup_steps",
               self.warmup_steps, f"schedule.warmup_epochs={self.warmup_epochs} is set too; "
               "give the warmup in steps or in epochs, and set the other to 0")
        _check(0.0 < self.warmup_start_factor <= 1.0, "schedule.warmup_start_factor",
               self.warmup_start_factor, "use a factor in (0, 1]")
        _check(self.step_size >= 1, "schedule.step_size", self.step_size, "use 1 or more")
        _check(0.0 < self.gamma <= 1.0, "schedule.gamma", self.gamma, "use 0 < gamma <= 1")
        _check(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "use 0 or more")
        m = self.milestones
        _check(all(e >= 1 for e in m) and all(a < b for a, b in zip(m, m[1:])),
               "schedule.milestones", m, "list epochs from 1 upwards, each later than the one "
               "before, e.g. schedule.milestones=[30,60,80]")
        _check(self.eval_every_epochs >= 1, "schedule.eval_every_epochs",
               self.eval_every_epochs, "use 1 or more")
        _check(self.nan_policy in ("stop", "skip"), "schedule.nan_policy", self.nan_policy,
               "use stop or skip")
        _check(self.max_bad_steps >= 1, "schedule.max_bad_steps", self.max_bad_steps,
               "use 1 or more")


@dataclass
class StrategyConfig:
    name: str = "auto"
    """auto (ddp when several processes, else single) | single | ddp | deepspeed | fsdp, or
    another registered strategy (ffdist.strategies.names(); an unknown name is refused when the
    run is resolved)."""
    sync_bn: bool = False
    """DDP: convert BatchNorm to SyncBatchNorm (statistics over the global batch)."""
    find_unused_parameters: bool = False
    """DDP: for models with parameters that get no gradient (frozen parts are excluded
    already)."""
    bucket_cap_mb: int = 25
    """DDP gradient bucket size."""
    zero_stage: int = 2
    """deepspeed: ZeRO stage 1, 2 or 3."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states in CPU memory."""
    offload_params: bool = False
    """deepspeed: keep parameters in CPU memory (ZeRO-3 only)."""
    deepspeed_config: str | None = None
    """deepspeed: JSON file with extra settings, merged onto the config derived from the
    recipe; contradicting the recipe is an error."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward and gather them again
    for its backward (less memory, one more all-gather per block); false keeps them
    between forward and backward (ZeRO-2-like traffic). The root's are always kept."""
    fsdp_offload: bool = False
    """fsdp: keep the sharded parameters, gradients and optimizer states in CPU memory
    (torch's CPUOffloadPolicy; the optimizer steps on the CPU). GPUs only."""
    fsdp_reduce_dtype: str = "fp32"
    """fsdp with bf16/fp16: the dtype gradients are reduce-scattered in. fp32 (the safe
    default: a sum over many ranks in bf16 loses low bits) | compute (the precision's own
    dtype: half the traffic)."""

    def __post_init__(self) -> None:
        # the strategy registry (ffdist.strategies) decides which names exist
        _check(bool(re.fullmatch(r"[a-z][a-z0-9_]*", self.name)), "strategy.name", self.name,
               "use auto, single, ddp, deepspeed or fsdp")
        _check(self.zero_stage in (0, 1, 2, 3), "strategy.zero_stage", self.zero_stage,
               "use 0, 1, 2 or 3")
        _check(not self.offload_params or self.zero_stage == 3, "strategy.offload_params",
               self.offload_params, "parameter offload needs strategy.zero_stage=3")
        _check(self.bucket_cap_mb >= 1, "strategy.bucket_cap_mb", self.bucket_cap_mb,
               "use 1 or more")
        _check(self.fsdp_reduce_dtype in ("fp32", "compute"), "strategy.fsdp_reduce_dtype",
               self.fsdp_reduce_dtype, "use fp32 or compute")


@dataclass
class LaunchConfig:
    launcher: str = "torchrun"
    """What `ffdist launch` starts: torchrun | accelerate | deepspeed | slurm."""
    device: str = "auto"
    """Where ranks run: auto (the GPUs when this node has any visible, else the CPU) | cuda
    | cpu (CPU ranks and gloo even where GPUs exist; CUDA is never initialised). Under auto
    or cuda, more processes on a node than visible GPUs is an error (exit 2), never a
    silent fallback to the CPU."""
    gpus: list[int] = field(default_factory=list)
    """GPU ids for `ffdist launch` on each node (-> CUDA_VISIBLE_DEVICES); [] = all visible.
    Ignored with launch.device=cpu."""
    nproc: int | None = None
    """Processes per node (at most 512). null: one per GPU (one per launch.gpus id, else per visible GPU)
    when ranks run on GPUs, one process on the CPU. A number: exactly that many, on GPUs
    (at most one per GPU; more is an error) or on the CPU (launch.device=cpu, or no GPU)."""
    nnodes: int = 1
    """Number of nodes (at most 16384)."""
    node_rank: int = 0
    """This node's rank (bare torchrun across nodes)."""
    rdzv_endpoint: str = "localhost:29500"
    """host:port of the c10d rendezvous (the head node); port 1..65535; with nnodes > 1 an
    address every node reaches (`ffdist launch` refuses a loopback one)."""
    rdzv_timeout: int = 900
    """Seconds ranks wait for each other at start: torchrun's rendezvous of the nodes, and
    ffdist's own meeting of the ranks (all arrived, the same recipe, the run directory's
    verdict, the shared output_dir), which says what it waits for while it waits and
    ends with one sentence naming the rank that never came."""
    socket_ifname: str | None = None
    """Network interface for NCCL/gloo traffic (NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME)."""
    max_restarts: int = 0
    """torchrun restarts of all local workers after a failure."""
    pg_timeout: int = 1800
    """Seconds a collective may wait for a peer before the process group fails."""
    threads: int | str = "auto"
    """Intra-op CPU threads of each process (torch.set_num_threads). A number: exactly that.
    auto: OMP_NUM_THREADS when it is set; else, on the CPU, the cores this process may use
    (affinity, cgroup quota) shared by the ranks of the node and the loader workers, and no
    more than the model's work per step keeps busy (docs/performance.md); on a GPU, the
    cores per rank. The start line says what was chosen and why."""

    def __post_init__(self) -> None:
        _check(self.launcher in LAUNCHERS, "launch.launcher", self.launcher,
               f"use {', '.join(LAUNCHERS[:-1])} or {LAUNCHERS[-1]}")
        _check(all(g >= 0 for g in self.gpus), "launch.gpus", self.gpus,
               "GPU ids are 0 or more, e.g. [0, 2]")
        _check(len(set(self.gpus)) == len(self.gpus), "launch.gpus", self.gpus,
               "list each GPU id once")
        _check(self.device in ("auto", "cuda", "cpu"), "launch.device", self.device,
               "use auto, cuda or cpu")
        _check(self.nproc is None or 1 <= self.nproc <= MAX_NPROC, "launch.nproc", self.nproc,
               f"use 1 to {MAX_NPROC} processes per node, e.g. launch.nproc=2, or null (one "
               "per GPU; one on the CPU)")
        _check(1 <= self.nnodes <= MAX_NNODES, "launch.nnodes", self.nnodes,
               f"use 1 to {MAX_NNODES} nodes, e.g. launch.nnodes=1")
        _check(0 <= self.node_rank < self.nnodes, "launch.node_rank", self.node_rank,
               "use 0 .. nnodes-1")
        _check(_port_of(self.rdzv_endpoint) is not None, "launch.rdzv_endpoint",
               self.rdzv_endpoint, "use host:port with a port from 1 to 65535, e.g. "
               "launch.rdzv_endpoint=localhost:29500")
        _check(self.pg_timeout >= 1, "launch.pg_timeout", self.pg_timeout, "use 1 or more")
        _check(self.rdzv_timeout >= 1, "launch.rdzv_timeout", self.rdzv_timeout, "use 1 or more")
        _check(self.max_restarts >= 0, "launch.max_restarts", self.max_restarts, "use 0 or more")
        _check(self.threads == AUTO or (isinstance(self.threads, int)
                                        and 1 <= self.threads <= MAX_THREADS),
               "launch.threads", self.threads, f"use auto or a count from 1 to {MAX_THREADS}")


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Save at the end of every N epochs (and always at the end)."""
    every_steps: int = 0
    """Also save every N optimizer steps, mid-epoch (0: off)."""
    keep_last: int = 3
    """Step checkpoints kept; older ones are deleted (best.pt is kept apart)."""
    keep_best: bool = True
    """Write checkpoints/best.pt at every evaluation that sets a new best val top-1 (of the
    weights checkpoint.best_weights names), whatever every_epochs says: the consolidated
    weights of that step (and their EMA), with the step, split and value they scored."""
    resume: str = "auto"
    """auto: continue an unfinished run from its newest complete checkpoint (a finished one
    with the same recipe: nothing to do) | never: start fresh, refuse an output_dir that
    holds a run | extend: continue a finished run in place with more epochs/steps (its
    model.pt is replaced) | a checkpoint path. Keys that may change on resume: see
    docs/failure-and-recovery.md."""
    best_weights: str = "raw"
    """Which evaluation picks best.pt: raw (the trained weights) | ema (their EMA; needs
    optim.ema_decay > 0)."""
    final_weights: str = "raw"
    """Which weights model.pt holds: raw | ema (needs optim.ema_decay > 0)."""

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 1, "checkpoint.every_epochs", self.every_epochs, "use 1 or more")
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use 0 or more")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "use 1 or more")
        _check(bool(self.resume), "checkpoint.resume", self.resume,
               "use auto, never, extend or a checkpoint path")
        for key in ("best_weights", "final_weights"):
            _check(getattr(self, key) in ("raw", "ema"), f"checkpoint.{key}", getattr(self, key),
                   "use raw or ema")


@dataclass
class LogConfig:
    every_steps: int = 20
    """Training loss/lr/throughput every N optimizer steps (a host sync each time)."""
    sinks: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard", "progress"])
    """Where the records go (rank 0), by name: jsonl (<output_dir>/metrics.jsonl),
    tensorboard (<output_dir>/tb), progress (on a terminal a bar for the run and one for
    the epoch; in a log file a line per training record, both with the run's ETA), csv
    (<output_dir>/csv/<split>.csv), mlflow (an MLflow run: MLFLOW_TRACKING_URI), wandb (a
    Weights & Biases run, offline unless WANDB_MODE says otherwise). The registry in
    ffdist/sinks/__init__.py lists them; log.tensorboard / log.progress false leave that
    sink out."""
    progress: bool = True
    """false: no progress output (no bars, no lines), whatever log.sinks says (true adds
    none it leaves out)."""
    experiment: str = ""
    """The MLflow experiment / W&B project the mlflow and wandb sinks log the run under;
    empty: the run's `name` (so the runs of one recipe sit together)."""
    profile_steps: list[int] = field(default_factory=list)
    """[start, end]: rank 0 records a torch.profiler trace of optimizer steps start..end
    (counted from 1, both included) into <output_dir>/profile/ (Chrome trace JSON: Perfetto,
    chrome://tracing, TensorBoard's profiler plugin) and prints the operators that took the
    most time; [] (default): no profiler, nothing in the step."""
    tensorboard: bool = True
    """false: no tensorboard sink, whatever log.sinks says (true adds none it leaves out)."""
    images: bool = True
    """Log a grid of training images once, and the confusion matrix each evaluation."""
    graph: bool = False
    """Log the model graph to TensorBoard (traces the model once)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "log.every_steps", self.every_steps, "use 1 or more")
        twice = sorted({n for n in self.sinks if self.sinks.count(n) > 1})
        _check(not twice, "log.sinks", self.sinks, f"list {', '.join(twice)} once")
        window = self.profile_steps
        _check(not window or (len(window) == 2 and 1 <= window[0] <= window[1]),
               "log.profile_steps", window,
               "give [start, end] optimizer steps with 1 <= start <= end, or [] for none")


MAX_NAME = 200
"""Characters in `name` (it becomes a folder name under runs/)."""


MAX_SEED = 2**31 - 1
"""Seeds are mixed into 64-bit integer hashes (ffdist.data.transforms.sample_seeds) and
torch generators: larger ones overflow there."""


def _plain_name(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME and name not in (".", "..") and name == name.strip()
            and not any(c in name for c in "/\\") and all(c.isprintable() for c in name))


@dataclass
class Recipe:
    name: str = "run"
    """Run name; output_dir defaults to runs/<name>."""
    seed: int = 0
    """Seed of initialization, data order and augmentation."""
    output_dir: str | None = None
    """Run directory (default runs/<name>); on a shared file system for multi-node."""
    precision: str = "auto"
    """fp32 | bf16 | fp16 | auto: on GPUs bf16 (fp16 where the GPU has no bf16), on CPUs
    bf16 with AMX/AVX512-BF16 (else fp32); `accelerate launch --mixed_precision` fills in
    auto. `ffdist plan` shows what it resolves to on the machine."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check(_plain_name(self.name), "name", self.name,
               "use a plain folder name such as digits_lr0.05 (no '/', '\\', '..', blanks at "
               f"either end or control characters, at most {MAX_NAME} characters): it becomes "
               "runs/<name>; use output_dir=PATH to put the run elsewhere")
        _check(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"use an integer from 0 to {MAX_SEED}")
        _check(self.precision in ("fp32", "bf16", "fp16", "auto"), "precision",
               self.precision, "use fp32, bf16, fp16 or auto")
        for name in SECTIONS:
            bad = _non_finite(getattr(self, name), f"{name}.")
            if bad:
                key, value, default = bad
                example = "null" if default is None else default
                raise Invalid(key, value, f"use a finite number, e.g. {key}={example} (the "
                              "default)")
        _check(self.schedule.min_lr <= self.optim.lr, "schedule.min_lr", self.schedule.min_lr,
               f"the final learning rate cannot exceed optim.lr={self.optim.lr}; set "
               f"schedule.min_lr=0 or another value up to {self.optim.lr}")
        for key in ("best_weights", "final_weights"):
            value = getattr(self.checkpoint, key)
            _check(value == "raw" or self.optim.ema_decay > 0, f"checkpoint.{key}", value,
                   "EMA weights need optim.ema_decay > 0; set it or use raw")

    @property
    def run_dir(self) -> Path:
        path = Path(self.output_dir) if self.output_dir else Path("runs") / self.name
        # "." or "..": a folder with no name of its own here; its full path has one
        return path.resolve() if path.name in ("", "..") else path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1} (TensorBoard hparams, config diffs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
