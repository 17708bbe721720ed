"""Multi-node runs need ONE output_dir that every rank sees (a shared file system).

Rank 0 alone writes logs, DDP checkpoints and model.pt, but every rank reads the
checkpoint it resumes from, and under ZeRO every rank writes its own shard next to the
others. A node-local output_dir would silently split the run, so at start rank 0 writes a
marker with a random token, and every rank checks, after a barrier, that it reads the
same token. All ranks learn the verdict together (so none is left waiting for a peer
that gave up) and fail with one sentence naming the ranks and hosts that do not see it.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from ffdist import dist
from ffdist.errors import LaunchError

MARKER = ".ffdist_shared_check"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def check_shared_dir(run_dir: Path, rank: int, world_size: int) -> None:
    """Raise LaunchError on every rank when some rank does not see rank 0's run_dir. The
    ranks meet through ffdist.dist.decide: a deadline (launch.rdzv_timeout), no collective."""
    if world_size == 1:
        return
    marker = Path(run_dir) / MARKER
    token = secrets.token_hex(16) if rank == 0 else None
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(token)
        tmp.replace(marker)  # atomic: a reader sees the whole token or nothing
    what = "the shared output_dir check"
    token = dist.decide("shared-fs-token", token, lambda tokens: tokens[0], what)
    seen = _read(marker) == token
    verdict = dist.decide("shared-fs", [rank, socket.gethostname(), seen],
                          lambda verdicts: _blind(run_dir, verdicts), what)
    if rank == 0:
        marker.unlink(missing_ok=True)
    if verdict:
        raise LaunchError(verdict)


def _blind(run_dir: Path, verdicts: list[list]) -> str | None:
    blind = [(r, host) for r, host, ok in verdicts if not ok]
    if not blind:
        return None
    who = ", ".join(f"rank {r} on {host}" for r, host in blind)
    return (f"output_dir {str(run_dir)!r} is not shared: {who} cannot read the marker rank 0 "
            "wrote there; put output_dir on a file system every node mounts at the same "
            "path (NFS, Lustre, GPFS...).")
