"""The Trainer: epochs of optimizer steps, evaluation, checkpoints, logging; and the one
eval loop (`evaluate_model`), shared with `ffdist eval`.

The Trainer only trains: it is assembled by ffdist.assemble.build_trainer, its strategy
owns the numerics (autocast, input casting, backward, step and skip, state), its Monitor
sends each record once to the run's log sinks and draws the pictures, and ffdist.train
writes model.pt and the end of the run.

Host-device sync points. The steady-state step has none of its own: NaN/Inf decides the
skip on the device (ffdist.step_flags + ffdist.optim.step_unless), and the host reads a
step's flags one step late, after the next step is queued. THE list (docs/performance.md
repeats it); each is marked "sync point" where it happens:

1. the flags of step k, read after step k+1 is queued (`_settle(lag=1)`, an event wait
   behind step k's flag copy: it never starves the GPU of queued work);
2. one read per log line (log.every_steps: the loss sum, and all pending flags);
3. one all-reduce + read per evaluation (ffdist.metrics.EvalCounts.reduce);
4. the RNG all-gather and the state copies when a checkpoint is written (and the
   pending flags read first, so the checkpoint's skip counts are exact);
5. the end of an epoch (pending flags read: a stop request acts before evaluation);
6. DeepSpeed: the flags of the current step, read before its step (`_settle(lag=0)`):
   its engine decides fp16 overflow on the host anyway (strategies/deepspeed.py);
7. optimizers without a fused kernel on the device (none on CUDA or the CPU; FSDP's SGD,
   foreach on DTensors): their skip is decided on the host (ffdist.optim.step_unless);
8. the first step: lazy initialisation (cuDNN autotuning, compile, GradScaler's scale).
Loss sums, hit counts, GradScaler's scale update and the skip itself stay on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as tdist
from torch import nn

from ffdist import checkpoint as ckpt_io
from ffdist import ema as ema_mod
from ffdist import mixup
from ffdist.checkpoint import CheckpointManager
from ffdist.ckpt_format import BEST, TOTALS, WEIGHTS, WINDOW, Checkpoint
from ffdist.data import DevicePrefetcher, Streams
from ffdist.dist import DistInfo, all_reduce_sum
from ffdist.errors import NonFiniteLoss
from ffdist.metrics import EvalCounts
from ffdist.monitor import Monitor
from ffdist.not_learning import Watch
from ffdist.optim import lr_at, total_steps
from ffdist.precision import Numerics
from ffdist.recipe import Recipe
from ffdist.step_flags import Flags, StepFlags
from ffdist.strategies import Strategy

if TYPE_CHECKING:
    from ffdist.profiling import StepWindow
    from ffdist.resolved import Resolved

Batch = tuple[torch.Tensor, torch.Tensor]
SPLITS = {"raw": "val", "ema": "val_ema"}
"""The split each kind of weights (checkpoint.best_weights / final_weights) is logged as."""


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
    last_eval: dict[str, Any] = field(default_factory=dict)  # of checkpoint.final_weights
    last_top1: dict[str, float] = field(default_factory=dict)  # raw (and ema): last top-1
    skipped_steps: int = 0    # non-finite steps skipped (nan_policy=skip), in total
    bad_in_a_row: int = 0     # ... consecutively, up to now
    best: dict[str, Any] = field(default_factory=dict)  # what best.pt holds (its section)
    # Totals over the run's segments (a segment: one process; a resume starts the next).
    # Time after a killed segment's last checkpoint is not counted: that work is redone.
    seconds_before: float = 0.0  # training time of the earlier segments
    images: int = 0           # training images in total (global batches of the steps done)
    segments: int = 1         # this segment's number


@dataclass
class StepStats:
    """One optimizer step as `Trainer.train_step` saw it (no host sync to make one)."""

    loss: torch.Tensor        # the step's loss (mean over its micro-steps), on the device
    applied: torch.Tensor     # 0-dim float32 on the device: 1.0 the optimizer update was
    #                           applied, 0.0 skipped (non-finite loss on a rank, or an fp16
    #                           overflow). Multiply by it, never `if` it (a host sync).
    loss_finite: torch.Tensor  # 0-dim bool on the device: finite on every rank (counts
    #                            in the logged mean)
    seconds: float            # host wall time of the step (device work may still run)
    data_wait: float          # of which, waiting for batches


class StepHooks(Protocol):
    """What a test may install as `Trainer.hooks` (ffdist.faults does, when FFDIST_FAULT is
    set); with none installed the step calls nothing."""

    def loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor: ...

    def after_step(self, step: int, rank: int) -> None: ...


class StatsWindow:
    """Training statistics between two log lines, kept on the device where possible."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def state(self) -> dict[str, Any]:
        """This rank's partial window, plain (a sync point: the sums come to the host)."""
        return {"loss": self.loss.tolist(), "steps": self.steps, "images": self.images,
                "step_time": self.step_time, "data_wait": self.data_wait}

    def load(self, state: dict[str, Any]) -> None:
        """A partial window back from a checkpoint: the same float32 sums, bit for bit."""
        self.loss = torch.tensor(state["loss"], dtype=torch.float32, device=self.device)
        self.steps, self.images = int(state["steps"]), int(state["images"])
        self.step_time, self.data_wait = float(state["step_time"]), float(state["data_wait"])

    def reset(self) -> None:
        # [sum of finite losses, how many]: on the device, read once per log line
        self.loss = torch.zeros(2, device=self.device)
        self.steps, self.images = 0, 0
        self.data_wait = self.step_time = 0.0

    def add(self, stats: StepStats, images: int) -> None:
        # a non-finite loss would poison the mean: masked on the device, not tested on the host
        finite = stats.loss_finite
        self.loss[0] += torch.where(finite, stats.loss, 0.0)
        self.loss[1] += finite
        self.steps += 1
        self.images += images
        self.step_time += stats.seconds
        self.data_wait += stats.data_wait


