"""Exponential moving average (EMA) of a model's weights.

    ema <- decay * ema + (1 - decay) * weights      every `every` optimizer steps

over an fp32 shadow of every parameter and floating-point buffer (BatchNorm statistics are
averaged, as timm's ModelEmaV3 and torchvision's ExponentialMovingAverage do; `buffers=
"copy"` takes the raw model's instead); integer buffers (num_batches_tracked) are copied.

Warm-up: during the first `warmup_steps` optimizer steps every update COPIES the weights
(decay 0), then it averages with `decay`. This is torchvision's reference behaviour (it
resets its EMA while the learning rate warms up) rather than TF's num_updates ramp
min(decay, (1+n)/(10+n)): the ramp depends on how often the EMA is updated (with one update
every 32 steps it would stay below 0.999 for a third of a 600-epoch run) and changes the
published recipes; a copy during warm-up does not.

Exactness: the update is a pure function of (shadow, weights, step): no RNG, no host sync
(`torch._foreach_lerp_` with a host float as weight; low-precision weights are promoted to
fp32 first), the same on every rank. A skipped optimizer step (non-finite loss) is no
update: the host says so (`applied=False`), or the device does with a 0/1 tensor that
masks the update (`applied=tensor`, no host read; see `update`). `state_dict()` is plain
tensors and numbers (loads with weights_only=True); restoring it and continuing gives the
same shadow bit for bit as an uninterrupted run.

Evaluating with the EMA weights: `swapped(model)` puts them into the model and restores the
raw weights on exit (exactly: a saved copy is put back); `module_copy(model)` returns a
separate eval-mode copy holding them (for model.pt or a standing eval model).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ffdist.state_dicts import clean_state_dict

if TYPE_CHECKING:
    from ffdist.recipe import Recipe


class MakesEMA(Protocol):
    """What for_run needs of a strategy (ffdist.strategies.base.Strategy.make_ema)."""

    def make_ema(self, decay: float, every: int, warmup_steps: int, buffers: str) -> EMA: ...


def _named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state-dict name (each tensor once), no wrapper prefixes."""
    return clean_state_dict(model.state_dict(keep_vars=True))


def for_run(recipe: Recipe, strategy: MakesEMA, steps_per_epoch: int) -> EMA | None:
    """The run's EMA of the weights (None when optim.ema_decay is 0), built by the strategy
    from the weights it holds now: single device and DDP average the module (every DDP
    rank holds the same weights, so the same shadow); DeepSpeed averages its fp32 master
    partitions (ffdist.strategies.deepspeed_ema)."""
    o = recipe.optim
    if o.ema_decay <= 0:
        return None
    warmup = round(o.ema_warmup_epochs * steps_per_epoch)
    return strategy.make_ema(o.ema_decay, o.ema_every_steps, warmup, o.ema_buffers)


