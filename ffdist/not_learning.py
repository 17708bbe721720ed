"""A run that is not learning says so once, with its likely causes; and stops, exit 2, when
schedule.stop_if_not_learning asks.

Decided on the host from numbers it has already read, never a new sync in the step: the
training loss of each log line (all-reduced there) and each evaluation's top-1 (reduced by
the eval loop), so every rank reaches the same verdict at the same point. Two signs:

- val top-1 at chance: at most `chance_limit(K)` = min(1.5 / K, 1 / K + 0.05) for K classes
  (0.15 for 10 classes, 0.55 for 2, 0.0015 for 1000) at EVALS evaluations in a row of
  trained weights (not the one before training);
- a diverging loss: a logged training loss above FACTOR times the first one logged (a loss
  that is not finite is schedule.nan_policy's business).
"""

from __future__ import annotations

import math

from ffdist.errors import FfdistError

EVALS = 2
"""Evaluations in a row at chance before the run is said not to learn: the first one may
come before a slow start has shown anything."""
FACTOR = 10.0
"""A logged training loss this many times the first one is diverging."""


class NotLearning(FfdistError):
    """schedule.stop_if_not_learning=true and the run is not learning. The values it is
    decided from are the same on every rank, so every rank stops alike."""

    same_on_all_ranks = True


def chance_limit(num_classes: int) -> float:
    """The top-1 at or under which a classifier of `num_classes` classes is at chance."""
    return min(1.5 / num_classes, 1.0 / num_classes + 0.05)


class Watch:
    """Fed by the Trainer with the values it has read; speaks once per run."""

    def __init__(self, num_classes: int, stop: bool, lr: float, batch: int):
        self.num_classes, self.stop, self.lr, self.batch = num_classes, stop, lr, batch
        self.first_loss: float | None = None
        self.at_chance = 0
        self.spoken = False

    def loss(self, loss: float, step: int) -> str | None:
        """A logged training loss; the warning sentence the first time it diverges."""
        if not math.isfinite(loss):
            return None
        if self.first_loss is None:
            self.first_loss = loss
            return None
        if self.first_loss > 0 and loss > FACTOR * self.first_loss:
            return self._verdict(f"the training loss {loss:.4g} at step {step} is more than "
                                 f"{FACTOR:g}x its first logged value {self.first_loss:.4g}")
        return None

    def evaluation(self, top1: float, step: int) -> str | None:
        """An evaluation's top-1 of the trained weights (step > 0)."""
        if step == 0:
            return None
        limit = chance_limit(self.num_classes)
        self.at_chance = self.at_chance + 1 if top1 <= limit else 0
        if self.at_chance < EVALS:
            return None
        return self._verdict(f"val top-1 {top1:.4f} at step {step} is at chance for "
                             f"{self.num_classes} classes (<= {limit:.4g}) for {EVALS} "
                             "evaluations in a row")

    def _verdict(self, sign: str) -> str | None:
        if self.spoken:
            return None
        self.spoken = True
        causes = (f"likely causes: optim.lr too high for the batch (lr {self.lr:.4g} for a "
                  f"global batch of {self.batch}: try 10x lower, or give optim.lr_reference_batch"
                  "), inputs normalized differently from the data, labels that do not match "
                  "the images, or a stem too aggressive for small images "
                  "(model.cifar_stem=auto)")
        if self.stop:
            raise NotLearning(f"this run is not learning: {sign}; {causes}. Stopped "
                              "(schedule.stop_if_not_learning=true); the last checkpoint is "
                              "kept.")
        return (f"warning: this run is not learning: {sign}; {causes}. It goes on; "
                "schedule.stop_if_not_learning=true stops such a run.")
