"""Logging sinks: metrics.jsonl, TensorBoard, a progress bar and one console line per
epoch. Only the primary rank (global rank 0) writes; other ranks get a Monitor whose
sinks are off, so callers never branch on rank."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ffdist")


@dataclass(frozen=True)
class Pictures:
    """What TensorBoard is shown beyond numbers (rank 0): the first training batch as the
    model sees it (augmented, denormalized) and the confusion matrix of every evaluation
    (log.images), the model graph traced once (log.graph)."""

    images: bool
    graph: bool
    mean: Sequence[float]     # the data's normalization (0..255 scale), to undo it
    std: Sequence[float]
    classes: Sequence[str]


def setup_logging(is_primary: bool) -> None:
    level = logging.INFO if is_primary else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s ffdist %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop events logged after the checkpoint's step: the resumed run logs them
    again, and the file must hold no duplicated steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if event.get("step", 0) <= after_step and event.get("event") != "end":
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, resume_step: int | None = None,
                 pictures: Pictures | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.pictures = pictures
        self.tb = None
        self.bar = None
        self.progress = progress and enabled and sys.stdout.isatty()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.metrics_path, resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: ~1 s of imports

            # purge_step hides events at or after the resume step left by the killed run.
            self.tb = SummaryWriter(str(self.run_dir / "tb"),
                                    purge_step=resume_step + 1 if resume_step else None)

    # -- events ------------------------------------------------------------------
    def event(self, **fields: Any) -> None:
        if not self.enabled:
            return
        fields.setdefault("time", round(time.time(), 3))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, image, step)

    def graph(self, model: Any, example: Any) -> None:
        """The model graph (traced once on `example`); a model that cannot be traced only
        costs a warning, never the run."""
        if self.tb is None:
            return
        was_training = model.training
        model.eval()  # tracing runs a forward: in train mode it would move BatchNorm stats
        try:
            self.tb.add_graph(model, example)
        except Exception as e:  # tracing fails on data-dependent control flow
            log.warning("log.graph: could not trace the model (%s: %s)", type(e).__name__, e)
        finally:
            model.train(was_training)

    # -- pictures (ffdist.visual draws them) -----------------------------------------
    @property
    def wants_first_batch(self) -> bool:
        """Whether `first_batch` would draw anything (the Trainer asks once)."""
        p = self.pictures
        return self.tb is not None and p is not None and (p.images or p.graph)

    def first_batch(self, x: Any, model: Any, example: Any, step: int) -> None:
        """Once per run: a grid of the normalized batch `x`, and the graph of `model`
        traced on `example` (a couple of inputs, already in the model's dtype)."""
        if not self.wants_first_batch:
            return
        from ffdist.visual import denormalize, image_grid, to_chw

        p = self.pictures
        if p.images:
            grid = image_grid(denormalize(x[:32], p.mean, p.std))
            self.image("train/sample_images", to_chw(grid), step)
        if p.graph:
            self.graph(model, example)

    def confusion(self, confusion: Any, step: int, split: str = "val", title: str = "") -> None:
        """The confusion matrix of an evaluation (rows: true class), as `split`/confusion."""
        if self.tb is None or self.pictures is None or not self.pictures.images:
            return
        from ffdist.visual import confusion_image, to_chw

        picture = confusion_image(confusion, self.pictures.classes, title=title, split=split)
        self.image(f"{split}/confusion", to_chw(picture), step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.tb is not None:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                    for k, v in hparams.items()}
            self.tb.add_hparams(flat, metrics, run_name=".")

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            self.write_line(msg % args if args else msg)

    def write_line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    # -- progress bar --------------------------------------------------------------
    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", leave=False,
                            dynamic_ncols=True)

    def advance(self, postfix: dict[str, Any] | None = None, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
