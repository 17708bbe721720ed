"""`--help` on every command: `ffdist X --help` and `python -m <module> --help` print a
usage and exit 0, doing nothing else (`ffdist models --help` prints no model list)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ffdist import cli
from tests import helpers


def _in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's --help exits 0 after printing
        rc = e.code or 0
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_ffdist_command_help(name: str, flag: str, capsys):
    rc, out = _in_process([name, flag], capsys)
    assert rc == 0, name
    assert out.lower().startswith("usage:") and name in out.split("\n\n")[0], out[:300]
    assert len(out.splitlines()) >= 3  # more than a bare usage line: what it does
    assert "alexnet" not in out  # no command runs instead of helping (models listed them)


def test_python_m_module_help():
    """Each command's module run as a script, as launchers do (`python -m ffdist.X`)."""
    modules = sorted({module for module, _ in cli.COMMANDS.values()})
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=helpers.REPO,
                                 env=helpers.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in modules}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"python -m {module} --help: exit {proc.returncode}\n{err}"
        assert out.lower().startswith("usage:"), f"python -m {module} --help printed:\n{out[:300]}"


def test_top_level_usage(capsys):
    assert _in_process(["--help"], capsys)[0] == 0
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
