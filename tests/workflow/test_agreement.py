"""One place decides a run: resolve(), `ffdist plan --json`, bench's, eval's and train's setups
agree on the batch plan, the precision and the trainable parameter count, for digits,
ResNet-50 with model.freeze and a ZeRO recipe, x every precision setting, x with and
without `accelerate launch --mixed_precision` (ACCELERATE_MIXED_PRECISION); where one
refuses a combination, all refuse it with the same sentence.

Each environment is a fresh process (tests/workflow/agreement_probe.py), as a launcher
would start it. No forward pass of ResNet-50 beyond plan's activation measurement, which
runs at 32x32 (data.image_size=32 on synthetic data, so that train/bench/eval can build
their data streams without ImageNet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import BIN, FAST, RECIPES, free_port, run

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESNET50 = ("model.freeze=[backbone]", "data.name=synthetic", "data.image_size=32",
            "data.synthetic_size=1300", "data.num_workers=0")  # 1,040 train images >= 1,024
RECIPE_ARGS = {"digits.yaml": (), "resnet50.yaml": RESNET50, "digits_zero2.yaml": ()}
# torchvision's ResNet-50: 25,557,032 parameters; frozen backbone leaves fc (2048 x 1000 + 1000)
RESNET50_PARAMS, RESNET50_FC = 25_557_032, 2048 * 1000 + 1000
ENTRY = ("plan", "bench", "train")  # the ones that must refuse what training cannot run


# Every precision on digits; on ResNet-50 (the freeze count) and ZeRO-2 (the engine) the
# ones that decide something new: auto and fp32 builds, fp16's refusal under DeepSpeed.
PRECISIONS_OF = {"digits.yaml": PRECISIONS, "resnet50.yaml": ("auto", "fp32"),
                 "digits_zero2.yaml": ("auto", "fp16")}


def cases(tmp: Path, recipes: tuple[str, ...], precisions: tuple[str, ...],
          of: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    return [{"recipe": str(RECIPES / r), "name": r, "precision": p,
             "overrides": [*FAST, *RECIPE_ARGS[r], f"precision={p}",
                           f"output_dir={tmp / f'{r}_{p}'}"]}
            for r in recipes for p in precisions if of is None or p in of[r]]


def probe(tmp: Path, todo: list[dict], launcher: list[str], **env: str) -> list[dict]:
    (tmp / "cases.json").write_text(json.dumps(todo))
    run([*launcher, "-m", "tests.workflow.agreement_probe", str(tmp / "cases.json"),
         str(tmp / "out.json")], timeout=600, **env)
    return json.loads((tmp / "out.json").read_text())


def code_and_error(r: dict) -> tuple[int, str]:
    return r["code"], r["error"]


def check_agreement(case: dict, r: dict) -> None:
    """Every entry point's outcome equals resolve()'s (eval: resolve(trains=False))."""
    where = f"{case['name']} precision={case['precision']}"
    ref, ref_eval = r["resolve"], r["resolve_eval"]
    for name in ENTRY:
        assert code_and_error(r[name]) == code_and_error(ref), (where, name, r[name], ref)
    assert code_and_error(r["eval"]) == code_and_error(ref_eval), (where, r["eval"], ref_eval)
    if ref["code"] == 0:
        want, n = ref["facts"], r["plan"]["facts"]
        counts = {"params": n["params"], "trainable_params": n["trainable_params"]}
        assert n == {**want, **counts}, (where, "plan")
        for name in ("bench", "train"):
            got = r[name]["facts"]
            assert {k: got[k] for k in (*want, *counts)} == {**want, **counts}, (where, name)
            check_built(got, want, f"{where} {name}")
        assert r["bench"]["facts"]["reported"] == {**want, **counts}, (where, "bench.json")
    if ref_eval["code"] == 0:
        got = r["eval"]["facts"]
        assert {k: got[k] for k in ref_eval["facts"]} == ref_eval["facts"], where
        assert got["loader_plan"], where
        check_counts(case["name"], got["params"], got["trainable_params"])
        if ref["code"] == 0:
            assert got["trainable_params"] == r["train"]["facts"]["trainable_params"], where


def check_built(got: dict, want: dict, where: str) -> None:
    """What the data streams and the strategy really do with the resolved values."""
    assert got["loader_plan"] and got["loader_micro"] == want["micro"], where
    assert got["spec_image_size"] == want["image_size"], where
    assert got["forward_dtype"] == want["precision"], where
    if "ds" in got:  # the DeepSpeed config was derived from the same plan and precision
        assert got["ds"] == [want["global_batch"], want["micro"], want["accum"],
                             want["precision"] == "bf16", want["precision"] == "fp16"], where
    else:
        assert got["scaler"] == (want["precision"] == "fp16"), where
    check_counts_of(got, where)


def check_counts_of(got: dict, where: str) -> None:
    name = where.split()[0]
    check_counts(name, got["params"], got["trainable_params"])


def check_counts(name: str, params: int, trainable: int) -> None:
    if name == "resnet50.yaml":  # model.freeze=[backbone] applied by every entry point
        assert (params, trainable) == (RESNET50_PARAMS, RESNET50_FC)
    else:
        assert params == trainable > 0


def check_expected(case: dict, r: dict, launcher_bf16: bool) -> None:
    """Absolute expectations, where they do not depend on the machine."""
    p, ref = case["precision"], r["resolve"]
    if launcher_bf16:
        if p in ("auto", "bf16"):
            assert ref["facts"]["precision"] == "bf16"
        else:
            assert ref["code"] == 2 and f"contradicts the recipe's precision={p}" in ref["error"]
            assert r["resolve_eval"]["code"] == 2  # not a training-only refusal
    elif p != "auto":
        if p == "fp16" and case["name"] == "digits_zero2.yaml" and r["device"] == "cpu":
            assert ref["code"] == 2 and "fp16 with DeepSpeed needs a GPU" in ref["error"]
            assert r["resolve_eval"]["facts"]["precision"] == "fp16"  # eval runs the plain model
        else:
            assert ref["facts"]["precision"] == p
    if ref["code"] == 0 and case["name"] == "digits_zero2.yaml":
        assert ref["facts"]["strategy"] == "deepspeed" and ref["facts"]["accum"] == 4  # 64/1/16


# make test-all: accelerate_bf16; the fast tier keeps plain (the same agreement of every
# entry point), and the accelerate launcher runs in tests/integration/test_launchers.py
@pytest.mark.parametrize("launcher_bf16", [False, pytest.param(True, marks=pytest.mark.extended)],
                         ids=["plain", "accelerate_bf16"])
def test_every_entry_point_agrees(tmp_path: Path, launcher_bf16: bool):
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"} if launcher_bf16 else {}
    todo = cases(tmp_path, tuple(RECIPE_ARGS), PRECISIONS, PRECISIONS_OF)
    results = probe(tmp_path, todo, [sys.executable], **env)
    assert len(results) == len(todo) == 8
    for case, r in zip(todo, results):
        check_agreement(case, r)
        check_expected(case, r, launcher_bf16)


@pytest.mark.slow
# make test-all only; the fast tier covers its path: the 1-process agreement, test_plan's world
# sizes
@pytest.mark.extended
def test_two_ranks_agree_under_torchrun(tmp_path: Path):
    """World size 2: the per-rank batch and accumulation change; DDP and ZeRO-2 engines are
    built for real (gloo), and plan --world-size 2 predicts them."""
    todo = cases(tmp_path, ("digits.yaml", "digits_zero2.yaml"), ("auto", "fp32"))
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    # CPU ranks whatever GPUs the machine has (ffdist.dist honours ACCELERATE_USE_CPU): two
    # ranks must not need two GPUs.
    results = probe(tmp_path, todo, launcher, ACCELERATE_USE_CPU="1")
    for case, r in zip(todo, results):
        check_agreement(case, r)
        facts = r["train"]["facts"]
        assert facts["world_size"] == 2 and facts["per_rank"] == 32
        assert facts["strategy_class"] == ("DeepSpeed" if "zero2" in case["name"] else "DDP")
        assert facts["accum"] == (2 if "zero2" in case["name"] else 1)
