"""Command lines that every launcher can start: the deepspeed launcher's `--local_rank=N`
dropped, the first word split from the rest; and the options with which `ffdist eval`,
`predict` and `export` choose a run's weights and override its recipe (one parent parser,
so that the three cannot drift apart).

Imports nothing of ffdist but the errors: every command may use it.
"""

from __future__ import annotations

import argparse

from ffdist.errors import RecipeError, printable

LOCAL_RANK = ("--local_rank", "--local-rank")


def drop_local_rank(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank=N` (or `--local_rank N`) the deepspeed launcher adds:
    ffdist learns the rank from the environment (ffdist.world)."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(LOCAL_RANK):
            skip = "=" not in a and i + 1 < len(argv)
            continue
        args.append(a)
    return args


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the first word, the rest), `--local_rank` dropped; (None, all) when the first word
    is missing or is itself a key=value override."""
    args = drop_local_rank(argv)
    if not args or "=" in args[0]:
        return None, args
    return args[0], args[1:]


# ------------------------------------------------------------------ a run's weights

def run_options() -> argparse.ArgumentParser:
    """The parent parser of `ffdist eval`, `predict` and `export`: which weights of the run
    (--checkpoint, --weights) and recipe overrides (--set, into `args.overrides`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights other than RUN_DIR/model.pt, e.g. RUN_DIR/checkpoints/best.pt")
    p.add_argument("--weights", default=None, choices=["raw", "ema"],
                   help="of a checkpoint: raw or EMA weights (default: for best.pt the "
                        "weights it was picked by, checkpoint.best_weights; otherwise the "
                        "run's checkpoint.final_weights, what model.pt holds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set data.root=/new/place (repeatable)")
    return p


def refuse_positional(command: str, extra: list[str]) -> None:
    """Words a run command does not take, refused in one sentence that names the option
    meant: `checkpoint=PATH` -> --checkpoint PATH, `weights=ema` -> --weights ema,
    `key=value` -> --set key=value."""
    if not extra:
        return
    word = printable(extra[0])
    key, eq, value = word.partition("=")
    if eq and key == "checkpoint":
        fix = f"name the weights with --checkpoint {value}"
    elif eq and key == "weights":
        fix = f"choose them with --weights {value}"
    elif eq:
        fix = f"override a recipe key with --set {word}"
    else:
        fix = f"see `{command} --help` for what it takes"
    raise RecipeError(f"{command}: unexpected argument '{word}'; {fix}.")
