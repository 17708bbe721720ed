"""ffdist.startup: cyclic GC off while a run is built, back on (start-up objects frozen)
before training, and back on whatever happens to an in-process caller."""

from __future__ import annotations

import gc

from ffdist import startup
from ffdist.train import main


def test_pause_then_resume_freezes_what_start_up_built():
    assert gc.isenabled()
    startup.pause_gc()
    assert not gc.isenabled()
    kept = [[i] for i in range(1000)]  # start-up objects that live on
    startup.resume_gc()
    assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
    gc.unfreeze()


def test_resume_is_a_no_op_unless_paused():
    gc.disable()  # someone else's choice: not ours to undo
    try:
        startup.resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_failed_start_leaves_the_callers_gc_on_and_unfrozen(capsys):
    assert main(["recipes/digits.yaml", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_thaw_hands_frozen_cycles_back_to_the_collector():
    import weakref

    class Node:
        pass

    startup.pause_gc()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle built at start-up (like DDP's reducer)
    gone = weakref.ref(a)
    startup.resume_gc()
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: collections do not see it
    startup.thaw()
    gc.collect()
    assert gone() is None
