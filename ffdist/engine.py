"""The Trainer: epochs of optimizer steps, evaluation, checkpoints, logging.

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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ffdist import checkpoint as ckpt_io
from ffdist import faults
from ffdist.checkpoint import CheckpointManager
from ffdist.data import DevicePrefetcher, Loaders
from ffdist.dist import DistInfo, all_reduce_sum
from ffdist.errors import NonFiniteLoss
from ffdist.metrics import EvalCounts
from ffdist.monitor import Monitor
from ffdist.optim import lr_at, total_steps
from ffdist.precision import autocast
from ffdist.recipe import Recipe, flatten
from ffdist.strategies import Strategy


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


class Trainer:
    def __init__(self, recipe: Recipe, info: DistInfo, loaders: Loaders, strategy: Strategy,
                 monitor: Monitor, manager: CheckpointManager, precision: str):
        self.recipe, self.info, self.loaders = recipe, info, loaders
        self.strategy, self.monitor, self.manager = strategy, monitor, manager
        self.precision = precision
        self.plan = loaders.plan
        self.steps_per_epoch = loaders.train_sampler.steps_per_epoch
        self.total_steps = total_steps(recipe.schedule, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss(reduction="sum")
        spec = loaders.spec
        channels_last = recipe.model.channels_last
        self.train_batches = DevicePrefetcher(loaders.train, info.device, spec.mean, spec.std,
                                              channels_last)
        self.val_batches = DevicePrefetcher(loaders.val, info.device, spec.mean, spec.std,
                                            channels_last)
        self.progress = Progress()
        self._pictures_pending = monitor.tb is not None  # sample grid (+ graph) once
        # stop_requested is set on THIS rank by ffdist.signals; `_stop` is what all ranks
        # agreed on at the last step boundary. Control flow only ever reads `_stop`, else a
        # rank that got the signal would leave a collective its peers are still in.
        self.stop_requested = False
        self._stop = False
        self._saved_step = -1

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        rng = [ckpt_io.rng_state()]
        if tdist.is_initialized():  # every rank's RNG, so each resumes its own stream
            # sync point: a collective, once per checkpoint (not per step)
            rng = [None] * self.info.world_size
            tdist.all_gather_object(rng, ckpt_io.rng_state())
        p = self.progress
        return {**self.strategy.state_dict(), "epoch": p.epoch, "step": p.step,
                "step_in_epoch": p.step_in_epoch, "best_top1": p.best_top1, "rng": rng,
                "skipped_steps": p.skipped_steps, "bad_in_a_row": p.bad_in_a_row,
                "world_size": self.info.world_size, "recipe": self.recipe.to_dict(),
                "classes": list(self.loaders.spec.classes)}

    def save(self, is_best: bool = False) -> None:
        shards = self.strategy if self.strategy.sharded else None  # ZeRO: every rank writes
        self.manager.save(self.state(), self.progress.step, is_best=is_best, shards=shards)
        self._saved_step = self.progress.step

    def restore(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)
        self.progress = Progress(state["epoch"], state["step"], state["step_in_epoch"],
                                 state.get("best_top1", -1.0),
                                 skipped_steps=state.get("skipped_steps", 0),
                                 bad_in_a_row=state.get("bad_in_a_row", 0))
        self._saved_step = state["step"]
        rng = state.get("rng") or []
        if len(rng) == self.info.world_size:
            ckpt_io.set_rng_state(rng[self.info.rank])
        else:  # another world size: a fresh but deterministic stream per rank
            torch.manual_seed(self.recipe.seed + 1000 * self.info.rank + state["step"])

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
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
        return self._finish(time.perf_counter() - started)

    def train_epoch(self) -> None:
        p = self.progress
        sampler = self.loaders.train_sampler
        sampler.set_epoch(p.epoch, skip_steps=p.step_in_epoch)
        self.strategy.model.train()
        self.monitor.start_epoch(p.epoch, self.steps_per_epoch, p.step_in_epoch)
        batches = iter(self.train_batches)
        window = _Window(self.info.device)
        while p.step_in_epoch < self.steps_per_epoch and p.step < self.total_steps:
            lr = lr_at(p.step, self.recipe.optim.lr, self.recipe.schedule, self.steps_per_epoch)
            self._optimizer_step(batches, lr, window)
            p.step += 1
            p.step_in_epoch += 1
            self.monitor.advance()
            if p.step % self.recipe.log.every_steps == 0:
                self._log_train(window, lr)
            if self.recipe.checkpoint.every_steps and p.step % self.recipe.checkpoint.every_steps == 0:
                self.save()
            faults.after_step(p.step, self.info.rank)
            if self._stop:
                break
        if window.steps:
            self._log_train(window, lr)
        self.monitor.end_epoch()

    def _optimizer_step(self, batches: Any, lr: float, window: _Window) -> None:
        """One optimizer step (accum micro-steps); its only host sync is the flag read at
        the end (see `_sync_flags`). `ffdist bench` times this very method."""
        started = time.perf_counter()
        accum = self.plan.accum
        step_loss = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            window.data_wait += time.perf_counter() - t0
            if self._pictures_pending:
                self._log_first_batch(x)
            last = micro == accum - 1
            with self.strategy.no_sync(boundary=last):
                with autocast(self.precision, self.info.device):
                    loss = self.criterion(self.strategy.model(x), y) / accum
                loss = faults.poison_loss(loss, self.progress.step + 1, self.info.rank)
                step_loss += loss.detach().float()
                if last:  # the flags travel while backward computes (and DDP all-reduces)
                    flags = self._start_flags(step_loss)
                self.strategy.backward(loss)
        if self._sync_flags(flags):
            self.strategy.step(lr)
            window.loss_sum += step_loss
            window.loss_steps += 1
        else:
            self._skip_step()
        window.steps += 1
        window.images += self.plan.global_batch
        window.step_time += time.perf_counter() - started

    def _start_flags(self, step_loss: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start ONE asynchronous all-reduce of two numbers: (this rank's loss is not
        finite, this rank was asked to stop). Issued after the last forward and before its
        backward, in the same order on every rank, so it overlaps the backward pass."""
        flags = torch.zeros(2, device=self.info.device)
        flags[0] = (~torch.isfinite(step_loss)).float()
        flags[1] = float(self.stop_requested)
        work = tdist.all_reduce(flags, async_op=True) if tdist.is_initialized() else None
        return flags, work

    def _sync_flags(self, pending: tuple[torch.Tensor, Any]) -> bool:
        """Wait for the flags and read them once (a host sync point, every step: the
        optimizer step must not run on NaN gradients). Returns whether to apply the step."""
        flags, work = pending
        if work is not None:
            work.wait()
        bad_ranks, stopping = flags.tolist()
        self._stop = self._stop or stopping > 0
        p = self.progress
        if not bad_ranks:
            p.bad_in_a_row = 0
            return True
        step, sched = p.step + 1, self.recipe.schedule
        where = f"on {int(bad_ranks)} of {self.info.world_size} ranks"
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
        return False

    def _skip_step(self) -> None:
        skip = getattr(self.strategy, "skip_step", None)  # a strategy may need its own
        if skip is not None:
            skip()
        else:
            self.strategy.optimizer.zero_grad(set_to_none=True)

    def _log_train(self, window: _Window, lr: float) -> None:
        loss_sum = all_reduce_sum(window.loss_sum.clone())  # sync point: once per interval
        p = self.progress
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
    @torch.no_grad()
    def evaluate(self) -> bool:
        """Evaluate on every rank's shard; returns whether top-1 is a new best."""
        model = self.strategy.model
        was_training = model.training
        model.eval()
        counts = EvalCounts(self.recipe.model.num_classes, self.info.device)
        for x, y in self.strategy.eval_batches(self.val_batches):
            with autocast(self.precision, self.info.device):
                logits = model(x)
            counts.update(logits.float(), y, self.eval_criterion(logits.float(), y))
        result = counts.reduce()  # sync point: one all-reduce + read per evaluation
        model.train(was_training)
        p = self.progress
        self._log_confusion(counts.confusion, p.step)
        p.last_eval = {**result, "confusion": counts.confusion.cpu()}
        is_best = result["top1"] > p.best_top1
        p.best_top1 = max(p.best_top1, result["top1"])
        self.monitor.event(split="val", epoch=p.epoch, step=p.step,
                           world_size=self.info.world_size, **result)
        self.monitor.scalars("val", result, p.step)
        self.monitor.info("epoch %d step %d  val loss %.4f  top1 %.4f  top5 %.4f  (n=%d)",
                          p.epoch, p.step, result["loss"], result["top1"], result["top5"],
                          result["n"])
        return is_best

    def _finish(self, seconds: float) -> dict[str, Any]:
        p = self.progress
        end = {"best_top1": p.best_top1, "final_top1": p.last_eval["top1"],
               "seconds": round(seconds, 3), "world_size": self.info.world_size, "step": p.step}
        model_state = self.strategy.model_state_dict()  # collective under ZeRO
        if self.info.is_primary:
            ckpt_io.save_torch(self.monitor.run_dir / "model.pt", model_state)
        self.monitor.event(event="end", **end)
        self.monitor.hparams(flatten(self.recipe.to_dict()),
                             {"hparam/best_top1": p.best_top1, "hparam/final_top1": end["final_top1"],
                              "hparam/final_loss": p.last_eval["loss"]})
        return end

    # ------------------------------------------------------------------ TensorBoard pictures
    def _log_first_batch(self, x: torch.Tensor) -> None:
        """Once per run (rank 0): what the model really sees (augmented, denormalized), and
        optionally the graph, traced on that batch."""
        from ffdist.visual import denormalize, image_grid, to_chw

        self._pictures_pending = False
        spec = self.loaders.spec
        if self.recipe.log.images:
            grid = image_grid(denormalize(x[:32], spec.mean, spec.std))
            self.monitor.image("train/sample_images", to_chw(grid), self.progress.step)
        if self.recipe.log.graph:
            self.monitor.graph(self.strategy.unwrap(), x[:2])

    def _log_confusion(self, confusion: torch.Tensor, step: int) -> None:
        if self.monitor.tb is None or not self.recipe.log.images:
            return
        from ffdist.visual import confusion_image, to_chw

        picture = confusion_image(confusion, self.loaders.spec.classes,
                                  title=f"{self.recipe.name}, step {step}", split="val")
        self.monitor.image("val/confusion", to_chw(picture), step)



class _Window:
    """Training statistics between two log lines, kept on the device where possible."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.images, self.loss_steps = 0, 0, 0
        self.data_wait = self.step_time = 0.0
