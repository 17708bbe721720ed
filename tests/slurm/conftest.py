import pytest

from tests.slurm.cluster import ensure_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    ensure_cluster()
