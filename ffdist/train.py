"""`python -m ffdist.train RECIPE [key=value ...]`, under any launcher.

torchrun / accelerate / the deepspeed launcher / srun start N copies of this; ffdist.dist
works out which one this is. With no launcher it trains on one device.
"""

from __future__ import annotations

import gc
import sys

from ffdist.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, FfdistError, one_line

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
    from ffdist import recipe

    rcp = recipe.load(recipe_path, overrides)  # before importing torch: recipe errors are fast

    import torch

    from ffdist import checkpoint, data, dist, models, precision, preflight, run_dir, signals, strategies
    from ffdist.data.loader import plan_batches
    from ffdist.engine import Trainer
    from ffdist.monitor import Monitor, setup_logging
    from ffdist.optim import total_steps
    from ffdist.shared_fs import check_shared_dir

    # Checks that every rank makes alike, before any process group exists to tear down.
    plan_batches(rcp.data.batch_size, rcp.data.micro_batch_size, dist.world_from_env()[2])
    dist.check_gpus(rcp.launch.gpus)
    info = dist.init(rcp.launch.pg_timeout)
    owner = None
    try:
        setup_logging(info.is_primary)
        owner = run_dir.claim(rcp.run_dir, info)  # writable, and ours alone for the run's life
        check_shared_dir(rcp.run_dir, info.rank, info.world_size)  # multi-node: one output_dir
        manager = checkpoint.CheckpointManager(rcp.run_dir, rcp.checkpoint, info.is_primary)
        start = run_dir.plan_start(rcp, manager)  # fresh / resume / nothing to do, or refuse
        if start.done:
            if info.is_primary:
                print(start.message, flush=True)
            return {"already_finished": True}
        found = start.found
        state = found[1] if found else None
        loaders = data.build(rcp, info.rank, info.world_size, info.device)
        torch.manual_seed(rcp.seed)  # same initial weights on every rank and world size
        model = models.build(rcp.model)
        preflight.check_input_size(model, rcp.model.name, loaders.spec.channels,
                                   loaders.spec.image_size)
        if rcp.model.pretrained or rcp.model.freeze:  # transfer learning: ffdist.finetune
            from ffdist import finetune

            model = finetune.prepare(model, rcp.model, load_weights=state is None)
        # Everything that can refuse the run does so before the run directory is touched.
        if found:
            checkpoint.check_compatible(found[1], model, found[0], rcp.model.num_classes)
        run_dir.check_progress(rcp, state, total_steps(rcp.schedule,
                                                       loaders.train_sampler.steps_per_epoch))
        torch.manual_seed(rcp.seed + 1000 * info.rank)  # per-rank dropout/augmentation
        prec = precision.resolve(rcp.precision, info.device, info.launcher_precision)
        strategy = strategies.build(model, rcp, info, prec)
        resume_step = state["step"] if state else None
        monitor = Monitor(rcp.run_dir, info.is_primary, rcp.log.tensorboard, rcp.log.progress,
                          resume_step=resume_step)
        trainer = Trainer(rcp, info, loaders, strategy, monitor, manager, prec)
        signals.install(trainer)  # SIGTERM/SIGUSR1: checkpoint at the next step, exit 75
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
        dist.barrier()  # every rank is done before any of them tears its process group down
        return result
    finally:
        if owner is not None:
            owner.release()
        # DDP's reducer (in reference cycles) holds gloo work objects with tensors; freed at
        # interpreter exit, after the group is gone, they were seen to abort a rank
        # ("terminate called without an active exception"). Free them now, then destroy.
        trainer = strategy = model = None  # noqa: F841
        try:
            gc.collect()
            dist.shutdown()
        finally:
            signals.uninstall()  # last: a Ctrl-C during teardown still gets ffdist's handling


def main(argv: list[str] | None = None) -> int:
    recipe_path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if recipe_path is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        result = run(recipe_path, overrides)
    except FfdistError as e:
        report(e)
        return e.exit_code
    except KeyboardInterrupt:
        return interrupted()
    except Exception as e:
        if not _peer_lost(e):
            raise  # a bug: keep the traceback
        from ffdist.dist import world_from_env

        rank, _, world, _, _ = world_from_env()
        why = next((s for s in PEER_LOST if s in str(e)), type(e).__name__)
        print(f"ffdist: rank {rank} of {world} stopped: it lost contact with another rank "
              f"({why}), which failed first: see that rank's message.", file=sys.stderr,
              flush=True)
        return 1
    if result.get("stopped"):
        from ffdist.dist import report_to_launcher

        report_to_launcher(f"ffdist: preempted at step {result['step']}: a checkpoint was "
                           f"written; exit {EXIT_PREEMPTED} means start again to resume.")
        return EXIT_PREEMPTED
    return 0


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def _peer_lost(e: Exception) -> bool:
    """A collective failed because a peer process died: the fallout of another rank's
    error or crash (which reports itself), not a second bug; one line instead of N tracebacks."""
    from ffdist.dist import world_from_env

    if world_from_env()[2] < 2:
        return False
    comm_error = type(e).__name__ in ("DistBackendError", "DistNetworkError")
    return comm_error or (isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_LOST))


def interrupted() -> int:
    """Ctrl-C before ffdist.signals took it over (imports, data, model): one line, 130."""
    from ffdist.signals import EXIT_ABORTED

    print("ffdist: interrupted (Ctrl-C) before training started; start the same command "
          "again.", file=sys.stderr, flush=True)
    return EXIT_ABORTED


def report(e: FfdistError) -> None:
    """One line on stderr. An error every rank raises alike is printed by rank 0 only, so
    that torchrun with N ranks shows it once; others are printed by each rank that hit it."""
    from ffdist.dist import report_to_launcher, world_from_env

    rank, _, world, _, _ = world_from_env()
    where = f" (rank {rank} of {world})" if rank != 0 else ""
    line = f"ffdist: error{where}: {one_line(e)}"
    report_to_launcher(line)  # torchrun's failure summary then shows it instead of a URL
    if rank != 0 and e.same_on_all_ranks:
        return
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
