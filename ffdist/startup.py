"""The start of a training process, kept short: no cyclic garbage collection while the big
libraries load.

Importing torch, and torch._dynamo (which every torch.optim constructor imports), leaves
~320,000 long-lived objects. CPython's full collections rescan all of them: ~200 ms each
on the 2-core development machine, about six during start-up, so ~0.6 s of a digits run
that trains in ~2 s. Start-up makes no cyclic garbage worth that, so collection is off
while the run is built; then the survivors are frozen (`gc.freeze`: never scanned again,
which also keeps later collections cheap) and collection is back on for the run itself.
At the end of the run `thaw` hands the frozen objects back to the collector.
"""

from __future__ import annotations

import gc

_paused = False


def pause_gc() -> None:
    """No cyclic collection until `resume_gc` (reference counting frees memory as usual)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc(freeze: bool = True) -> None:
    """Collect again, first freezing what start-up built (not when start-up failed: an
    in-process caller gets its collector back as it was); a no-op unless `pause_gc` paused."""
    global _paused
    if _paused:
        if freeze:
            gc.freeze()
        gc.enable()
        _paused = False


def thaw() -> None:
    """Let collections reach what `resume_gc` froze again: at the end of a run, whose
    explicit `gc.collect()` must free the cycles built at start-up (DDP's reducer holds gloo
    work objects that abort the process if freed after the process group is gone)."""
    gc.unfreeze()
