"""ffdist: one YAML recipe, any launcher (python, torchrun, accelerate, deepspeed, Slurm).

Importing the package is cheap on purpose: torch and friends are imported by the modules
that need them, so `ffdist --help` and recipe errors answer in well under a second.
"""

from ffdist.errors import FfdistError, RecipeError

__all__ = ["FfdistError", "RecipeError"]
__version__ = "0.1.0"