class EMA:
    collective = False
    """True when state_dict() and weights() are collectives (every rank must call them; the
    result is on rank 0 only): an EMA whose shadow is partitioned over the ranks."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0,
                 buffers: str = "average", device: torch.device | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not in [0, 1)")
        if every < 1 or warmup_steps < 0 or buffers not in ("average", "copy"):
            raise ValueError("EMA: every >= 1, warmup_steps >= 0, buffers average|copy")
        self.decay, self.every, self.warmup_steps, self.buffers = decay, every, warmup_steps, buffers
        self.updates = 0  # EMA updates done so far
        state = _named_state(model)
        params = {id(p) for p in model.parameters()}
        self.averaged = [k for k, v in state.items() if v.is_floating_point()
                         and (id(v) in params or buffers == "average")]
        self.copied = [k for k in state if k not in set(self.averaged)]
        self.shadow: dict[str, torch.Tensor] = {}
        self._lists: tuple[int, list, list, list, list] | None = None  # see _tensors
        for k, v in state.items():
            t = v.detach().to(device or v.device)
            self.shadow[k] = t.float().clone() if v.is_floating_point() else t.clone()

    # ------------------------------------------------------------------ the update
    def decay_at(self, step: int) -> float:
        """The decay an update at optimizer step `step` (1-based: steps done) uses."""
        return 0.0 if step <= self.warmup_steps else self.decay

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int,
               applied: bool | torch.Tensor | None = None) -> bool:
        """After optimizer step `step` (1-based count of steps done): update when due.

        `applied` says whether that optimizer step changed the weights: None/True (yes),
        False (it was skipped, a non-finite loss: the shadow is left alone), or a 0-dim
        device tensor 1.0/0.0 when only the device knows (a skip decided on the device):
        the update is then masked on the device, with no host read. Masked by 1.0 it gives
        the same bits as an unmasked update; by 0.0 it leaves the shadow as it was.
        Returns whether an update was due. Launches device work only; reads nothing back."""
        if not self.due(step):
            return False
        self.updates += 1  # due updates, applied or masked: the same count either way
        if applied is False:
            return True
        ema, cur, ema_copied, cur_copied = self._tensors(model)
        average(ema, cur, 1.0 - self.decay_at(step), applied)
        if ema_copied:
            copy_masked(ema_copied, cur_copied, applied)
        return True

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(shadow, model) tensor lists to average and to copy, built once per model: a
        state_dict() call costs ~1.4 ms for a ResNet-50, too much for every step. The model
        tensors are held by reference: updated in place (optimizer steps, load_state_dict)
        they stay right; a strategy that REPLACES them (ZeRO-3 partitioning) needs its own
        shard-wise EMA (docs/regularization.md)."""
        if self._lists is None or self._lists[0] != id(model):
            state = _named_state(model)
            self._lists = (id(model), [self.shadow[k] for k in self.averaged],
                           [state[k].detach() for k in self.averaged],
                           [self.shadow[k] for k in self.copied],
                           [state[k].detach() for k in self.copied])
        return self._lists[1:]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain state (tensors on the CPU, numbers): torch.load(weights_only=True) reads it."""
        return {"decay": self.decay, "every": self.every, "warmup_steps": self.warmup_steps,
                "buffers": self.buffers, "updates": self.updates,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def restore(self, state: dict[str, Any] | None, model: nn.Module) -> bool:
        """Resume: the checkpoint's EMA section, or (a checkpoint written without one) a
        fresh shadow of the restored weights. Returns whether the section was there."""
        self._lists = None  # the model's tensors may have been replaced by the restore
        if state is None:
            with torch.no_grad():
                for k, v in _named_state(model).items():
                    self.shadow[k].copy_(v.detach())
            return False
        self.load_state_dict(state)
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))[:3]
            extra = sorted(set(shadow) - set(self.shadow))[:3]
            raise KeyError(f"EMA state does not fit the model (missing {missing}, unexpected "
                           f"{extra})")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])

    # ------------------------------------------------------------------ using the weights
    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA as a plain state dict (fp32 floats), e.g. for model.pt."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA into `model`'s parameters and buffers (cast to their dtypes)."""
        state = _named_state(model)
        for k, v in self.shadow.items():
            state[k].detach().copy_(v)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with ema.swapped(model): evaluate(model)`: the model holds the EMA weights inside
        the block and exactly its own weights again after it."""
        state = _named_state(model)
        saved = {k: v.detach().clone() for k, v in state.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].detach().copy_(v)

    def module_copy(self, model: nn.Module) -> nn.Module:
        """A separate eval-mode copy of `model` (unwrapped) holding the EMA weights."""
        copied = copy.deepcopy(model)
        self.copy_to(copied)
        return copied.eval()


# ------------------------------------------------------------------ the arithmetic
def average(ema: list[torch.Tensor], cur: list[torch.Tensor], weight: float,
            applied: bool | torch.Tensor | None = None) -> None:
    """ema <- ema + weight * (cur - ema) (torch.lerp: weight 1 is an exact copy), in place,
    for fp32 shadows of tensors of any float dtype. `applied` (0-dim device tensor) scales
    the weight on the device: 1.0 the same bits as the float weight, 0.0 no change."""
    if not ema:
        return
    w: float | torch.Tensor = weight
    if isinstance(applied, torch.Tensor):
        w = applied.to(device=ema[0].device, dtype=torch.float32) * weight
    same = [i for i, (e, c) in enumerate(zip(ema, cur)) if e.dtype == c.dtype]
    if len(same) == len(ema):
        torch._foreach_lerp_(ema, cur, [w] * len(ema) if isinstance(w, torch.Tensor) else w)
        return
    for i, (e, c) in enumerate(zip(ema, cur)):  # bf16/fp16 weights: promote, then lerp
        e.lerp_(c if i in same else c.to(e.dtype), w)


def copy_masked(dst: list[torch.Tensor], src: list[torch.Tensor],
         applied: bool | torch.Tensor | None = None) -> None:
    """dst <- src (integer buffers: num_batches_tracked); masked by a device `applied`."""
    if isinstance(applied, torch.Tensor):
        for d, s in zip(dst, src):
            d.copy_(torch.where(applied.to(d.device) > 0, s, d))
    else:
        torch._foreach_copy_(dst, src)
