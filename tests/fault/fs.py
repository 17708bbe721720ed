"""Real full and read-only file systems for tests, without changing the host.

`on_disk(plan)` starts a child in its own user and mount namespaces (`unshare --user
--map-root-user --mount --propagation private`: no root needed), mounts a small tmpfs over a
folder of the test's tmp_path there, and runs this module in it (`python -m tests.fault.fs
PLAN.json`): it copies the plan's inputs onto the disk, fills it (`full`: to the last block;
`free:N`: all but N bytes) or remounts it read-only (`ro`), then runs each case in that one
process, as the CLI does (`ffdist.cli.main(argv)`: the same guard, the same code path,
without a torch import per command), and records its exit status, its stdout and stderr, and
the disk's files before and after (names and hashes, dotfiles included: a temp file left
behind shows). The mount exists only in the child's namespace: the host never sees it, and
it is gone when the child ends (nothing to clean up). A case may also call a function
(`call`: "module:function"), for writers tested below the CLI.

Needs util-linux's unshare and a kernel that lets unprivileged users make user namespaces
(most Linux distributions; some containers forbid it): `skip_unless_possible` skips, saying
why, elsewhere, and fails instead of skipping in CI as root, so that CI never hides these
tests.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.helpers import REPO, env

MODES = ("full", "ro", "free:<bytes>", "writable")


@dataclass
class Case:
    name: str
    argv: list[str] = field(default_factory=list)  # ffdist.cli arguments
    call: str = ""                                 # or "module:function", called with args
    args: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    name: str
    code: int | None            # the exit status (a call: 0, or None when it raised)
    out: str
    err: str
    raised: str                 # a call's exception: "Type: message" ("" when none)
    before: dict[str, str]
    after: dict[str, str]

    def leftovers(self) -> list[str]:
        """Files and folders on the disk after the case that were not there before."""
        return sorted(set(self.after) - set(self.before))


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
"""A private mount namespace inside a user namespace, where this user may mount a tmpfs."""


@functools.cache
def missing_capability() -> str | None:
    missing = [c for c in ("unshare", "mount") if not shutil.which(c)]
    if missing:
        return f"not installed: {', '.join(missing)} (util-linux)"
    # (over the temp folder, inside the namespace only: the host's stays as it is)
    trial = subprocess.run([*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=64k", "t",
                            tempfile.gettempdir()], capture_output=True, text=True, timeout=30)
    if trial.returncode:
        return f"no tmpfs in a user namespace here: {trial.stderr.strip()[:200]}"
    return None


def skip_unless_possible() -> None:
    """Skip, saying why, where no private tmpfs can be mounted; in CI as root (where it always
    can: .ci/system-setup's util-linux) that is a failure, not a skip that would hide it."""
    import pytest

    reason = missing_capability()
    if reason and os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"no private tmpfs in CI: {reason}", pytrace=False)
    if reason:
        pytest.skip(f"no private tmpfs: {reason}")


def on_disk(work: Path, mode: str, cases: list[Case], copy: dict[str, Path] | None = None,
            size: str = "2M", timeout: float = 300) -> dict[str, Outcome]:
    """Run `cases` with a tmpfs of `size` at work/disk in `mode` (see MODES), after copying
    `copy` (name on the disk -> a file or folder here) onto it. Returns name -> Outcome."""
    skip_unless_possible()
    disk = work / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    plan = {"disk": str(disk), "mode": mode, "cases": [asdict(c) for c in cases],
            "copy": {k: str(v) for k, v in (copy or {}).items()},
            "report": str(work / "fs-report.json")}
    plan_file = work / "fs-plan.json"
    plan_file.write_text(json.dumps(plan))
    cmd = [*UNSHARE, "sh", "-c",
           'mount -t tmpfs -o size="$1" ffdist-test "$2" && exec "$3" -m tests.fault.fs "$4"',
           "sh", size, str(disk), sys.executable, str(plan_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    report = work / "fs-report.json"
    assert proc.returncode == 0 and report.exists(), (
        f"the disk's child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-3000:]}")
    assert not any(disk.iterdir()), "the tmpfs was visible outside its namespace"
    return {o["name"]: Outcome(**o) for o in json.loads(report.read_text())}


# ------------------------------------------------------------------------ inside the namespace

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if p.name != ".ffdist.lock"}


def _fill(disk: Path, leave: int) -> None:
    """Write a filler file until only `leave` bytes are free (0: until the disk is full)."""
    with open(disk / "filler.bin", "wb") as f:
        block = bytes(4096)
        while True:
            room = shutil.disk_usage(disk).free - leave
            if room <= 0:
                break
            try:
                f.write(block[:min(len(block), room)])
                f.flush()
            except OSError:
                break


@contextlib.contextmanager
def _captured(folder: Path):
    """The process's stdout and stderr (descriptors 1 and 2) into files, read back after."""
    files = [tempfile.TemporaryFile(dir=folder) for _ in range(2)]
    saved = [os.dup(1), os.dup(2)]
    text: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        yield text
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in files:
            f.seek(0)
            text.append(f.read().decode(errors="replace"))
            f.close()


def _run_case(case: Case, disk: Path, scratch: Path) -> Outcome:
    from ffdist import cli

    before = snapshot(disk)
    code: int | None = 0
    raised = ""
    with _captured(scratch) as text:
        try:
            if case.call:
                module, function = case.call.split(":")
                getattr(importlib.import_module(module), function)(*case.args)
            else:
                code = cli.main(case.argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a bug or an expected error of a call: recorded
            code = None
            raised = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    return Outcome(case.name, code, text[0], text[1], raised, before, snapshot(disk))


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    disk, mode = Path(plan["disk"]), plan["mode"]
    for name, source in plan["copy"].items():
        src, dst = Path(source), disk / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    if mode == "full":
        _fill(disk, 0)
    elif mode.startswith("free:"):
        _fill(disk, int(mode.split(":")[1]))
    elif mode == "ro":
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    elif mode != "writable":
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    scratch = Path(plan["report"]).parent
    outcomes = [_run_case(Case(**c), disk, scratch) for c in plan["cases"]]
    Path(plan["report"]).write_text(json.dumps([asdict(o) for o in outcomes]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
