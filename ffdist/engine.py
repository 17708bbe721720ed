"""The Trainer: epochs of optimizer steps, evaluation, checkpoints, logging; and the one
eval loop (`evaluate_model`), shared with `ffdist eval`.

The Trainer only trains: it is assembled by ffdist.assemble.build_trainer, its strategy
owns the numerics (autocast, input casting, backward, step and skip, state), its Monitor
draws the pictures, and ffdist.train writes model.pt and the end of the run.

Host-device sync points are deliberate and few, each marked "sync point" where it happens:
one two-number all-reduce + read per optimizer step (the NaN/Inf flag and the stop flag,
see `_start_flags`, overlapped with the backward pass), one read per logging interval
(log.every_steps), one all-reduce per evaluation, the RNG all-gather when a checkpoint is
written, and fp16's GradScaler (free with the fused CUDA optimizers ffdist.optim builds;
see strategies/single.py). Everything else (loss sums, hit counts) stays on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn

from ffdist import checkpoint as ckpt_io
from ffdist import faults
from ffdist.checkpoint import CheckpointManager
from ffdist.ckpt_format import Checkpoint
from ffdist.data import DevicePrefetcher, Loaders
from ffdist.dist import DistInfo, all_reduce_sum
from ffdist.errors import NonFiniteLoss
from ffdist.metrics import EvalCounts
from ffdist.monitor import Monitor
from ffdist.optim import lr_at, total_steps
from ffdist.precision import Numerics
from ffdist.recipe import Recipe
from ffdist.strategies import Strategy

if TYPE_CHECKING:
    from ffdist.assemble import Resolved

Batch = tuple[torch.Tensor, torch.Tensor]


def forward(model: nn.Module, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """Logits of a batch in the run's numerics (a Strategy, or precision.Autocast)."""
    with numerics.autocast():
        return model(numerics.cast_inputs(x))


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Iterable[Batch], num_classes: int,
                   device: torch.device, numerics: Numerics) -> tuple[dict[str, Any], torch.Tensor]:
    """THE eval loop: metrics over every rank's shard (one all-reduce: a sync point) and the
    global confusion matrix (CPU). Any model: the Trainer's, `ffdist eval`'s, an EMA copy."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    counts = EvalCounts(num_classes, device)
    was_training = model.training
    model.eval()
    for x, y in batches:
        logits = forward(model, x, numerics).float()
        counts.update(logits, y, criterion(logits, y))
    result = counts.reduce()
    model.train(was_training)
    return result, counts.confusion.cpu()


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0            # epoch in progress (or the next one, after an epoch ends)
    step: int = 0             # optimizer steps done in total
    step_in_epoch: int = 0    # optimizer steps done in `epoch`
    best_top1: float = -1.0
    last_eval: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0    # non-finite steps skipped (nan_policy=skip), in total
    bad_in_a_row: int = 0     # ... consecutively, up to now


@dataclass
class StepStats:
    """One optimizer step as `Trainer.train_step` saw it (no host sync to make one)."""

    loss: torch.Tensor        # the step's loss (mean over its micro-steps), on the device
    applied: bool             # False: non-finite, the update was skipped
    seconds: float            # host wall time of the step (device work may still run)
    data_wait: float          # of which, waiting for batches


class StatsWindow:
    """Training statistics between two log lines, kept on the device where possible."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.images, self.loss_steps = 0, 0, 0
        self.data_wait = self.step_time = 0.0

    def add(self, stats: StepStats, images: int) -> None:
        if stats.applied:  # a skipped step's loss is NaN: it would poison the mean
            self.loss_sum += stats.loss
            self.loss_steps += 1
        self.steps += 1
        self.images += images
        self.step_time += stats.seconds
        self.data_wait += stats.data_wait


