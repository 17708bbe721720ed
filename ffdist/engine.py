"""The Trainer: epochs of optimizer steps, evaluation, checkpoints, logging.

Host-device sync points are deliberate and few: one `.item()`-like read per logging
interval (log.every_steps) and one all-reduce per evaluation. Everything else (loss
sums, hit counts) accumulates on the device. The others we keep, each marked "sync point"
where it happens: the RNG all-gather when a checkpoint is written, and fp16's GradScaler
(free with the fused CUDA optimizers ffdist.optim builds; see strategies/single.py).
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
from ffdist.checkpoint import CheckpointManager
from ffdist.data import DevicePrefetcher, Loaders
from ffdist.dist import DistInfo, all_reduce_sum
from ffdist.metrics import EvalCounts
from ffdist.monitor import Monitor
from ffdist.optim import lr_at, total_steps
from ffdist.precision import autocast
from ffdist.recipe import Recipe
from ffdist.strategies import Strategy


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0            # epoch in progress (or the next one, after an epoch ends)
    step: int = 0             # optimizer steps done in total
    step_in_epoch: int = 0    # optimizer steps done in `epoch`
    best_top1: float = -1.0
    last_eval: dict[str, Any] = field(default_factory=dict)


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
        self.stop_requested = False  # set by a signal handler (preemption)

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
                "world_size": self.info.world_size, "recipe": self.recipe.to_dict(),
                "classes": list(self.loaders.spec.classes)}

    def save(self, is_best: bool = False) -> None:
        self.manager.save(self.state(), self.progress.step, is_best=is_best)

    def restore(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)
        self.progress = Progress(state["epoch"], state["step"], state["step_in_epoch"],
                                 state.get("best_top1", -1.0))
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
        while p.step < self.total_steps and p.epoch < sched.epochs and not self.stop_requested:
            self.train_epoch()
            if self.stop_requested:
                break
            finished = p.step >= self.total_steps or p.epoch + 1 >= sched.epochs
            is_best = False
            if finished or (p.epoch + 1) % sched.eval_every_epochs == 0:
                is_best = self.evaluate()
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
            if finished or p.epoch % self.recipe.checkpoint.every_epochs == 0:
                self.save(is_best)
        if self.stop_requested:
            self.save()
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
            if self.stop_requested:
                break
        if window.steps:
            self._log_train(window, lr)
        self.monitor.end_epoch()

    def _optimizer_step(self, batches: Any, lr: float, window: _Window) -> None:
        """One optimizer step (accum micro-steps) with no host sync; `ffdist bench` times
        this very method. On CUDA the times are host (dispatch) times: the queue of
        kernels fills up in a few steps, after which they track the device's pace."""
        started = time.perf_counter()
        accum = self.plan.accum
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            window.data_wait += time.perf_counter() - t0
            with self.strategy.no_sync(boundary=micro == accum - 1):
                with autocast(self.precision, self.info.device):
                    loss = self.criterion(self.strategy.model(x), y) / accum
                self.strategy.backward(loss)
            window.loss_sum += loss.detach().float()
        self.strategy.step(lr)
        window.steps += 1
        window.images += self.plan.global_batch
        window.step_time += time.perf_counter() - started

    def _log_train(self, window: _Window, lr: float) -> None:
        loss_sum = all_reduce_sum(window.loss_sum.clone())  # sync point: once per interval
        p = self.progress
        loss = loss_sum.item() / (window.steps * self.info.world_size)
        ips = window.images / max(window.step_time, 1e-9)
        wait = window.data_wait / max(window.step_time, 1e-9)
        record = {"loss": loss, "lr": lr, "images_per_s": ips, "data_wait_fraction": wait,
                  "step_ms": 1000 * window.step_time / window.steps}
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
        for x, y in self.val_batches:
            with autocast(self.precision, self.info.device):
                logits = model(x)
            counts.update(logits.float(), y, self.eval_criterion(logits.float(), y))
        result = counts.reduce()  # sync point: one all-reduce + read per evaluation
        model.train(was_training)
        p = self.progress
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
        if self.info.is_primary:
            model_state = ckpt_io.clean_state_dict(self.strategy.unwrap().state_dict())
            ckpt_io.save_torch(self.monitor.run_dir / "model.pt", model_state)
        self.monitor.event(event="end", **end)
        return end


class _Window:
    """Training statistics between two log lines, kept on the device where possible."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.images = 0, 0
        self.data_wait = self.step_time = 0.0
