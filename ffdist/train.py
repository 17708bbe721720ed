"""`python -m ffdist.train RECIPE [key=value ...]`, under any launcher.

torchrun / accelerate / the deepspeed launcher / srun start N copies of this; ffdist.dist
works out which one this is. With no launcher it trains on one device.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from ffdist.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, guard

if TYPE_CHECKING:
    from ffdist import run_dir
    from ffdist.dist import DistInfo
    from ffdist.engine import Trainer
    from ffdist.recipe import Recipe
    from ffdist.resolved import Resolved

USAGE = "usage: python -m ffdist.train RECIPE.yaml [key=value ...]"
HELP = f"""{USAGE}
       ffdist train RECIPE.yaml [key=value ...]
       torchrun --nproc_per_node N -m ffdist.train RECIPE.yaml [key=value ...]

Train a recipe (a YAML file, e.g. recipes/digits.yaml) with dotted key=value overrides,
e.g. optim.lr=0.05 schedule.epochs=5 output_dir=runs/try. Alone it trains on one device;
under torchrun, accelerate launch, the deepspeed launcher or srun each rank runs it
(`ffdist launch` writes those commands). The run directory (output_dir, default
runs/<name>) receives recipe.yaml, metrics.jsonl, tb/, checkpoints/ and model.pt; an
unfinished run there is resumed from its latest checkpoint.

Every recipe key, its default and meaning: the docstrings in ffdist/recipe.py (the
recipe reference in the docs is generated from them).
Exit status: 0 done, 2 bad input (one sentence says what to fix), 75 preempted (a
checkpoint was written: run the same command again to resume)."""


def run(recipe_path: str | None, overrides: list[str]) -> dict:
    from ffdist import recipe_load, sinks
    from ffdist.data.presence import check_present

    started = time.perf_counter()
    rcp = recipe_load.load(recipe_path, overrides)  # before importing torch: recipe errors are fast
    check_present(rcp.data, recipe_path)  # absent data: before any process group or run dir
    sinks.check(rcp.log)  # unknown log.sinks: likewise
    from ffdist import assemble

    rcp = assemble.settle(rcp)  # model.num_classes / cifar_stem = auto: values, from the data

    from ffdist import dist, same_recipe, signals, startup

    info = dist.init(rcp.launch)  # device checks (launch.device/gpus), then the group
    trainer, owner = None, None
    try:
        same_recipe.check(rcp)  # every rank the same recipe: before any collective
        from ffdist import run_dir, summary
        from ffdist.monitor import setup_logging

        setup_logging(info.is_primary)
        owner = run_dir.claim(rcp.run_dir, info, recipe_path, rcp.to_yaml())  # ours alone
        trainer, start = build(rcp, info)
        if trainer is None:
            if info.is_primary:
                print(summary.already_finished(start.message, rcp, recipe_path), flush=True)
            return {"already_finished": True}
        trainer.segment_started = started  # the run's time counts this whole process
        signals.install(trainer)  # SIGTERM/SIGUSR1/Ctrl-C: checkpoint at the next step, exit 75
        startup.resume_gc()  # the run is built; from here on its own garbage is collected
        try:
            if trainer.profiler is not None:  # log.profile_steps may start before step 1
                trainer.profiler.after_step(trainer.progress.step)
            result = trainer.fit()
            if trainer.profiler is not None:  # the run ended inside the window
                trainer.profiler.finish(trainer.progress.step)
            if not result.get("stopped"):
                signals.run_finished()  # a signal from here on has nothing to stop: exit 0
                finish(trainer, result)
        except BaseException:
            trainer.monitor.close("failed")  # trackers mark the run failed; files flushed
            raise
        trainer.monitor.close("stopped" if result.get("stopped") else "finished")
        dist.barrier()  # every rank is done before any of them tears its process group down
        if info.is_primary and not result.get("stopped"):  # after model.pt and every rank
            print(summary.finished(rcp, result, result["seconds"], recipe_path,
                                   info.world_size, trainer.progress.last_eval.get("n")),
                  flush=True)
        return result
    finally:
        if owner is not None:
            owner.release()
        # DDP's reducer (in reference cycles) holds gloo work objects with tensors: drop the
        # trainer and let the collector reach them (dist.shutdown collects, then destroys).
        trainer = None  # noqa: F841
        startup.thaw()  # those cycles were built at start-up: frozen (ffdist.startup)
        try:
            dist.shutdown()
        finally:
            signals.uninstall()  # last: a Ctrl-C during teardown still gets ffdist's handling


def build(rcp: Recipe, info: DistInfo) -> tuple[Trainer | None, run_dir.Start]:
    """Resolve the run, decide fresh / resume / nothing to do (ffdist.run_dir), refuse what
    cannot run, then assemble the Trainer (restored). (None, start) when there is nothing
    to do: the run directory holds this recipe's finished run."""
    from ffdist import assemble, checkpoint, preflight, profiling, run_dir
    from ffdist.monitor import Monitor, Pictures
    from ffdist.optim import total_steps
    from ffdist.shared_fs import check_shared_dir

    resolved = assemble.resolve_for(rcp, info)  # every rank alike: batch plan, precision
    check_shared_dir(rcp.run_dir, info.rank, info.world_size)  # multi-node: one output_dir
    manager = checkpoint.CheckpointManager(rcp.run_dir, rcp.checkpoint, info.is_primary)
    start = run_dir.decide_start(rcp, manager)  # fresh / resume / nothing to do, or refuse
    if start.done:
        return None, start
    found = start.found
    state = found[1] if found else None
    data = assemble.build_data(rcp, resolved, info.rank)
    model = assemble.build_model(rcp, load_weights=state is None)
    # Everything that can refuse the run does so before the run directory is touched.
    preflight.check_sizes(model, rcp, resolved)  # train and eval sizes: not at step 1
    if found:
        checkpoint.check_compatible(state, model, found[0], rcp, resolved)
    steps = total_steps(rcp.schedule, data.train.steps_per_epoch)
    run_dir.check_progress(rcp, state, steps)
    spec = data.spec

    def open_monitor() -> Monitor:  # after the strategy: it truncates metrics.jsonl
        return Monitor.open(rcp, info.is_primary, resume_step=state.step if state else None,
                            pictures=Pictures(rcp.log.images, rcp.log.graph, spec.mean,
                                              spec.std, spec.classes), total_steps=steps)

    window = profiling.window(rcp, steps)  # refused here when it lies past the run's end
    trainer = assemble.build_trainer(rcp, info, resolved, data=data, model=model,
                                     open_monitor=open_monitor, manager=manager)
    if window and info.is_primary:
        trainer.profiler = profiling.StepWindow(window, rcp.run_dir, info.device)
    if os.environ.get("FFDIST_FAULT"):  # tests/fault only: the one place faults are armed
        from ffdist import faults

        faults.install(trainer)
    monitor = trainer.monitor
    if state:
        trainer.restore(state)
        monitor.info("resumed from step %d (epoch %d)", state.step, state.epoch)
    if info.is_primary:
        run_dir.begin(rcp)  # the marker, leftovers of killed starts gone, recipe.yaml
        monitor.info("%s", start_line(rcp, resolved))
        if resolved.workers_note:
            monitor.info("%s", resolved.workers_note)
    return trainer, start


