"""The shared-output_dir check, with two real gloo ranks (torch.multiprocessing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as tdist
import torch.multiprocessing as mp

from ffdist.errors import LaunchError
from ffdist.shared_fs import MARKER, check_shared_dir
from tests.helpers import free_port

# case -> the output_dir each rank sees. Rank 1 plays a node whose output_dir is on its
# own local disk: absent there, or holding a marker left by an older run (another token).
CASES = {"shared": ("run", "run"), "missing": ("run", "node1-missing"),
         "stale": ("run", "node1-stale")}


def _rank(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    verdicts = {}
    try:
        for case, dirs in CASES.items():  # one process group for all cases: spawn is slow
            try:
                check_shared_dir(Path(root, dirs[rank]), rank, 2)
                verdicts[case] = "ok"
            except LaunchError as e:
                verdicts[case] = f"error: {e}"
    finally:
        tdist.destroy_process_group()
    Path(root, f"rank{rank}.json").write_text(json.dumps(verdicts))


def test_shared_dir_check_two_ranks(tmp_path):
    (tmp_path / "node1-stale").mkdir()
    (tmp_path / "node1-stale" / MARKER).write_text("an old token")
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for v in verdicts:
        assert v["shared"] == "ok"
        for case in ("missing", "stale"):  # both ranks stop: none hangs in a collective
            assert v[case].startswith("error: output_dir"), v[case]
            assert "rank 1 on" in v[case] and "rank 0 on" not in v[case]
    assert not (tmp_path / "run" / MARKER).exists()  # rank 0 cleans up
