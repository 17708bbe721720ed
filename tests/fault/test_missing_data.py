"""A recipe whose dataset is absent: one sentence, printed once, before any process group or
run directory exists (ffdist.data.presence), exit 2 from every rank."""

from __future__ import annotations

import re
import sys

import pytest

from ffdist import train
from ffdist.data.presence import TORCHVISION_FILES, check_present
from ffdist.errors import EXIT_USER_ERROR
from ffdist.recipe_load import load
from tests.helpers import CPU, RECIPES, run, torchrun

R50 = str(RECIPES / "resnet50.yaml")


def one_error(capfd, *args: str) -> str:
    code = train.main(list(args))
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == EXIT_USER_ERROR and len(lines) == 1, err
    assert lines[0].startswith("ffdist: error: ") and "Traceback" not in err
    return lines[0]


def test_imagenet_recipe_without_imagenet_says_where_how_and_smoke_test(capfd, tmp_path):
    out = tmp_path / "run"
    line = one_error(capfd, R50, f"data.root={tmp_path / 'imagenet'}", f"output_dir={out}")
    assert f"{R50}: data.root={tmp_path / 'imagenet'} does not exist" in line
    assert "train/n01440764/*.JPEG" in line and "val/" in line  # the layout to make
    assert "data.name=synthetic" in line  # how to try the recipe anyway
    assert not out.exists()


def test_imagefolder_without_val_names_the_missing_folder(capfd, tmp_path):
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    line = one_error(capfd, R50, f"data.root={tmp_path / 'imagenet'}",
                     f"output_dir={tmp_path / 'run'}")
    assert "has no val/ folder" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(TORCHVISION_FILES))
def test_torchvision_dataset_without_files_suggests_download(capfd, tmp_path, name):
    line = one_error(capfd, str(RECIPES / "digits.yaml"), f"data.name={name}",
                     f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}")
    assert f"no {name} files in data.root={tmp_path}" in line
    assert TORCHVISION_FILES[name][0] in line  # the sub-folder torchvision reads
    assert "data.download=true" in line and "data.name=synthetic" in line
    assert not (tmp_path / "run").exists()


def test_torchvision_files_in_place_pass_and_download_is_not_checked(tmp_path):
    """The check looks for exactly the files torchvision reads: with them it passes (and
    with data.download=true it leaves the fetching to torchvision)."""
    cfg = load(str(RECIPES / "cifar10_resnet18.yaml"), [f"data.root={tmp_path}"]).data
    with pytest.raises(Exception, match="data_batch_1"):
        check_present(cfg)
    sub, files = TORCHVISION_FILES["cifar10"]
    (tmp_path / sub).mkdir()
    for f in files:
        (tmp_path / sub / f).write_bytes(b"")
    check_present(cfg)
    (tmp_path / sub / "test_batch").unlink()
    with pytest.raises(Exception, match="test_batch"):
        check_present(cfg)
    check_present(load(str(RECIPES / "cifar10_resnet18.yaml"),
                       [f"data.root={tmp_path / 'none'}", "data.download=true"]).data)


def test_filelist_without_its_list(capfd, tmp_path):
    line = one_error(capfd, str(RECIPES / "digits.yaml"), "data.name=filelist",
                     f"data.train_list={tmp_path / 'train.txt'}",
                     f"data.val_list={tmp_path / 'val.txt'}", f"output_dir={tmp_path / 'run'}")
    assert f"data.train_list={tmp_path / 'train.txt'} does not exist" in line


def test_missing_data_is_reported_before_torch_is_imported(tmp_path):
    """Early means cheap: no torch import, no process group (a second or less)."""
    code = ("import sys; from ffdist import train\n"
            f"rc = train.main([{R50!r}, 'data.root={tmp_path}/x', 'output_dir={tmp_path}/run'])\n"
            "print(rc, 'torch' in sys.modules)")
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr


def test_two_ranks_print_the_sentence_once_and_leave_no_run_dir(tmp_path):
    """torchrun: rank 0's line, and torchrun's summary (its own traceback of ChildFailedError
    comes with any failing worker). Rank 1 either exits 2 itself, its error file a pointer to
    rank 0's message, or is stopped by torchrun (SIGTERM) once rank 0 has failed."""
    out = tmp_path / "run"
    proc = torchrun("resnet50.yaml", CPU, f"data.root={tmp_path / 'imagenet'}",
                    f"output_dir={out}", check=False, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    ffdist_lines = [ln for ln in text.splitlines() if ln.startswith("ffdist:")]
    assert len(ffdist_lines) == 1 and ffdist_lines[0].startswith("ffdist: error: "), text
    sentence = ffdist_lines[0].removeprefix("ffdist: error: ")
    assert text.count(sentence) == 2, text  # the line, and rank 0's entry in the summary
    codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)", text))
    # whichever rank failed first exits 2, torchrun stops the other (SIGTERM) or it exits 2
    assert "2" in codes.values() and set(codes.values()) <= {"2", "-15"}, text
    if codes.get("1") == "2":
        assert "rank 1 of 2 stopped on the same error as rank 0" in text
    assert "Original Traceback" not in text and "ffdist/" not in text.replace(R50, "")
    assert not out.exists()


def test_every_rank_exits_2_and_only_rank_0_prints(tmp_path):
    """Ranks started side by side (as srun starts them, no agent to stop the others): every
    one exits 2, one line in all."""
    import subprocess

    from tests.helpers import REPO, env

    procs = [subprocess.Popen([sys.executable, "-m", "ffdist.train", R50, CPU,
                               f"data.root={tmp_path / 'imagenet'}", f"output_dir={tmp_path / 'run'}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT="1"))
             for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    lines = [ln for out, err in results for ln in (out + err).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffdist: error: "), lines
    assert results[0][1].strip() == lines[0]  # rank 0 printed it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank,local_rank,prints", [(0, 0, True), (1, 1, False), (2, 0, True)])
def test_first_rank_of_each_node_prints_others_leave_torchrun_a_pointer(
        capsys, monkeypatch, tmp_path, rank, local_rank, prints):
    """DataMissing (per node: nodes may hold their own copy of the data): rank 0 and the first
    rank of every other node print the sentence; the rest print nothing and leave torchrun's
    summary a pointer instead of the sentence again."""
    import json

    from ffdist.data.presence import DataMissing
    from ffdist.errors import RecipeError, report

    error_file = tmp_path / "error.json"
    for k, v in {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 2,
                 "TORCHELASTIC_ERROR_FILE": error_file}.items():
        monkeypatch.setenv(k, str(v))
    report(DataMissing("no data there."))
    err = capsys.readouterr().err
    message = json.loads(error_file.read_text())["message"]
    if prints:
        assert err.strip().endswith("no data there.") and message == err.strip()
    else:
        assert err == "" and message == (f"ffdist: rank {rank} of 4 stopped on the same error "
                                         "as rank 0 (its message above).")
    report(RecipeError("bad key."))  # alike on every rank of every node: rank 0 alone prints
    assert bool(capsys.readouterr().err) == (rank == 0)


def test_ffdist_launch_checks_the_data_before_starting_torchrun(tmp_path):
    """`ffdist launch` (2 CPU ranks under torchrun): the sentence alone, no launcher output."""
    proc = run([sys.executable, "-m", "ffdist.cli", "launch", R50, CPU, "launch.nproc=2",
                f"data.root={tmp_path / 'imagenet'}", f"output_dir={tmp_path / 'run'}"],
               check=False, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffdist: error: "), lines
    assert "does not exist" in lines[0] and not (tmp_path / "run").exists()
