"""A disk that is full, read-only or short of space, and names too long for the file system:
every command that writes (train, eval, predict, export, bench, samples, shard, launch)
refuses in one sentence naming the folder and the fix, exit 2, before any work, with
nothing on the disk changed and no temp file left; a disk that fills up DURING a write
(export's TorchScript file, a checkpoint, a picture) is the same sentence, not a traceback
or a C++ abort (exit 134). Real tmpfs file systems in a private mount namespace
(tests/fault/fs.py), invisible to the host."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ffdist import cli
from tests.fault import fs
from tests.fault.fs import Case
from tests.fault.user_errors.common import DIGITS, imagefolder
from tests.helpers import CPU, FAST, error_line, in_process, refused

DISK = "disk"  # where fs.on_disk mounts the tmpfs, under the test's folder


@pytest.fixture(scope="module")
def inputs(ref1: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the commands read, on the host: a finished run, images, an imagefolder."""
    from ffdist import samples

    root = tmp_path_factory.mktemp("storage_inputs")
    pictures = root / "samples"
    samples.write(pictures, samples.files(4, False))
    run = root / "run"  # what eval needs of a run (its checkpoints would not fit the disk)
    run.mkdir()
    for name in ("recipe.yaml", "model.pt"):
        (run / name).write_bytes((ref1 / name).read_bytes())
    return {"run": run, "samples": pictures, "folder": imagefolder(root / "folder", 4)}


def writers(disk: Path, inputs: dict[str, Path]) -> list[Case]:
    """One case per command that writes, each into its own place on the disk."""
    run = str(inputs["run"])
    return [
        Case("train", ["train", DIGITS, CPU, *FAST, "schedule.max_steps=1",
                       f"output_dir={disk / 'trained'}"]),
        Case("eval", ["eval", str(disk / "run")]),
        Case("predict", ["predict", run, str(inputs["samples"]), "--out",
                         str(disk / "preds.csv")]),
        Case("export", ["export", run, "--format", "torchscript", "--out",
                        str(disk / "model.torchscript.pt")]),
        Case("bench", ["bench", DIGITS, CPU, "--steps", "1", "--out", str(disk / "bench.json")]),
        Case("samples", ["samples", "--out", str(disk / "samples")]),
        Case("shard", ["shard", str(inputs["folder"]), "--workers", "1", "--out",
                       str(disk / "shards")]),
        Case("launch", ["launch", DIGITS, CPU, "launch.nproc=2",
                        f"output_dir={disk / 'launched'}"]),
    ]


def one_sentence(outcome: fs.Outcome) -> str:
    """The user-error contract, inside the namespace: exit 2, one line, no traceback,
    nothing on the disk changed, no temp file left."""
    assert outcome.code == 2, f"{outcome.name}: exit {outcome.code}\n{outcome.out}\n{outcome.err}"
    line = error_line(outcome.err)
    assert "Traceback" not in outcome.out
    assert outcome.after == outcome.before, f"{outcome.name} changed the disk: " \
        f"{outcome.leftovers()} new"
    return line


@pytest.mark.parametrize("mode,errno_name", [
    ("full", "ENOSPC"),
    # make test-all; "full" keeps the path (the probe, errors.storage_error) in the fast tier
    pytest.param("ro", "EROFS", marks=pytest.mark.extended)])
def test_every_command_that_writes_refuses_a_full_or_read_only_disk(tmp_path, inputs, mode,
                                                                    errno_name):
    disk = tmp_path / DISK
    found = fs.on_disk(tmp_path, mode, writers(disk, inputs), copy={"run": inputs["run"]})
    for name, outcome in found.items():
        line = one_sentence(outcome)
        assert str(disk) in line, line
        if name == "train":  # the run folder's own start check (ffdist.run_dir)
            assert "output_dir=" in line, line
            continue
        assert f"({errno_name})" in line, line
    assert "evaluate a copy of the run folder" in found["eval"].err
    assert "(the folder of --out): " in found["predict"].err
    assert "choose another output_dir" in found["launch"].err


def test_a_disk_short_of_the_space_an_export_needs(tmp_path, inputs):
    """The export is about the weights' size: refused before exporting, with both numbers."""
    disk = tmp_path / DISK
    case = Case("export", ["export", str(inputs["run"]), "--format", "onnx", "--out",
                           str(disk / "model.onnx")])
    outcome = fs.on_disk(tmp_path, "free:400000", [case])["export"]
    line = one_sentence(outcome)
    assert re.search(rf"{re.escape(str(disk))} \(the folder of --out\): ffdist export writes "
                     r"about [\d.]+ KB there, and its disk has [\d.]+ KB free; free space there, "
                     "or choose another --out.", line), line


# ------------------------------------------------------------------ a disk that fills up mid-write

def export_torchscript(folder: str) -> None:
    """A TorchScript export of ~360 KB into `folder`, as ffdist export writes it."""
    import torch

    from ffdist import export, outputs

    model = torch.nn.Linear(300, 300).eval()
    with outputs.replacing(Path(folder) / "model.torchscript.pt") as tmp:
        export.export_torchscript(model, torch.randn(2, 300), tmp)


