"""Suite-wide settings: one thread per process, and `gpu` / `multigpu` tests skipped with a
reason where this machine lacks the GPUs."""

import os

import pytest

# Child processes and this process alike: one thread per rank keeps 2-core CI honest.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip with "no GPU" where torch.cuda.is_available() is false, `multigpu`
    ones where fewer than 2 GPUs are visible: the suite passes on 0, 1 and N GPUs, and a
    report says which CUDA paths did not run here."""
    marked = [i for i in items if i.get_closest_marker("gpu") or i.get_closest_marker("multigpu")]
    if not marked:
        return  # no torch import (and no CUDA query) for runs that select no GPU test
    from tests.helpers import cuda_gpus

    count = cuda_gpus()
    for item in marked:
        if count == 0:
            item.add_marker(pytest.mark.skip(reason="no GPU"))
        elif item.get_closest_marker("multigpu") and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 GPUs, {count} visible"))
