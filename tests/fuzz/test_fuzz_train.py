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

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ffdist import train
from tests.fuzz import strategies as S
from tests.fuzz.conftest import examples, no_traceback, snapshot
from tests.helpers import RECIPES, env

# make test-all only: random cases of paths the fast tier covers with fixed ones
# (tests/fault/user_errors/); `make fuzz` is the long run.
pytestmark = pytest.mark.extended

OK_CODES = (0, 2, 3, 75)
FAST = ("log.progress=false",)

wild_floats = st.one_of(st.floats(-0.5, 2.0), st.sampled_from([0.0, 1.0, 1e-9, 1e30, -1.0]),
                        st.sampled_from(["nan", "inf", "-inf", "fast"]))
unit = st.floats(0.0, 0.95)
# key -> (values a user means, values past the edge); 4 in 5 draws take the first
KNOBS = {
    "optim.name": (st.sampled_from(["sgd", "adamw"]), st.just("adam")),
    "optim.lr": (st.floats(1e-4, 0.5), wild_floats),
    "optim.momentum": (unit, wild_floats),
    "optim.nesterov": (st.booleans(), st.just("maybe")),
    "optim.betas": (st.tuples(unit, unit).map(list), st.lists(st.floats(-0.5, 1.5), max_size=3)),
    "optim.weight_decay": (st.floats(0, 0.1), wild_floats),
    "optim.label_smoothing": (st.floats(0, 0.5), wild_floats),
    "optim.grad_clip": (st.one_of(st.none(), st.floats(0.01, 10)), wild_floats),
    "data.batch_size": (st.sampled_from([8, 16, 32, 64, 100]),
                        st.sampled_from([-1, 0, 1, 3, 1437, 5000])),
    "data.micro_batch_size": (st.sampled_from([None, 4, 8, 16]), st.integers(-1, 40)),
    "data.eval_batch_size": (st.sampled_from([None, 1, 7, 500]), st.integers(-1, 0)),
    "data.num_workers": (st.sampled_from([0, 0, 0, 1]), st.just(-1)),
    "data.prefetch_factor": (st.integers(1, 3), st.integers(-1, 0)),
    "data.augment": (st.booleans(), st.just("yes")),
    "data.val_fraction": (st.floats(0.1, 0.5), wild_floats),
    "data.image_size": (st.sampled_from([None, 8, 12, 16]), st.integers(-1, 7)),
    "data.synthetic_size": (st.integers(20, 200), st.integers(-1, 19)),
    "data.bad_images": (st.sampled_from(["skip", "error"]), st.just("ignore")),
    "data.max_bad_fraction": (st.floats(0, 1), wild_floats),
    "model.name": (st.sampled_from(["small_cnn", "lenet", "resnet18"]), st.just("nope")),
    "model.num_classes": (st.sampled_from([2, 10]), st.integers(-1, 12)),
    "model.in_channels": (st.sampled_from([1, 3]), st.integers(0, 4)),
    "model.cifar_stem": (st.booleans(), st.just(3)),
    "model.pool": (st.sampled_from(["avg", "gem"]), st.just("max")),
    "model.dropout": (st.floats(0, 0.9), wild_floats),
    "model.channels_last": (st.booleans(), st.just([])),
    "model.freeze": (st.sampled_from(["[]", "[backbone]"]), st.sampled_from(["[nope]", "x"])),
    "precision": (st.sampled_from(["fp32", "bf16", "fp16", "auto"]), st.just("fp8")),
    "seed": (st.integers(0, 5), st.sampled_from([-2, 2**40])),
    "schedule.epochs": (st.integers(1, 3), st.integers(-1, 0)),
    "schedule.scheduler": (st.sampled_from(["cosine", "step", "multistep", "constant"]),
                           st.just("linear")),
    "schedule.warmup_epochs": (st.floats(0, 2), wild_floats),
    "schedule.warmup_start_factor": (st.floats(0.01, 1), wild_floats),
    "schedule.step_size": (st.integers(1, 3), st.integers(-1, 0)),
    "schedule.milestones": (st.lists(st.integers(0, 3), max_size=3), st.just("{}")),
    "schedule.gamma": (st.floats(0.01, 1), wild_floats),
    "schedule.min_lr": (st.floats(0, 0.01), wild_floats),
    "schedule.eval_every_epochs": (st.integers(1, 2), st.integers(-1, 0)),
    "schedule.evaluate_before_train": (st.booleans(), st.just("x")),
    "schedule.nan_policy": (st.sampled_from(["stop", "skip"]), st.just("ignore")),
    "schedule.max_bad_steps": (st.integers(1, 3), st.integers(-1, 0)),
    "strategy.name": (st.sampled_from(["auto", "single", "ddp"]), st.just("fsdp")),
    "strategy.sync_bn": (st.booleans(), st.just(2)),
    "checkpoint.every_epochs": (st.integers(1, 2), st.integers(-1, 0)),
    "checkpoint.every_steps": (st.integers(0, 2), st.just(-1)),
    "checkpoint.keep_last": (st.integers(1, 2), st.integers(-1, 0)),
    "checkpoint.keep_best": (st.booleans(), st.just("no")),
    "checkpoint.resume": (st.sampled_from(["auto", "auto", "never", "extend"]),
                          st.sampled_from(["/nonexistent/x.pt", "recipe.yaml", ""])),
    "log.every_steps": (st.integers(1, 3), st.integers(-1, 0)),
    "log.tensorboard": (st.sampled_from([False, False, False, True]), st.just("on")),
    "log.sinks": (st.sampled_from([["jsonl"], ["progress", "jsonl"], []]),
                  st.sampled_from([["jsonl", "jsonl"], ["tensorbord"], "jsonl", [3]])),
    "log.images": (st.booleans(), st.just(5)),
    "launch.gpus": (st.just("[]"), st.sampled_from(["[7]", "0", "[-1]"])),
    "name": (st.sampled_from(["a", "run_2", "é"]), S.weird_text),
}


