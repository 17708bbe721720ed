"""The end of a run says what happened (ffdist.summary): the result, the run folder and its
files, the next commands with the run's real path; once, on rank 0."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.helpers import CPU, FAST, end_event, run, torchrun, train

TINY = ("schedule.epochs=1", "log.progress=false")


def block(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = [i for i, ln in enumerate(lines) if re.match(r"ffdist: \w+ finished in ", ln)]
    assert len(start) == 1, stdout
    return lines[start[0]:]


def test_a_finished_run_prints_result_folder_files_and_next_commands(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    proc = train("digits.yaml", *TINY, f"output_dir={out}")
    end = end_event(out)
    lines = block(proc.stdout)
    assert 8 <= len(lines) <= 10, lines
    head = lines[0]
    assert f"{end['step']} steps" in head and "of 360 images" in head
    assert f"best {end['best_top1']:.4f}" in head and f"final {end['final_top1']:.4f}" in head
    assert re.search(r"finished in \d+\.\d s", head)
    assert lines[1] == (f"  run folder {out}/: model.pt, checkpoints/best.pt (step "
                        f"{end['best_step']}, top-1 {end['best_top1']:.4f}), metrics.jsonl, "
                        "tb/, recipe.yaml")
    text = "\n".join(lines)
    for cmd in (f"ffdist eval {out} ", "ffdist samples --out samples",
                f"ffdist predict {out} samples --out preds.csv", f"tensorboard --logdir {out}/tb",
                f"output_dir={out}_2"):
        assert cmd in text, cmd
    # the path printed is the one to use: eval of it gives the final top-1
    ev = run([sys.executable, "-m", "ffdist.cli", "eval", str(out)])
    assert f"{end['final_top1']:.4f}" in ev.stdout, ev.stdout

    again = train("digits.yaml", *TINY, f"output_dir={out}")  # same recipe: nothing to do
    lines = [ln for ln in again.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2 and "nothing to do" in lines[0], again.stdout
    assert lines[0].endswith(f"A new run needs its own folder: output_dir={out}_2.")
    assert lines[1] == (f"  next: ffdist eval {out}  |  ffdist predict {out} samples --out "
                        f"preds.csv  |  tensorboard --logdir {out}/tb "
                        "--samples_per_plugin images=1000")


def test_without_tensorboard_and_with_an_ema_the_block_says_so(tmp_path: Path) -> None:
    out = tmp_path / "ema"
    proc = train("digits.yaml", *TINY, *FAST, "optim.ema_decay=0.9", f"output_dir={out}")
    end = end_event(out)
    lines = block(proc.stdout)
    text = "\n".join(lines)
    assert "tensorboard --logdir" not in text and "tb/" not in lines[1]
    assert f"final val {end['final_top1_raw']:.4f}, val_ema {end['final_top1_ema']:.4f}" in lines[0]


# make test-all only: the fast tier covers rank 0 alone printing through tests/fault/
# user_errors/test_ranks.py::test_every_rank_exits_2_and_only_rank_0_prints and tests/
# integration/test_sinks.py::test_only_rank_0_has_sinks_under_torchrun, the block above
@pytest.mark.extended
def test_only_rank_0_prints_the_block(tmp_path: Path) -> None:
    out, logs = tmp_path / "two", tmp_path / "logs"
    torchrun("digits.yaml", CPU, *TINY, *FAST, f"output_dir={out}",
             extra_args=("--log-dir", str(logs), "--redirects", "3"))
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(stdout) == [0, 1], list(logs.rglob("*"))
    lines = block(stdout[0])
    assert "the same command + KEY=VALUE ... output_dir=" in lines[-1]  # not `ffdist train`
    assert "finished in" not in stdout[1] and "next:" not in stdout[1], stdout[1]
