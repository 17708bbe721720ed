"""Fuzz the commands that write against a disk with little room: a real tmpfs
(tests/fault/fs.py, in a private user and mount namespace) with a random number of bytes
free, full, or read-only. Whatever the room, each command finishes (exit 0, its output
there) or stops with one sentence (exit 2); never a traceback, never a C++ abort (the child
would die and its report be missing), and never a temp file of ffdist's left on the disk.
(`ffdist launch` is left out: with room it would start two training ranks per case; its
refusal on a full or read-only disk is tests/fault/user_errors/test_storage.py's.)"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fault import fs
from tests.fault.user_errors.common import imagefolder
from tests.fault.user_errors.test_storage import writers
from tests.fuzz.conftest import examples, no_traceback

# make test-all only: random cases of paths the fast tier covers with fixed ones
# (tests/fault/user_errors/); `make fuzz` is the long run.
pytestmark = pytest.mark.extended

TEMP = re.compile(r"\.[^/]+\.(\d+\.tmp.*|tmp\.\d+|partial-\d+)|\.write_test\.\d+|"
                  r"\.ffdist-probe\.\d+")
"""The temp names of ffdist's writers (outputs.temp_path, checkpoint.temp_path, shard's
partial folder, the run folder's and check_folder's probes)."""
OUTPUT = {"train": "trained/model.pt", "eval": "run/eval/report.json", "predict": "preds.csv",
          "export": "model.torchscript.pt", "bench": "bench.json", "samples": "samples",
          "shard": "shards"}
"""What each command has written when it exits 0."""

disks = st.one_of(st.just("ro"), st.just("full"),
                  st.integers(0, 1_600_000).map(lambda n: f"free:{n}"))
commands = st.lists(st.sampled_from(sorted(OUTPUT)), min_size=1, max_size=3, unique=True)


@pytest.fixture(scope="module")
def inputs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ffdist import samples

    root = tmp_path_factory.mktemp("fuzz_storage")
    run = root / "run"  # the weights and recipe only: eval writes beside them, on the disk
    run.mkdir()
    for name in ("recipe.yaml", "model.pt"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    samples.write(root / "samples", samples.files(4, False))
    return {"run": run, "samples": root / "samples", "folder": imagefolder(root / "folder", 4)}


@settings(max_examples=examples("storage"))
@given(disk=disks, names=commands)
def test_a_command_on_a_disk_with_little_room_finishes_or_refuses_cleanly(inputs, disk, names):
    fs.skip_unless_possible()
    with tempfile.TemporaryDirectory() as box:
        work = Path(box)
        cases = [c for c in writers(work / "disk", inputs) if c.name in names]
        found = fs.on_disk(work, disk, cases, copy={"run": inputs["run"]})
    for name, o in found.items():
        assert o.code in (0, 2), f"{name} on {disk}: exit {o.code}\n{o.out[-2000:]}\n{o.err}"
        no_traceback(o.out + o.err)
        left = [f for f in o.leftovers() if TEMP.fullmatch(Path(f).name)]
        assert not left, f"{name} on {disk} left {left}"
        if o.code == 0:
            assert OUTPUT[name] in o.after, f"{name} on {disk}: exit 0 without {OUTPUT[name]}"
        else:
            assert o.err.count("ffdist: error: ") == 1, o.err