def save_checkpoint(folder: str) -> None:
    """A checkpoint file of ~360 KB through checkpoint.atomic_write (torch.save)."""
    import torch

    from ffdist import checkpoint

    checkpoint.save_torch(Path(folder) / "checkpoints" / "best.pt", {"w": torch.randn(300, 300)})


def save_picture(folder: str) -> None:
    """A noisy 300x300 PNG (~270 KB) through outputs.replacing, as predict's picture."""
    import numpy as np
    from PIL import Image

    from ffdist import outputs

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    with outputs.replacing(Path(folder) / "preds.png", mark="ffdist predict") as tmp:
        Image.fromarray(noise).save(tmp)


def test_a_disk_that_fills_up_during_a_write_is_one_sentence_and_leaves_no_temp_file(tmp_path):
    """100 KB free: each writer starts, and its disk fills up under it. TorchScript through
    torch's C++ writer would abort the process (SIGABRT: the child would exit 134 and the
    report below would be missing)."""
    disk = tmp_path / DISK
    here = "tests.fault.user_errors.test_storage"
    cases = [Case(name, call=f"{here}:{name}", args=[str(disk)])
             for name in ("export_torchscript", "save_checkpoint", "save_picture")]
    found = fs.on_disk(tmp_path, "free:100000", cases)
    targets = {"export_torchscript": disk / "model.torchscript.pt",
               "save_checkpoint": disk / "checkpoints" / "best.pt",
               "save_picture": disk / "preds.png"}
    for name, outcome in found.items():
        assert outcome.raised.startswith(f"StorageError: {targets[name]}: no space is left on "
                                         "its device (ENOSPC); free space there"), outcome
        assert not [f for f in outcome.leftovers() if Path(f).name.startswith(".")], outcome


def free_space(folder: str) -> None:
    """What the user does next: delete the file that filled the disk."""
    (Path(folder) / "filler.bin").unlink()


def test_a_disk_that_fills_up_during_training_then_the_run_resumes(tmp_path):
    """The step-8 checkpoint does not fit (each is ~0.8 MB): one sentence naming it, the
    step-4 checkpoint kept and no temp file; once space is freed, the same command resumes
    from step 4 and finishes."""
    disk = tmp_path / DISK
    argv = ["train", DIGITS, CPU, *FAST, "schedule.max_steps=12", "checkpoint.every_steps=4",
            f"output_dir={disk / 'run'}"]
    cases = [Case("full", argv), Case("free", call=f"{__name__}:free_space", args=[str(disk)]),
             Case("again", argv)]
    found = fs.on_disk(tmp_path, "free:1300000", cases, size="6M")
    full = found["full"]
    assert full.code == 2, full.err
    assert error_line(full.err) == (
        f"ffdist: error: {disk / 'run' / 'checkpoints' / 'step_00000008.pt'}: no space is left "
        "on its device (ENOSPC); free space there, or choose another output_dir.")
    assert "run/checkpoints/step_00000004.pt" in full.after
    assert not [f for f in full.leftovers() if ".tmp" in f or "write_test" in f], full.leftovers()
    again = found["again"]
    assert again.code == 0, again.err[-3000:]
    assert "run/model.pt" in again.after, again.err[-3000:]
    assert "resumed from step 4 " in again.out + again.err, again.out + again.err


# ------------------------------------------------------------------ names too long

LONG = "n" * 300


@pytest.mark.parametrize("argv", [
    ["samples", "--out", f"{{tmp}}/{LONG}"],
    ["shard", "{folder}", "--out", f"{{tmp}}/{LONG}"],
    ["bench", DIGITS, CPU, "--out", f"{{tmp}}/{LONG}.json"],
    ["launch", DIGITS, CPU, "launch.nproc=2", f"output_dir={{tmp}}/{LONG}/run"],
], ids=["samples", "shard", "bench", "launch"])
def test_a_name_longer_than_the_file_system_takes(capfd, tmp_path, inputs, argv):
    argv = [a.format(tmp=tmp_path, folder=inputs["folder"]) for a in argv]
    line = refused(in_process(capfd, cli.main, *argv), tmp_path)
    assert re.search(r"the name n+\.\.\. is 30[05] bytes, and its file system takes 255; "
                     r"choose a shorter (--out|output_dir)\.", line), line


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_name_that_fits_but_whose_temp_name_does_not(capfd, tmp_path, inputs, command):
    """250 bytes fit a name; the temp file written first (.<name>.<pid>.tmp<suffix>) would not."""
    out = tmp_path / ("p" * 246 + ".csv" if command == "predict" else "e" * 250)
    extra = [str(inputs["samples"])] if command == "predict" else ["--format", "torchscript"]
    line = refused(in_process(capfd, cli.main, command, str(inputs["run"]), *extra,
                              "--out", str(out)), tmp_path)
    assert f"(the temp name ffdist {command} writes first) is 2" in line, line
    assert line.endswith("choose a shorter --out."), line