class Trainer:
    def __init__(self, recipe: Recipe, info: DistInfo, resolved: Resolved, data: Streams,
                 strategy: Strategy, monitor: Monitor, manager: CheckpointManager):
        self.recipe, self.info, self.resolved, self.data = recipe, info, resolved, data
        self.strategy, self.monitor, self.manager = strategy, monitor, manager
        self.plan = resolved.plan
        self.steps_per_epoch = data.train.steps_per_epoch
        self.total_steps = total_steps(recipe.schedule, self.steps_per_epoch)
        # Regularization (docs/regularization.md): mixup/cutmix of each micro-batch with
        # its soft-target loss, and the EMA of the weights, updated after each step.
        self.criterion = mixup.criterion(recipe)
        self.mixer = mixup.for_run(recipe, self.plan, info.rank)
        self.ema = ema_mod.for_run(recipe, strategy, self.steps_per_epoch)
        spec, channels_last = data.spec, recipe.model.channels_last
        self.train_batches = DevicePrefetcher(data.train, info.device, spec.mean, spec.std,
                                              channels_last)
        self.val_batches = DevicePrefetcher(data.eval, info.device, spec.mean, spec.std,
                                            channels_last)
        self.progress = Progress()
        self.window = StatsWindow(info.device)
        # a run that does not learn says so once (from values read anyway: no new sync)
        self.watch = Watch(recipe.model.num_classes, recipe.schedule.stop_if_not_learning,
                           resolved.lr, self.plan.global_batch)
        self.flags = StepFlags(info.device)
        self._first_batch_pending = monitor.wants_first_batch  # pictures, once per run
        # stop_requested is set on THIS rank by ffdist.signals; `_stop` is what all ranks
        # agreed on, from the flags of the last settled step. Control flow only ever reads
        # `_stop`, else a rank that got the signal would leave a collective its peers are
        # still in.
        self.stop_requested = False
        self._stop = False
        self._saved_step = -1
        self.hooks: StepHooks | None = None
        self.profiler: StepWindow | None = None  # log.profile_steps (ffdist.train sets it)
        # when this segment started (time.perf_counter): ffdist.train sets its process start
        self.segment_started = time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        """This moment as a Checkpoint (a collective: every rank's RNG and partial log
        window are gathered)."""
        mine = (ckpt_io.rng_state(), self.window.state())
        ranks = [mine]
        if tdist.is_initialized():  # every rank's, so each resumes its own stream and sums
            # sync point: a collective, once per checkpoint (not per step)
            ranks = [None] * self.info.world_size
            tdist.all_gather_object(ranks, mine)
        p = self.progress
        sections = {**self._sections(), TOTALS: self.totals(),
                    WINDOW: [window for _, window in ranks]}
        return Checkpoint(
            step=p.step, epoch=p.epoch, step_in_epoch=p.step_in_epoch,
            layout=self.strategy.layout(self.recipe, self.resolved),
            recipe=self.recipe.to_dict(), classes=list(self.data.spec.classes),
            best_top1=p.best_top1, skipped_steps=p.skipped_steps, bad_in_a_row=p.bad_in_a_row,
            rng=[rng for rng, _ in ranks], sections=sections, **self.strategy.state_dict())

    def _sections(self) -> dict[str, Any]:
        """The checkpoint's optional sections: the data stream's state (its position is the
        checkpoint's epoch/step_in_epoch), and the EMA of the weights."""
        sections = {"data": self.data.train.state_dict()}
        if self.ema is not None:
            sections["ema"] = self.ema.state_dict()
        return sections

    def totals(self) -> dict[str, Any]:
        """The run's training time and images over all its segments, up to now."""
        p = self.progress
        now = time.perf_counter() - self.segment_started
        return {"seconds": round(p.seconds_before + now, 3), "images": p.images,
                "segments": p.segments}

    def save_best(self, split: str, result: dict[str, Any]) -> None:
        """best.pt: the weights just evaluated as `split`, a new best (checkpoint.keep_best).
        Every layout writes the same file: the consolidated weights (a collective under
        sharded layouts: every rank calls it) and their EMA, no optimizer, no RNG."""
        if not self.recipe.checkpoint.keep_best:
            return
        weights = self.strategy.model_state_dict()
        ema = None
        if self.ema is not None and (self.info.is_primary or self.ema.collective):
            ema = self.ema.state_dict()
        p = self.progress
        p.best = {"step": p.step, "epoch": p.epoch, "split": split,
                  "weights": self.recipe.checkpoint.best_weights, "metric": "top1",
                  "value": result["top1"], "n": result["n"]}
        if not self.info.is_primary:
            return
        sections: dict[str, Any] = {BEST: dict(p.best)}
        if ema is not None:
            sections["ema"] = ema
        self.manager.save_best(Checkpoint(
            step=p.step, epoch=p.epoch, step_in_epoch=p.step_in_epoch,
            layout=self.strategy.layout(self.recipe, self.resolved),
            recipe=self.recipe.to_dict(), classes=list(self.data.spec.classes),
            kind=WEIGHTS, best_top1=result["top1"], skipped_steps=p.skipped_steps,
            model=ckpt_io.cpu_state(weights), sections=sections))

    def save(self) -> None:
        self.settle_flags()  # the checkpoint's skip counts include every step it holds
        self.manager.save(self.checkpoint(), self.strategy)
        self._saved_step = self.progress.step

    def restore(self, ckpt: Checkpoint) -> None:
        self.manager.restore(ckpt, self.strategy)
        self.progress = Progress(ckpt.epoch, ckpt.step, ckpt.step_in_epoch, ckpt.best_top1,
                                 skipped_steps=ckpt.skipped_steps, bad_in_a_row=ckpt.bad_in_a_row)
        self._saved_step = ckpt.step
        self._restore_totals(ckpt)
        self._restore_best()
        if "data" in ckpt.sections:  # the position comes back through set_epoch
            self.data.train.load_state_dict(ckpt.sections["data"])
        if self.ema is not None and not self.ema.restore(ckpt.sections.get("ema"),
                                                         self.strategy.unwrap()):
            self.monitor.info("the checkpoint of step %d has no EMA of the weights; the EMA "
                              "starts again from its weights", ckpt.step)
        if len(ckpt.rng) == self.info.world_size:
            ckpt_io.set_rng_state(ckpt.rng[self.info.rank])
        else:  # another world size: a fresh but deterministic stream per rank
            torch.manual_seed(self.recipe.seed + 1000 * self.info.rank + ckpt.step)

    def _restore_totals(self, ckpt: Checkpoint) -> None:
        """The run's totals and this rank's partial log window, from the checkpoint. One
        written before they were kept: its images follow from its steps, its time is unknown
        (counted as 0) and it was at least one segment."""
        p, totals = self.progress, ckpt.sections.get(TOTALS) or {}
        p.seconds_before = float(totals.get("seconds", 0.0))
        p.images = int(totals.get("images", ckpt.step * self.plan.global_batch))
        p.segments = int(totals.get("segments", 1)) + 1
        windows = ckpt.sections.get(WINDOW) or []
        if len(windows) == self.info.world_size:
            self.window.load(windows[self.info.rank])
        elif windows:  # another world size: rank 0 holds the sums, every rank the counters
            sums = [sum(w["loss"][i] for w in windows) for i in (0, 1)]
            self.window.load(dict(windows[0], loss=sums if self.info.is_primary else [0.0, 0.0]))

    def _restore_best(self) -> None:
        """The bar a new best must pass: also best.pt's own value when it is of the weights
        this run picks by (an evaluation after the checkpoint may have written it, and a
        replay of it need not give the same number: another world size, GPU kernels)."""
        best = self.manager.best_so_far()
        if best and best.get("weights") == self.recipe.checkpoint.best_weights:
            self.progress.best = best
            self.progress.best_top1 = max(self.progress.best_top1, float(best["value"]))

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.resolved.lr, self.recipe.schedule, self.steps_per_epoch)

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
            if finished or (p.epoch + 1) % sched.eval_every_epochs == 0:
                self.evaluate()
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
            if finished or p.epoch % self.recipe.checkpoint.every_epochs == 0:
                self.save()
        if self._stop:  # preempted: the caller exits with EXIT_PREEMPTED
            if self._saved_step != p.step:
                self.save()
            self.monitor.info("stopped at step %d on request; checkpoint written, start the "
                              "same command again to resume", p.step)
            return {"stopped": True, "step": p.step}
        if not p.last_eval:  # resumed a run whose last checkpoint came after its last eval
            self.evaluate()
        by_weights = {f"final_top1_{k}": v for k, v in p.last_top1.items()} if self.ema else {}
        best = {"best_step": p.best["step"]} if p.best else {}
        totals = self.totals()
        return {"best_top1": p.best_top1, **best, "final_top1": p.last_eval["top1"],
                **by_weights, "seconds": totals["seconds"], "segments": totals["segments"],
                "images": totals["images"],
                "segment_seconds": round(time.perf_counter() - started, 3),
                "world_size": self.info.world_size, "step": p.step}

    def final_weights(self) -> dict[str, torch.Tensor] | None:
        """What model.pt holds (checkpoint.final_weights): the raw or the EMA weights, plain
        fp32 state dict on rank 0 (None elsewhere). A collective under ZeRO: every rank."""
        if self.ema is not None and self.recipe.checkpoint.final_weights == "ema":
            return self.ema.weights() if self.info.is_primary or self.ema.collective else None
        return self.strategy.model_state_dict()

    def train_epoch(self) -> None:
        p = self.progress
        self.data.train.set_epoch(p.epoch, skip_steps=p.step_in_epoch)
        self.strategy.model.train()
        self.monitor.start_epoch(p.epoch, self.steps_per_epoch, p.step_in_epoch)
        batches = iter(self.train_batches)
        # The log window is NOT reset here: the previous epoch logged and emptied it, and a
        # resumed run's partial window came back from its checkpoint (Trainer.restore).
        while p.step_in_epoch < self.steps_per_epoch and p.step < self.total_steps:
            lr = self.lr_at(p.step)
            self.window.add(self.train_step(batches, lr), self.plan.global_batch)
            p.step += 1
            p.step_in_epoch += 1
            p.images += self.plan.global_batch
            self.monitor.advance()
            if self.profiler is not None:  # starts and stops its recording between steps
                self.profiler.after_step(p.step)
            if p.step % self.recipe.log.every_steps == 0:
                self._log_train()
            if self.recipe.checkpoint.every_steps and p.step % self.recipe.checkpoint.every_steps == 0:
                self.save()
            if self.hooks is not None:
                self.hooks.after_step(p.step, self.info.rank)
            if self._stop:
                break
        self.settle_flags()  # sync point, once per epoch: a stop acts before evaluating
        if self.window.steps and not self._stop:  # a stop saves its partial window instead
            self._log_train()
        self.monitor.end_epoch()

    def train_step(self, batches: Iterator[Batch], lr: float) -> StepStats:
        """One optimizer step (plan.accum micro-steps) at `lr`, applied or skipped on the
        device. The host reads the PREVIOUS step's flags at the end (`_settle(lag=1)`),
        this step's only under DeepSpeed. `ffdist bench` times it."""
        started = time.perf_counter()
        accum, wait = self.plan.accum, 0.0
        step = self.progress.step + 1
        step_loss = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t0
            if self.mixer is not None:  # soft targets from here on (mixup.criterion)
                x, y = self.mixer(x, y, step=self.progress.step, micro=micro)
            if self._first_batch_pending:
                self._first_batch_pending = False
                self.monitor.first_batch(x, self.strategy.unwrap(),
                                         self.strategy.cast_inputs(x[:2]), self.progress.step)
            last = micro == accum - 1
            with self.strategy.no_sync(boundary=last):
                logits = forward(self.strategy.model, x, self.strategy)
                loss = self.criterion(logits.float(), y) / accum  # the loss in fp32
                if self.hooks is not None:
                    loss = self.hooks.loss(loss, step, self.info.rank)
                step_loss += loss.detach()
                if last:  # the flags travel while backward computes (and DDP all-reduces)
                    flags = self.flags.start(step_loss, self.stop_requested)
                self.strategy.backward(loss)
        skip = self.flags.wait(flags)
        self.flags.record(step, flags)
        if self.strategy.skips_on_device:
            applied = self.strategy.step(lr, skip)
            self._settle(lag=1)  # sync point (lagged): step-1's flags, this step queued
        elif self._settle(lag=0)[-1].bad_ranks:  # sync point: DeepSpeed decides on the host
            self.strategy.skip_step()
            applied = torch.zeros((), device=self.info.device)
        else:
            applied = self.strategy.step(lr, skip)
        if self.ema is not None:  # masked by the device flag: no host read (ffdist.ema)
            self.ema.update(self.strategy.unwrap(), step, applied)
        return StepStats(step_loss, applied, skip == 0, time.perf_counter() - started, wait)

    def settle_flags(self) -> None:
        """Read and act on every pending step flag now (a sync point): before a checkpoint,
        a log line, the end of an epoch, or after timing steps (bench)."""
        self._settle(lag=0)

    def _settle(self, lag: int) -> list[Flags]:
        """Act on the flags of every step but the newest `lag`, in step order: the stop
        request, and nan_policy for non-finite steps (their update was already skipped)."""
        read = self.flags.settle(lag)
        for f in read:
            self._stop = self._stop or f.stop
            if f.bad_ranks:
                self._non_finite(f.step, f.bad_ranks)
            else:
                self.progress.bad_in_a_row = 0
        return read

    def _non_finite(self, step: int, bad_ranks: int) -> None:
        """nan_policy for step `step`, whose update was skipped: stop now (NonFiniteLoss),
        or count the skip (and stop after max_bad_steps in a row)."""
        p, sched = self.progress, self.recipe.schedule
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

    def _log_train(self) -> None:
        """The log line of the window's steps; `lr` is its last step's."""
        window, p = self.window, self.progress
        lr = self.lr_at(p.step - 1)
        self.settle_flags()  # the record's skipped_steps is exact; a NaN-stop raises first
        # sync point: once per interval; the sum and count over every rank's finite losses
        loss_sum, loss_steps = all_reduce_sum(window.loss.clone()).tolist()
        # all steps of the window skipped (NaN) -> nan, not a made-up 0
        loss = loss_sum / loss_steps if loss_steps else float("nan")
        ips = window.images / max(window.step_time, 1e-9)
        wait = window.data_wait / max(window.step_time, 1e-9)
        record = {"loss": loss, "lr": lr, "images_per_s": ips, "data_wait_fraction": wait,
                  "step_ms": 1000 * window.step_time / window.steps}
        if p.skipped_steps:
            record["skipped_steps"] = p.skipped_steps
        self.monitor.record({"split": "train", "epoch": p.epoch, "step": p.step,
                             "world_size": self.info.world_size, **record})
        if not math.isfinite(loss):
            self.monitor.info("step %d: training loss is %s", p.step, loss)
        self._say(self.watch.loss(loss, p.step))
        window.reset()

    def _say(self, warning: str | None) -> None:
        if warning:
            self.monitor.info("%s", warning)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> bool:
        """Evaluate on every rank's shard: the raw weights (split val) and, with an EMA, the
        EMA weights (split val_ema). When the top-1 of the weights checkpoint.best_weights
        names is a new best, best.pt gets these weights at once (`save_best`), whatever the
        checkpoint interval. Returns whether it was a new best."""
        p, cfg = self.progress, self.recipe.checkpoint
        results = {"raw": self._evaluate(SPLITS["raw"])}
        if self.ema is not None:
            with self.ema.swapped(self.strategy.unwrap()):  # the raw weights come back exactly
                results["ema"] = self._evaluate(SPLITS["ema"])
        final, confusion = results[cfg.final_weights]
        p.last_eval = {**final, "confusion": confusion}
        p.last_top1 = {k: r["top1"] for k, (r, _) in results.items()}
        best = results[cfg.best_weights][0]
        is_best = best["top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, best["top1"])
        line = "  ".join(f"{SPLITS[k]} loss {r['loss']:.4f}  top1 {r['top1']:.4f}  top5 "
                         f"{r['top5']:.4f}" for k, (r, _) in results.items())
        self.monitor.info("epoch %d step %d  %s  (n=%d)", p.epoch, p.step, line, final["n"])
        if is_best:
            self.save_best(SPLITS[cfg.best_weights], best)
        self._say(self.watch.evaluation(results["raw"][0]["top1"], p.step))
        return is_best

    def _evaluate(self, split: str) -> tuple[dict[str, Any], torch.Tensor]:
        """One evaluation of the weights the model holds now, logged as `split`."""
        result, confusion = evaluate_model(
            self.strategy.model, self.strategy.eval_batches(self.val_batches),
            self.recipe.model.num_classes, self.info.device, self.strategy)
        p = self.progress
        self.monitor.confusion(confusion, p.step, split,
                               title=f"{self.recipe.name}, step {p.step}")
        self.monitor.record({"split": split, "epoch": p.epoch, "step": p.step,
                             "world_size": self.info.world_size, **result})
        return result, confusion
