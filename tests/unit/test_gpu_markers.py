"""tests/conftest.py's hook, run as pytest runs it: `gpu` tests report "no GPU" where CUDA
is unavailable, `multigpu` ones "needs 2 GPUs" where fewer are visible, and both run where
the GPUs are there."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import cuda_gpus, run

GPU_TEST = "tests/gpu/test_cuda_paths.py::test_nvml_count_is_torch_count"
MULTIGPU_TEST = "tests/integration/test_launch_run.py::test_ffdist_launch_trains_world_of_two[nccl]"


def _pytest(test: str) -> str:
    proc = run([sys.executable, "-m", "pytest", test, "-rs", "-q", "-p", "no:cacheprovider"],
               timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


# make test-all only (both): the fast tier runs the marked tests themselves, skipped or run by
# the same hook
@pytest.mark.extended
def test_gpu_marker_skips_without_a_gpu_and_runs_with_one() -> None:
    out = _pytest(GPU_TEST)
    if cuda_gpus() == 0:
        assert "1 skipped" in out and "no GPU" in out, out
    else:
        assert "1 passed" in out, out


@pytest.mark.extended
def test_multigpu_marker_needs_two_gpus() -> None:
    count = cuda_gpus()
    if count >= 2:  # it would train 2 NCCL ranks here, as the suite's own nccl case does
        pytest.skip(f"{count} GPUs: the multigpu cases run in the suite itself")
    out = _pytest(MULTIGPU_TEST)
    reason = "no GPU" if count == 0 else "needs 2 GPUs, 1 visible"
    assert "1 skipped" in out and reason in out, out
