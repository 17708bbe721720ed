"""Mistakes about runs, checkpoints, devices and the other commands: a run directory that
holds another or a finished run, a checkpoint of another model or with weights that do not
fit, a GPU that does not exist, an output_dir that takes no files, export without weights,
and eval/plan/bench given an image size the model cannot take. One sentence with the fix,
exit 2, no traceback, and the run directory byte for byte as it was.

Through the functions behind the CLI (ffdist.train.main, ffdist.cli.main), in this process:
the real-process path of each refusal is the same printer (tests/fault/test_one_printer.py).
"""

from __future__ import annotations

import torch

from ffdist import train
from ffdist.cli import main as cli
from tests.fault import kit
from tests.fault.user_errors.common import DIGITS, train_main
from tests.helpers import RECIPES, cuda_gpus, in_process, refused, snapshot

# a size small_cnn's max-pool leaves nothing of (ffdist.preflight)
TINY = ("data.name=synthetic", "data.image_size=1")

# ------------------------------------------------------------------ run directories


def test_num_classes_differs_from_checkpoint(capfd, existing_run):
    line = refused(train_main(capfd, "data.name=synthetic", "model.num_classes=12",
                              f"output_dir={existing_run}", *kit.ARGS), existing_run)
    assert "already holds a finished run, and this recipe differs in model.num_classes " \
           "(10 -> 12), data.name (digits -> synthetic)" in line


def test_finished_run_is_never_overwritten(capfd, existing_run):
    before = snapshot(existing_run)
    line = refused(train_main(capfd, f"output_dir={existing_run}", "checkpoint.resume=never",
                              *kit.ARGS), existing_run)
    assert "already holds a run and checkpoint.resume=never" in line
    # resume=auto (the default) on a finished run: nothing to do, exit 0, nothing rewritten
    assert train.main([DIGITS, f"output_dir={existing_run}", *kit.ARGS]) == 0
    assert "already holds the finished run (step 30); nothing to do" in capfd.readouterr().out
    assert snapshot(existing_run) == before


def test_output_dir_not_writable(capfd, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder must go: fails even for root
    line = refused(train_main(capfd, f"output_dir={blocker / 'run'}", *kit.ARGS), blocker)
    assert f"output_dir={blocker / 'run'} is not writable" in line


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_of_another_model(capfd, ref1, tmp_path):
    ckpt = ref1 / "checkpoints" / "step_00000030.pt"
    out = tmp_path / "out"
    line = refused(train_main(capfd, "model.name=lenet", f"checkpoint.resume={ckpt}",
                              f"output_dir={out}", *kit.ARGS), out, ckpt)
    assert f"checkpoint {ckpt} (step 30) was trained with another model.name (small_cnn -> " \
           "lenet), which a resumed run cannot change" in line
    # (a checkpoint without its recipe is incomplete: tests/unit/test_ckpt_format.py)


def test_checkpoint_whose_weights_do_not_fit_names_the_first_key(capfd, ref1, tmp_path):
    """Its recipe matches, its weights do not (edited, or from another version of a model):
    the first key that differs, not load_state_dict's multi-line error after the run
    directory was written."""
    state = torch.load(ref1 / "checkpoints" / "step_00000030.pt", weights_only=True)
    state["model"]["head.weight"] = torch.zeros(10, 256)  # small_cnn's head takes 512
    torch.save(state, tmp_path / "shape.pt")
    del state["model"]["head.bias"]
    torch.save(state, tmp_path / "key.pt")
    out = tmp_path / "out"
    line = refused(train_main(capfd, f"checkpoint.resume={tmp_path / 'shape.pt'}",
                              f"output_dir={out}", *kit.ARGS), out)
    assert f"checkpoint {tmp_path / 'shape.pt'}: key 'head.weight' has shape [10, 256] but " \
           "this model's is [10, 512]" in line
    line = refused(train_main(capfd, f"checkpoint.resume={tmp_path / 'key.pt'}",
                              f"output_dir={out}", *kit.ARGS), out)
    assert f"checkpoint {tmp_path / 'key.pt'} comes from model.name=small_cnn: key 'head.bias' " \
           "is missing from it (1 missing, 0 unexpected)" in line


# ------------------------------------------------------------------ devices

def test_gpu_that_does_not_exist(capfd, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    missing = cuda_gpus()  # ids are 0..count-1 here: this one never exists
    out = tmp_path / "out"
    line = refused(train_main(capfd, f"launch.gpus=[{missing}]", f"output_dir={out}"), out)
    assert f"launch.gpus=[{missing}] names GPU {missing}" in line


# ------------------------------------------------------------------ other commands

def test_export_without_weights_names_its_own_flag(capfd, tmp_path):
    from ffdist import recipe_load

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_load.load(RECIPES / "digits.yaml").to_yaml())
    line = refused(in_process(capfd, cli, "export", str(run), "--format", "onnx"), run)
    assert line.endswith("name the weights with --checkpoint PATH.")  # all three take it


def test_eval_of_a_folder_that_does_not_exist_says_so(capfd, tmp_path):
    gone = tmp_path / "runs" / "nope"
    line = refused(in_process(capfd, cli, "eval", str(gone)), tmp_path)
    assert line == (f"ffdist: error: {gone} does not exist; give the folder of a training run "
                    f"({tmp_path / 'runs'} does not exist either).")
    (tmp_path / "runs").mkdir()
    line = refused(in_process(capfd, cli, "eval", str(gone)), tmp_path)
    assert line.endswith(f"(`ffdist runs {tmp_path / 'runs'}` lists the runs there).")
    line = refused(in_process(capfd, cli, "predict", str(DIGITS), DIGITS, "--out",
                              str(tmp_path / "p.csv")), tmp_path)
    assert line.startswith(f"ffdist: error: {DIGITS} is a file; give the folder of a training run")


def test_eval_at_an_image_size_the_model_cannot_take(capfd, existing_run):
    sets = [arg for item in TINY for arg in ("--set", item)]  # eval overrides with --set
    line = refused(in_process(capfd, cli, "eval", str(existing_run), *sets), existing_run)
    assert "model.name=small_cnn cannot take 1x1 images (data.image_size=1)" in line


def test_plan_at_an_image_size_the_model_cannot_take(capfd):
    line = refused(in_process(capfd, cli, "plan", DIGITS, *TINY), progress="plan: ")
    assert "model.name=small_cnn cannot take 1x1 images (data.image_size=1)" in line


def test_bench_at_an_image_size_the_model_cannot_take(capfd, tmp_path):
    out = tmp_path / "bench.json"
    line = refused(in_process(capfd, cli, "bench", DIGITS, *TINY, "--steps", "2", "--out",
                              str(out)), out)
    assert "model.name=small_cnn cannot take 1x1 images (data.image_size=1)" in line