@st.composite
def runs(draw: st.DrawFn) -> list[str]:
    # The mix (which keys, usual or wild values) comes from a plain Random seeded by
    # Hypothesis: its own draws favour the first choices and small values, and most cases
    # would stop at a refusal.
    rnd = draw(st.randoms(use_true_random=True))
    items = []
    for key in rnd.sample(sorted(KNOBS), rnd.randint(0, 4)):
        usual, wild = KNOBS[key]
        items.append(f"{key}={S.render(draw(wild if rnd.random() < 0.15 else usual))}")
    if rnd.random() < 0.15:
        items += draw(S.overrides(max_size=2))  # anything at all
    # always last, so that no case trains for long
    items.append(f"schedule.max_steps={rnd.choice([1, 2, 3, 3, 3, 3, 3, 3, 3, 0, -1])}")
    return items


@st.composite
def cases(draw: st.DrawFn) -> dict:
    rnd = draw(st.randoms(use_true_random=True))
    data = rnd.choice(["digits"] * 4 + ["synthetic"] * 2 + ["imagefolder"] * 2 + ["filelist",
                                                                                  "mnist"])
    base = [f"data.name={data}"]
    layout = draw(S.image_folders()) if data in ("imagefolder", "filelist") else None
    if rnd.random() < 0.85:  # mostly a consistent recipe for the data
        if data != "digits":  # mnist is 28x28 whatever the recipe says: no image_size
            base += ["model.in_channels=3"] + (["data.image_size=8"] if data != "mnist" else [])
        if layout is not None:
            n = len(layout["train"])
            base += [f"model.num_classes={max(n, 2)}", "data.batch_size=2",
                     "data.max_bad_fraction=0.6"]
    second = draw(runs()) if rnd.random() < 0.4 else None
    sep = rnd.choice([" ", ",", "\t"])
    # sometimes output_dir is a user's folder already (not an ffdist run): never trained into
    occupied = rnd.random() < 0.1
    return {"data": data, "base": base, "first": draw(runs()), "second": second,
            "layout": layout, "sep": sep, "occupied": occupied}


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
        if case["occupied"]:
            (box / "out").mkdir()
            (box / "out" / "notes.txt").write_text("a user's file\n")
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
            event(f"exit {code}")  # the mix, in --hypothesis-show-statistics
            if case["occupied"]:
                assert code != 0, "trained into a folder that is not an ffdist run"
        assert snapshot(box, skip=out) == before, "something outside output_dir changed"
        if case["occupied"]:
            assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
            assert (out / "notes.txt").read_text() == "a user's file\n"


# make test-all only; the fast tier covers its path: test_train_contract_in_process (the same
# contract), test_one_printer (the CLI's exit codes)
@pytest.mark.extended
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
