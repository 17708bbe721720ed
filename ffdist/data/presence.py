"""Is a recipe's dataset there at all? File-system checks only (no torch, no dataset built),
run by `python -m ffdist.train` right after the recipe is read, and by `ffdist launch`
before it starts a launcher: before the process group and the run directory, so that
absent data is one sentence, printed once, and leaves no empty run directory behind. The
size keys a source ignores (data.image_size on digits) are refused here too, for the same
reason.
Each source says what it needs (`Source.check_present`); what the data holds (classes,
images, labels) is checked later, when the source builds its streams.
"""

from __future__ import annotations

from ffdist.data import sources
from ffdist.data.sources.base import SMOKE, DataMissing
from ffdist.recipe import DataConfig

__all__ = ["SMOKE", "DataMissing", "check_present"]


def check_present(cfg: DataConfig, recipe_path: str | None = None) -> None:
    """Raise DataMissing when the files data.name needs are absent (an unknown data.name:
    the registry's did-you-mean), and refuse the size keys the source ignores
    (`Source.check_sizes`), so that neither leaves a run directory behind."""
    of = f"{recipe_path}: " if recipe_path else ""
    source = sources.get(cfg.name)
    source.check_sizes(cfg)
    source.check_present(cfg, of)