def test_a_file_where_the_output_folder_goes(capfd, tmp_path):
    (tmp_path / "taken").write_text("a user's file")
    line = refused(in_process(capfd, cli.main, "samples", "--out", str(tmp_path / "taken" / "x")),
                   tmp_path)
    assert line == (f"ffdist: error: --out {tmp_path / 'taken' / 'x'} lies under "
                    f"{tmp_path / 'taken'}, which is a file, not a folder; choose another --out.")


def test_python_m_export_on_a_full_disk_exits_2_not_134(tmp_path, inputs):
    """The real process the user ran (`python -m ffdist.export`), on a full disk."""
    disk = tmp_path / DISK
    cmd = [*fs.UNSHARE, "sh", "-c",
           'mount -t tmpfs -o size=1M t "$1" && dd if=/dev/zero of="$1/fill" bs=4k 2>/dev/null;'
           ' exec "$2" -m ffdist.export "$3" --format torchscript --out "$1/m.pt"',
           "sh", str(disk), sys.executable, str(inputs["run"])]
    fs.skip_unless_possible()
    disk.mkdir()
    line = refused(cmd)
    assert "(ENOSPC)" in line and str(disk) in line


# ------------------------------------------------------------------ the table in the docs

def docs_rows() -> dict[str, list[str]]:
    """docs/failure-and-recovery.md's table of disks and names: first cell -> the quoted
    sentences of its last cell."""
    page = (Path(__file__).resolve().parents[3] / "docs" / "failure-and-recovery.md").read_text()
    section = page.split("## Disks, names and the standard streams", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split(" | ") for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {row[0].strip("| "): re.findall(r"`([^`]+)`", row[-1]) for row in rows[1:]}


def test_the_table_in_the_docs_quotes_what_the_code_says(capfd, tmp_path, monkeypatch):
    """Each row's sentence is the one the code writes (paths and sizes aside)."""
    import errno

    from ffdist import evaluate, outputs, run_dir, world
    from ffdist.errors import storage_error

    rows = docs_rows()
    (tmp_path / "F").write_text("a user's file")
    said = refused(in_process(capfd, cli.main, "samples", "--out", str(tmp_path / "F" / "x")))
    quote = rows["a file where the output folder goes"][0]
    assert said.removeprefix("ffdist: error: ") == quote.replace(
        "X", str(tmp_path / "F" / "x")).replace(" F,", f" {tmp_path / 'F'},")
    for row, code in (("a read-only file system (EROFS)", errno.EROFS),
                      ("a full disk (ENOSPC), a quota (EDQUOT)", errno.ENOSPC)):
        quote = rows[row][0]
        assert quote.startswith("...: ")
        assert str(storage_error(OSError(code, "x"), "p", "--out")) == "p" + quote[3:]
    with pytest.raises(outputs.StorageError) as e:  # more than any disk has
        outputs.check_folder(tmp_path, "ffdist export", outputs.Place("--out", file=True), 10**17)
    sizes = re.compile(r"[\d.]+ (bytes|KB|MB|GB|TB)")
    quote = rows["less room than the output needs"][0]
    assert sizes.sub("N", str(e.value)).endswith(sizes.sub("N", quote))
    quote = next(q for q in rows["`train`: a run folder or `checkpoints/` that takes no files"]
                 if q.startswith("output_dir="))
    assert run_dir._unwritable(Path("X"), Path("X"), OSError(errno.ENOSPC, "No space left on "
                                                            "device")) == quote
    quote = [q for q in next(v for k, v in rows.items() if k.startswith("a name (or the temp "))
             if q.startswith("output_dir=")][0]
    assert run_dir._path_error(Path("X"), OSError(errno.ENAMETOOLONG, "x")) == quote.replace(
        "...", "X", 1)
    quote = rows["`train`: a disk that fills up while writing a checkpoint, `best.pt` or "
                 "`model.pt`"][0]
    assert str(storage_error(OSError(errno.ENOSPC, "x"), ".../checkpoints/step_00000008.pt",
                             "output_dir")) == quote
    assert rows["`eval`: `RUN_DIR/eval/`, chosen by no option"][-1].removeprefix(
        "... ").rstrip(".") == evaluate.PLACE.elsewhere
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(world.EnvError) as env_error:
        world.int_env("WORLD_SIZE")
    quote = rows["a launcher variable that is not a number (`WORLD_SIZE=two`; `SLURM_NNODES=x` "
                 "in a Slurm job)"][-1]
    assert str(env_error.value).startswith(quote.removesuffix(" ..."))


def test_eval_under_torchrun_whose_report_folder_takes_no_files(tmp_path, inputs):
    """Only rank 0 writes the report; both ranks stop before any collective, with rank 0's
    sentence printed once (not rank 1 waiting for a peer that left)."""
    import shutil
    import subprocess

    from tests.helpers import BIN, REPO, env, free_port

    run = tmp_path / "run"
    shutil.copytree(inputs["run"], run)
    (run / "eval").write_text("a user's file where eval's folder goes")
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "ffdist.evaluate", str(run), "--set", "launch.device=cpu"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("ffdist: ")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    assert ours[0] == f"ffdist: error: {run / 'eval'} is a file, not a folder; move that file " \
                      "away, or evaluate a copy of the run folder kept on another disk.", ours
    assert (run / "eval").read_text().startswith("a user's file")
