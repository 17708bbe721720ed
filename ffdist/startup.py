"""The start of a training process, kept short: no cyclic garbage collection while the big
libraries load.

Importing torch, and torch._dynamo (which every torch.optim constructor imports), leaves
~320,000 long-lived objects. CPython's full collections rescan all of them: ~200 ms each
on the 2-core development machine, about six during start-up, so ~0.6 s of a digits run
that trains in ~2 s. Start-up makes no cyclic garbage worth that, so collection is off
while the run is built; then the survivors are frozen (`gc.freeze`: never scanned again,
which also keeps later collections cheap) and collection is back on for the run itself.
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


def resume_gc() -> None:
    """Freeze what start-up built and collect again; a no-op unless `pause_gc` paused it."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False
