"""The fuzzer's two profiles: `ci` (the default, part of the suite: a fixed set of cases,
about a minute here) and `long` (`make fuzz`: random, many more cases).

FFDIST_FUZZ=long selects the long one; FFDIST_FUZZ_SCALE multiplies its case counts.
Failures print a `@reproduce_failure` blob to paste above the test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("FFDIST_FUZZ", "ci")
SCALE = float(os.environ.get("FFDIST_FUZZ_SCALE", "1"))

# cases per test: (ci, long)
COUNTS = {
    "recipe_dicts": (150, 5000),
    "recipe_texts": (150, 5000),
    "overrides": (150, 5000),
    "images": (120, 3000),
    "train": (25, 300),
    "predict": (6, 150),
    "real": (2, 12),
    "storage": (2, 60),
}

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("long", derandomize=False, database=None, **_common)
settings.load_profile(PROFILE)


def examples(name: str) -> int:
    ci, long = COUNTS[name]
    return ci if PROFILE == "ci" else max(1, int(long * SCALE))


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Hash of every file under `folder` except those under `skip` (the output_dir)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest() \
            if p.is_file() else "dir"
    return out


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text[-4000:]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run of 5 steps (for predict)."""
    from ffdist import train
    from tests.helpers import RECIPES

    out = tmp_path_factory.mktemp("fuzz_run") / "digits"
    code = train.main([str(RECIPES / "digits.yaml"), "schedule.max_steps=5", "log.progress=false",
                       "log.tensorboard=false", f"output_dir={out}"])
    assert code == 0
    return out
