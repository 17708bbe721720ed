"""`python -m ffdist.train RECIPE [key=value ...]`, under any launcher.

torchrun / accelerate / the deepspeed launcher / srun start N copies of this; ffdist.dist
works out which one this is. With no launcher it trains on one device.
"""

from __future__ import annotations

import sys

from ffdist.errors import EXIT_USER_ERROR, FfdistError

USAGE = "usage: python -m ffdist.train RECIPE.yaml [key=value ...]"


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """Recipe path and overrides; drops the `--local_rank=N` the deepspeed launcher adds."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank", "--local-rank")):
            skip = "=" not in a and i + 1 < len(argv)
            continue
        args.append(a)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if not args or "=" in args[0]:
        return None, args
    return args[0], args[1:]


def run(recipe_path: str | None, overrides: list[str]) -> dict:
    import torch

    from ffdist import checkpoint, data, dist, models, precision, recipe, run_dir, strategies
    from ffdist.engine import Trainer
    from ffdist.monitor import Monitor, setup_logging

    rcp = recipe.load(recipe_path, overrides)
    info = dist.init(rcp.launch.pg_timeout)
    try:
        setup_logging(info.is_primary)
        if info.is_primary:
            run_dir.check_writable(rcp.run_dir)
        manager = checkpoint.CheckpointManager(rcp.run_dir, rcp.checkpoint, info.is_primary)
        state = run_dir.resume_state(rcp, manager)
        loaders = data.build(rcp, info.rank, info.world_size, info.device)
        torch.manual_seed(rcp.seed)  # same initial weights on every rank and world size
        model = models.build(rcp.model)
        torch.manual_seed(rcp.seed + 1000 * info.rank)  # per-rank dropout/augmentation
        prec = precision.resolve(rcp.precision, info.device, info.launcher_precision)
        strategy = strategies.build(model, rcp, info, prec)
        resume_step = state["step"] if state else None
        monitor = Monitor(rcp.run_dir, info.is_primary, rcp.log.tensorboard, rcp.log.progress,
                          resume_step=resume_step)
        trainer = Trainer(rcp, info, loaders, strategy, monitor, manager, prec)
        if state:
            trainer.restore(state)
            monitor.info("resumed from step %d (epoch %d)", state["step"], state["epoch"])
        if info.is_primary:
            run_dir.write_recipe(rcp)
            monitor.info("%s: %s on %s x%d (%s), batch %d = %d/rank x %d accum, %s",
                         rcp.name, rcp.model.name, info.device.type, info.world_size,
                         strategies.resolve_name(rcp, info), loaders.plan.global_batch,
                         loaders.plan.micro, loaders.plan.accum, prec)
        result = trainer.fit()
        monitor.close()
        return result
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    recipe_path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if recipe_path is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        run(recipe_path, overrides)
    except FfdistError as e:
        print(f"ffdist: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
