"""A rank SIGKILLed under `torchrun --max-restarts 3`: the job restarts, resumes from the
newest complete checkpoint and ends with the weights of a run never interrupted.

launch.pg_timeout=20 bounds how long the surviving rank could wait for its dead peer (gloo
usually notices the closed socket at once); the outer timeout bounds the whole test. A
restart budget of 3 absorbs the occasional failed re-rendezvous seen with gloo here.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.fault import kit


def test_sigkill_one_rank_restarts_and_matches_uninterrupted(ref2: Path, tmp_path: Path):
    out = tmp_path / "run"
    agent = kit.start(kit.torchrun_cmd(out, "launch.pg_timeout=20",
                                       extra=("--max-restarts", "3")),
                      FFDIST_FAULT="slow:step=8-16:ms=100")
    kit.wait_for_step(out, 12, agent)  # checkpoints of steps 5 and 10 exist
    victim = kit.worker_pids(agent)[1]
    kit.send(victim, signal.SIGKILL)
    text = agent.communicate(timeout=150)[0]
    assert agent.returncode == 0, kit.explain(agent, text)
    assert "resumed from step" in text, "the restarted workers should resume, not start over"
    assert kit.train_losses(out) == kit.train_losses(ref2)
    kit.same_weights(out / "model.pt", ref2 / "model.pt")
