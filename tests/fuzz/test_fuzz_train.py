"""Fuzz training end to end: random overrides (plausible keys, values in and out of range)
on small data (digits, synthetic, random image folders and file lists), sometimes a second
run into the same output_dir. The contract:
    exit 0, 2, 3 or 75 (never another code, never an exception out of main),
    no traceback in the output, at most one "ffdist: error" line,
    nothing outside output_dir changes (the data, the recipe, the working directory).
Most cases run in-process through ffdist.train.main (the function behind the CLI); a few
as real processes. Excluded on purpose: strategy.name=deepspeed (a 100 s JIT build on
first use), model.compile (inductor compiles for minutes), data.download (the network).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ffdist import train
from tests.fuzz import strategies as S
from tests.fuzz.conftest import examples, no_traceback, snapshot
from tests.helpers import RECIPES, env

OK_CODES = (0, 2, 3, 75)
FAST = ("log.progress=false",)

floats = st.one_of(st.floats(-0.5, 2.0), st.sampled_from([0.0, 1.0, 1e-9, 1e30, -1.0]),
                   st.sampled_from(["nan", "inf", "-inf", "fast"]))
PLAUSIBLE = {
    "optim.name": st.sampled_from(["sgd", "adamw", "adam"]),
    "optim.lr": floats,
    "optim.momentum": floats,
    "optim.nesterov": st.booleans(),
    "optim.betas": st.lists(st.floats(-0.5, 1.5), max_size=3),
    "optim.weight_decay": floats,
    "optim.label_smoothing": floats,
    "optim.grad_clip": st.one_of(st.none(), floats),
    "data.batch_size": st.one_of(st.integers(-1, 70), st.sampled_from([1, 2, 3, 1437, 5000])),
    "data.micro_batch_size": st.one_of(st.none(), st.integers(-1, 40)),
    "data.eval_batch_size": st.one_of(st.none(), st.integers(-1, 500)),
    "data.num_workers": st.sampled_from([0, 0, 0, 1, -1]),
    "data.prefetch_factor": st.integers(-1, 3),
    "data.augment": st.booleans(),
    "data.val_fraction": floats,
    "data.image_size": st.one_of(st.none(), st.integers(-1, 40)),
    "data.synthetic_size": st.integers(-1, 200),
    "data.bad_images": st.sampled_from(["skip", "error", "ignore"]),
    "data.max_bad_fraction": floats,
    "model.name": st.sampled_from(["small_cnn", "lenet", "resnet18", "nope"]),
    "model.num_classes": st.integers(-1, 12),
    "model.in_channels": st.integers(0, 4),
    "model.cifar_stem": st.booleans(),
    "model.pool": st.sampled_from(["avg", "gem", "max"]),
    "model.dropout": floats,
    "model.channels_last": st.booleans(),
    "model.freeze": st.sampled_from(["[]", "[backbone]", "[nope]", "features"]),
    "precision": st.sampled_from(["fp32", "bf16", "fp16", "auto", "fp8"]),
    "seed": st.one_of(st.integers(-2, 5), st.just(2**40)),
    "schedule.epochs": st.integers(-1, 3),
    "schedule.scheduler": st.sampled_from(["cosine", "step", "multistep", "constant", "linear"]),
    "schedule.warmup_epochs": floats,
    "schedule.warmup_start_factor": floats,
    "schedule.step_size": st.integers(-1, 3),
    "schedule.milestones": st.lists(st.integers(-1, 3), max_size=3),
    "schedule.gamma": floats,
    "schedule.min_lr": floats,
    "schedule.eval_every_epochs": st.integers(-1, 2),
    "schedule.evaluate_before_train": st.booleans(),
    "schedule.nan_policy": st.sampled_from(["stop", "skip", "ignore"]),
    "schedule.max_bad_steps": st.integers(-1, 3),
    "strategy.name": st.sampled_from(["auto", "single", "ddp", "fsdp"]),
    "strategy.sync_bn": st.booleans(),
    "checkpoint.every_epochs": st.integers(-1, 2),
    "checkpoint.every_steps": st.integers(-1, 2),
    "checkpoint.keep_last": st.integers(-1, 2),
    "checkpoint.keep_best": st.booleans(),
    "checkpoint.resume": st.sampled_from(["auto", "never", "extend", "/nonexistent/x.pt",
                                          "recipe.yaml"]),
    "log.every_steps": st.integers(-1, 3),
    "log.tensorboard": st.sampled_from([False, False, False, True]),
    "log.images": st.booleans(),
    "launch.gpus": st.sampled_from(["[]", "[7]", "0"]),
    "name": S.weird_text,
}


@st.composite
def runs(draw: st.DrawFn) -> list[str]:
    picks = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=6, unique=True))
    items = [f"{k}={S.render(draw(PLAUSIBLE[k]))}" for k in picks]
    if draw(st.integers(0, 4)) == 0:
        items += draw(S.overrides(max_size=2))  # anything at all
    # always last, so that no case trains for long
    items.append(f"schedule.max_steps={draw(st.sampled_from([1, 2, 3, 3, 0, -1]))}")
    return items


@st.composite
def cases(draw: st.DrawFn) -> dict:
    data = draw(st.sampled_from(["digits", "digits", "synthetic", "imagefolder", "filelist",
                                 "mnist"]))
    base = [f"data.name={data}"]
    if data != "digits" and draw(st.integers(0, 4)):
        base += ["model.in_channels=3", "data.image_size=8"]  # mostly consistent
    if data in ("imagefolder", "filelist") and draw(st.integers(0, 4)):
        base += ["model.num_classes=2", "data.batch_size=2"]
    layout = draw(S.image_folders()) if data in ("imagefolder", "filelist") else None
    second = draw(st.one_of(st.none(), runs()))
    sep = draw(st.sampled_from([" ", ",", "\t"]))
    return {"data": data, "base": base, "first": draw(runs()), "second": second,
            "layout": layout, "sep": sep}


@contextlib.contextmanager
def sandbox(case: dict):
    """A working directory holding the data and a copy of the recipe; yields the paths and
    the overrides that point at them."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as box:
        box = Path(box)
        (box / "recipe.yaml").write_text((RECIPES / "digits.yaml").read_text())
        extra = []
        if case["layout"] is not None:
            root = S.write_folder(box / "data", case["layout"])
            extra.append(f"data.root={root}")
            if case["data"] == "filelist":
                for split in ("train", "val"):
                    files = sorted(p for p in (root / split).rglob("*") if p.is_file())
                    names = sorted({p.parent.name for p in files})
                    lines = [f"{p.relative_to(root)}{case['sep']}{names.index(p.parent.name)}"
                             for p in files]
                    (box / f"{split}.txt").write_text("\n".join(lines) + "\n")
                extra += [f"data.train_list={box / 'train.txt'}", f"data.val_list={box / 'val.txt'}",
                          f"data.list_sep={case['sep']}"]
        os.chdir(box)
        try:
            yield box, box / "out", extra
        finally:
            os.chdir(old)


