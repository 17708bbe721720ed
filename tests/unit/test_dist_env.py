"""Which launcher started us, read from the environment variables each one sets."""

import pytest

from ffdist.world import world_from_env

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS",
                 "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_NNODES",
                 "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE",
                 "PMI_RANK", "PMIX_SIZE", "PMIX_RANK")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_is_one_process(clean_env: pytest.MonkeyPatch) -> None:
    assert world_from_env() == (0, 0, 1, 1, "none")


def test_torchrun_style(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        clean_env.setenv(k, v)
    assert world_from_env() == (3, 1, 4, 2, "torchrun")


def test_srun_tasks(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_STEP_ID="0",
                     SLURM_NNODES="2").items():
        clean_env.setenv(k, v)
    assert world_from_env() == (5, 1, 8, 4, "slurm")


def test_sbatch_script_itself_is_not_a_world(clean_env: pytest.MonkeyPatch) -> None:
    # The batch step has SLURM_NTASKS of the allocation but no SLURM_STEP_ID of an srun step.
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "0")
    assert world_from_env()[2] == 1


def test_torchrun_inside_slurm_wins(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_STEP_ID="0", RANK="2",
                     WORLD_SIZE="4", LOCAL_RANK="0").items():
        clean_env.setenv(k, v)
    assert world_from_env()[0] == 2 and world_from_env()[4] == "torchrun"


def test_mpirun(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1",
                     OMPI_COMM_WORLD_LOCAL_RANK="1").items():
        clean_env.setenv(k, v)
    assert world_from_env() == (1, 1, 2, 2, "mpi")