def start_line(rcp: Recipe, resolved: Resolved) -> str:
    """What this run is and how it runs, in one line: 'digits: model small_cnn on cpu x1
    (single), batch 64 = 64/rank x 1 accum, bf16, lr 0.1, 1 thread (auto: ...)'."""
    p = resolved.plan
    lr = f"lr {resolved.lr:.4g}" + (f" = {resolved.lr_why}" if resolved.lr_why else "")
    return (f"{rcp.name}: model {rcp.model.name} on {resolved.device.type} x{p.world_size} "
            f"({resolved.strategy}), batch {p.global_batch} = {p.micro}/rank x {p.accum} accum, "
            f"{resolved.precision}, {lr}, {resolved.threads_why}")


def finish(trainer: Trainer, end: dict) -> None:
    """The end of a finished run: model.pt (the weights checkpoint.final_weights names), the
    "end" record and the hyper-parameters, to every log sink."""
    from ffdist.checkpoint import write_weights
    from ffdist.recipe import flatten

    weights = trainer.final_weights()  # checkpoint.final_weights; a collective under ZeRO
    if trainer.info.is_primary:
        write_weights(trainer.recipe.run_dir / "model.pt", weights)
    last = trainer.progress.last_eval
    trainer.monitor.record({"event": "end", **end})
    trainer.monitor.hparams(flatten(trainer.recipe.to_dict()),
                            {"hparam/best_top1": end["best_top1"],
                             "hparam/final_top1": end["final_top1"],
                             "hparam/final_loss": last["loss"]})


def main(argv: list[str] | None = None) -> int:
    from ffdist.argv import split_argv

    recipe_path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if recipe_path in ("-h", "--help"):
        print(HELP)
        return 0
    if recipe_path is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USER_ERROR
    from ffdist import signals, startup

    if argv is None:  # this process's own command line: it ends when the run does
        signals.owns_process()

    startup.pause_gc()  # while torch & co load: ~0.6 s of full collections (ffdist.startup)
    try:
        return guard(_train, recipe_path, overrides)
    except KeyboardInterrupt:
        return interrupted()
    finally:
        startup.resume_gc(freeze=False)  # if start-up failed: an in-process caller's GC back on


def _train(recipe_path: str, overrides: list[str]) -> int:
    result = run(recipe_path, overrides)
    if result.get("stopped"):
        from ffdist.world import report_to_launcher

        report_to_launcher(f"ffdist: preempted at step {result['step']}: a checkpoint was "
                           f"written; exit {EXIT_PREEMPTED} means start again to resume.")
        return EXIT_PREEMPTED
    return 0


def interrupted() -> int:
    """Ctrl-C before ffdist.signals took it over (imports, data, model): one line, 130."""
    from ffdist.signals import EXIT_ABORTED

    print("ffdist: interrupted (Ctrl-C) before training started; start the same command "
          "again.", file=sys.stderr, flush=True)
    return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