def check_result(code: int, out: str, err: str) -> None:
    assert code in OK_CODES, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    no_traceback(out + err)
    errors = [ln for ln in err.splitlines() if ln.startswith("ffdist: error")]
    assert len(errors) <= 1, err
    if code == 2:
        assert len(errors) == 1, f"exit 2 without its sentence:\n{err[-3000:]}"


@settings(max_examples=examples("train"))
@given(case=cases())
def test_train_contract_in_process(case, capfd):
    with sandbox(case) as (box, out, extra):
        before = snapshot(box, skip=out)
        for overrides in filter(None, [case["first"], case["second"]]):
            args = [str(box / "recipe.yaml"), *FAST, *case["base"], *extra, *overrides,
                    f"output_dir={out}"]
            try:
                code = train.main(args)
            except SystemExit as e:  # argparse-like exits are fine if they are 2
                code = e.code
            captured = capfd.readouterr()
            check_result(code, captured.out, captured.err)
        assert snapshot(box, skip=out) == before, "something outside output_dir changed"


@settings(max_examples=examples("real"))
@given(case=cases())
def test_train_contract_real_process(case):
    with sandbox(case) as (box, out, extra):
        before = snapshot(box, skip=out)
        for overrides in filter(None, [case["first"], case["second"]]):
            proc = subprocess.run([sys.executable, "-m", "ffdist.train", str(box / "recipe.yaml"),
                                   *FAST, *case["base"], *extra, *overrides, f"output_dir={out}"],
                                  cwd=box, env=env(), capture_output=True, text=True, timeout=300)
            check_result(proc.returncode, proc.stdout, proc.stderr)
        assert snapshot(box, skip=out) == before, "something outside output_dir changed"
