"""Recipe keys that exist but that the Trainer does not honour yet (issue 14, phase 1).

EMA of the weights and mixup/cutmix are built and tested as components (ffdist.ema,
ffdist.mixup); using them needs call points in the Trainer, the strategies and the
checkpoints, which another change is reworking. Until they are wired, a recipe that turns
them on is refused where training starts (data.build: train and bench), not silently
ignored. `ffdist plan` still reads such recipes. Delete this module when they are wired.
"""

from __future__ import annotations

from ffdist.errors import RecipeError
from ffdist.recipe import Recipe


def active(recipe: Recipe) -> list[str]:
    """The unwired keys this recipe sets away from their defaults, as key=value."""
    d, o, c = recipe.data, recipe.optim, recipe.checkpoint
    found = [f"optim.ema_decay={o.ema_decay}"] if o.ema_decay > 0 else []
    found += [f"data.mixup_alpha={d.mixup_alpha}"] if d.mixup_alpha > 0 else []
    found += [f"data.cutmix_alpha={d.cutmix_alpha}"] if d.cutmix_alpha > 0 else []
    found += [f"data.cutmix_minmax={d.cutmix_minmax}"] if d.cutmix_minmax else []
    found += [f"checkpoint.{k}=ema" for k in ("best_weights", "final_weights")
              if getattr(c, k) == "ema"]
    return found


def refuse(recipe: Recipe) -> None:
    keys = active(recipe)
    if keys:
        raise RecipeError(f"{', '.join(keys)}: EMA and mixup/cutmix are not yet wired into the "
                          "Trainer (issue 14, phase 2); they would silently do nothing. Set "
                          "optim.ema_decay=0 data.mixup_alpha=0 data.cutmix_alpha=0 "
                          "data.cutmix_minmax=null checkpoint.best_weights=raw "
                          "checkpoint.final_weights=raw to train without them.")