class Trainer:
    def __init__(self, recipe: Recipe, info: DistInfo, resolved: Resolved, loaders: Loaders,
                 strategy: Strategy, monitor: Monitor, manager: CheckpointManager):
        self.recipe, self.info, self.resolved, self.loaders = recipe, info, resolved, loaders
        self.strategy, self.monitor, self.manager = strategy, monitor, manager
        self.plan = resolved.plan
        self.steps_per_epoch = loaders.train_sampler.steps_per_epoch
        self.total_steps = total_steps(recipe.schedule, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
        spec, channels_last = loaders.spec, recipe.model.channels_last
        self.train_batches = DevicePrefetcher(loaders.train, info.device, spec.mean, spec.std,
                                              channels_last)
        self.val_batches = DevicePrefetcher(loaders.val, info.device, spec.mean, spec.std,
                                            channels_last)
        self.progress = Progress()
        self.window = StatsWindow(info.device)
        self._first_batch_pending = monitor.wants_first_batch  # pictures, once per run
        # stop_requested is set on THIS rank by ffdist.signals; `_stop` is what all ranks
        # agreed on at the last step boundary. Control flow only ever reads `_stop`, else a
        # rank that got the signal would leave a collective its peers are still in.
        self.stop_requested = False
        self._stop = False
        self._saved_step = -1

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        """This moment as a Checkpoint (a collective: every rank's RNG is gathered)."""
        rng = [ckpt_io.rng_state()]
        if tdist.is_initialized():  # every rank's RNG, so each resumes its own stream
            # sync point: a collective, once per checkpoint (not per step)
            rng = [None] * self.info.world_size
            tdist.all_gather_object(rng, ckpt_io.rng_state())
        p, deepspeed = self.progress, self.resolved.strategy == "deepspeed"
        return Checkpoint(
            step=p.step, epoch=p.epoch, step_in_epoch=p.step_in_epoch,
            world_size=self.info.world_size, strategy=self.resolved.strategy,
            recipe=self.recipe.to_dict(), classes=list(self.loaders.spec.classes),
            best_top1=p.best_top1, skipped_steps=p.skipped_steps, bad_in_a_row=p.bad_in_a_row,
            zero_stage=self.recipe.strategy.zero_stage if deepspeed else None, rng=rng,
            **self.strategy.state_dict())

    def save(self, is_best: bool = False) -> None:
        self.manager.save(self.checkpoint(), self.strategy, is_best=is_best)
        self._saved_step = self.progress.step

    def restore(self, ckpt: Checkpoint) -> None:
        self.manager.restore(ckpt, self.strategy)
        self.progress = Progress(ckpt.epoch, ckpt.step, ckpt.step_in_epoch, ckpt.best_top1,
                                 skipped_steps=ckpt.skipped_steps, bad_in_a_row=ckpt.bad_in_a_row)
        self._saved_step = ckpt.step
        if len(ckpt.rng) == self.info.world_size:
            ckpt_io.set_rng_state(ckpt.rng[self.info.rank])
        else:  # another world size: a fresh but deterministic stream per rank
            torch.manual_seed(self.recipe.seed + 1000 * self.info.rank + ckpt.step)

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.recipe.optim.lr, self.recipe.schedule, self.steps_per_epoch)

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (or a stop request); the summary of the run."""
        started = time.perf_counter()
        p, sched = self.progress, self.recipe.schedule
        if sched.evaluate_before_train and p.step == 0:
            self.evaluate()
        while p.step < self.total_steps and p.epoch < sched.epochs and not self._stop:
            self.train_epoch()
            if self._stop:
                break
            finished = p.step >= self.total_steps or p.epoch + 1 >= sched.epochs
            is_best = False
            if finished or (p.epoch + 1) % sched.eval_every_epochs == 0:
                is_best = self.evaluate()
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
            if finished or p.epoch % self.recipe.checkpoint.every_epochs == 0:
                self.save(is_best)
        if self._stop:  # preempted: the caller exits with EXIT_PREEMPTED
            if self._saved_step != p.step:
                self.save()
            self.monitor.info("stopped at step %d on request; checkpoint written, start the "
                              "same command again to resume", p.step)
            return {"stopped": True, "step": p.step}
        if not p.last_eval:  # resumed a run whose last checkpoint came after its last eval
            self.evaluate()
        return {"best_top1": p.best_top1, "final_top1": p.last_eval["top1"],
                "seconds": round(time.perf_counter() - started, 3),
                "world_size": self.info.world_size, "step": p.step}

    def train_epoch(self) -> None:
        p = self.progress
        self.loaders.train_sampler.set_epoch(p.epoch, skip_steps=p.step_in_epoch)
        self.strategy.model.train()
        self.monitor.start_epoch(p.epoch, self.steps_per_epoch, p.step_in_epoch)
        batches = iter(self.train_batches)
        self.window.reset()
        while p.step_in_epoch < self.steps_per_epoch and p.step < self.total_steps:
            lr = self.lr_at(p.step)
            self.window.add(self.train_step(batches, lr), self.plan.global_batch)
            p.step += 1
            p.step_in_epoch += 1
            self.monitor.advance()
            if p.step % self.recipe.log.every_steps == 0:
                self._log_train(lr)
            if self.recipe.checkpoint.every_steps and p.step % self.recipe.checkpoint.every_steps == 0:
                self.save()
            faults.after_step(p.step, self.info.rank)
            if self._stop:
                break
        if self.window.steps:
            self._log_train(lr)
        self.monitor.end_epoch()

    def train_step(self, batches: Iterator[Batch], lr: float) -> StepStats:
        """One optimizer step (plan.accum micro-steps) at `lr`, applied or skipped; its only
        host sync is the flag read at the end (`_apply_flags`). `ffdist bench` times it."""
        started = time.perf_counter()
        accum, wait = self.plan.accum, 0.0
        step_loss = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t0
            if self._first_batch_pending:
                self._first_batch_pending = False
                self.monitor.first_batch(x, self.strategy.unwrap(),
                                         self.strategy.cast_inputs(x[:2]), self.progress.step)
            last = micro == accum - 1
            with self.strategy.no_sync(boundary=last):
                logits = forward(self.strategy.model, x, self.strategy)
                loss = self.criterion(logits.float(), y) / accum  # the loss in fp32
                loss = faults.poison_loss(loss, self.progress.step + 1, self.info.rank)
                step_loss += loss.detach()
                if last:  # the flags travel while backward computes (and DDP all-reduces)
                    flags = self._start_flags(step_loss)
                self.strategy.backward(loss)
        applied = self._apply_flags(flags)
        if applied:
            self.strategy.step(lr)
        else:
            self.strategy.skip_step()
        return StepStats(step_loss, applied, time.perf_counter() - started, wait)

    def _start_flags(self, step_loss: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start ONE asynchronous all-reduce of two numbers: (this rank's loss is not
        finite, this rank was asked to stop). Issued after the last forward and before its
        backward, in the same order on every rank, so it overlaps the backward pass."""
        flags = torch.zeros(2, device=self.info.device)
        flags[0] = (~torch.isfinite(step_loss)).float()
        flags[1] = float(self.stop_requested)
        work = tdist.all_reduce(flags, async_op=True) if tdist.is_initialized() else None
        return flags, work

    def _apply_flags(self, pending: tuple[torch.Tensor, Any]) -> bool:
        """Wait for the flags and read them once (a host sync point, every step: the
        optimizer step must not run on NaN gradients). Returns whether to apply the step."""
        flags, work = pending
        if work is not None:
            work.wait()
        bad_ranks, stopping = flags.tolist()
        self._stop = self._stop or stopping > 0
        if not bad_ranks:
            self.progress.bad_in_a_row = 0
            return True
        self._non_finite(int(bad_ranks))
        return False

    def _non_finite(self, bad_ranks: int) -> None:
        """nan_policy: stop now (NonFiniteLoss), or count the skip (and stop after
        max_bad_steps in a row)."""
        p, sched = self.progress, self.recipe.schedule
        step = p.step + 1
        where = f"on {bad_ranks} of {self.info.world_size} ranks"
        last = (f"the last checkpoint, step {self._saved_step}, is kept"
                if self._saved_step >= 0 else "no checkpoint was written yet")
        if sched.nan_policy == "stop":
            raise NonFiniteLoss(f"training loss is NaN/Inf at step {step} ({where}, "
                                f"schedule.nan_policy=stop); {last}; lower optim.lr, set "
                                "optim.grad_clip, or use schedule.nan_policy=skip.")
        p.skipped_steps += 1
        p.bad_in_a_row += 1
        self.monitor.info("step %d: loss is NaN/Inf %s; optimizer step skipped (%d in a row, "
                          "%d in total)", step, where, p.bad_in_a_row, p.skipped_steps)
        if p.bad_in_a_row >= sched.max_bad_steps:
            raise NonFiniteLoss(f"training loss is NaN/Inf for {p.bad_in_a_row} steps in a row "
                                f"up to step {step} (schedule.max_bad_steps="
                                f"{sched.max_bad_steps}); {last}; lower optim.lr or set "
                                "optim.grad_clip.")

    def _log_train(self, lr: float) -> None:
        window, p = self.window, self.progress
        loss_sum = all_reduce_sum(window.loss_sum.clone())  # sync point: once per interval
        # all steps of the window skipped (NaN) -> nan, not a made-up 0
        loss = loss_sum.item() / (window.loss_steps * self.info.world_size) \
            if window.loss_steps else float("nan")
        ips = window.images / max(window.step_time, 1e-9)
        wait = window.data_wait / max(window.step_time, 1e-9)
        record = {"loss": loss, "lr": lr, "images_per_s": ips, "data_wait_fraction": wait,
                  "step_ms": 1000 * window.step_time / window.steps}
        if p.skipped_steps:
            record["skipped_steps"] = p.skipped_steps
        self.monitor.event(split="train", epoch=p.epoch, step=p.step,
                           world_size=self.info.world_size, **record)
        self.monitor.scalars("train", record, p.step)
        self.monitor.advance({"loss": f"{loss:.4f}", "lr": f"{lr:.3g}"}, n=0)
        if not math.isfinite(loss):
            self.monitor.info("step %d: training loss is %s", p.step, loss)
        window.reset()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> bool:
        """Evaluate on every rank's shard; returns whether top-1 is a new best."""
        result, confusion = evaluate_model(
            self.strategy.model, self.strategy.eval_batches(self.val_batches),
            self.recipe.model.num_classes, self.info.device, self.strategy)
        p = self.progress
        self.monitor.confusion(confusion, p.step, title=f"{self.recipe.name}, step {p.step}")
        p.last_eval = {**result, "confusion": confusion}
        is_best = result["top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, result["top1"])
        self.monitor.event(split="val", epoch=p.epoch, step=p.step,
                           world_size=self.info.world_size, **result)
        self.monitor.scalars("val", result, p.step)
        self.monitor.info("epoch %d step %d  val loss %.4f  top1 %.4f  top5 %.4f  (n=%d)",
                          p.epoch, p.step, result["loss"], result["top1"], result["top5"],
                          result["n"])
        return is_best
