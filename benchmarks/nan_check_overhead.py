"""Cost of the per-step NaN/stop flag all-reduce (ffdist.step_flags) on the digits model.

    PYTHONPATH=. python -m benchmarks.nan_check_overhead      # 2 gloo ranks on the CPU

Times DDP training steps of the digits SmallCNN (global batch 64 = 2 x 32) without the flag,
with a blocking 2-number all-reduce after backward, and with the Trainer's way (started
before backward, waited after), interleaved in blocks so that load from other processes
hits all alike. Prints numbers; asserts nothing. (On gloo the host waits for the all-reduce
whatever ffdist does; on CUDA only the stream waits, and the host reads the flags a step
later: docs/performance.md.)
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ffdist.models.small import SmallCNN

STEPS, BLOCKS = 40, 12


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(SmallCNN(num_classes=10, in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    crit = nn.CrossEntropyLoss()

    def flags_of(loss: torch.Tensor) -> torch.Tensor:
        flags = torch.zeros(2)
        flags[0] = (~torch.isfinite(loss.detach())).float()
        return flags

    def step(mode: str) -> None:
        loss = crit(model(x), y)
        if mode == "overlapped":  # what Trainer does: start before backward, wait after
            flags = flags_of(loss)
            work = dist.all_reduce(flags, async_op=True)
        loss.backward()
        if mode == "overlapped":
            work.wait()
            flags.tolist()
        elif mode == "after":  # the simple way: a blocking all-reduce after backward
            flags = flags_of(loss)
            dist.all_reduce(flags)
            flags.tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)

    modes = ("off", "after", "overlapped")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(10):
        step("after")
    for _ in range(BLOCKS):
        for mode in modes:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step(mode)
            times[mode].append((time.perf_counter() - t0) / STEPS * 1000)
    if rank == 0:
        out.update({m: statistics.median(times[m]) for m in modes})
    dist.destroy_process_group()


def main() -> None:
    from tests.helpers import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=2)
        res = dict(out)
    off = res["off"]
    print(f"digits SmallCNN, DDP 2 gloo ranks x 1 thread, batch 64, median ms/step over "
          f"{BLOCKS} blocks of {STEPS}: without the flag {off:.2f}")
    for mode in ("after", "overlapped"):
        print(f"  flag all-reduce {mode:<10} {res[mode]:.2f} ms  (+{res[mode] - off:.3f} ms, "
              f"{100 * (res[mode] / off - 1):+.1f}%)")

if __name__ == "__main__":
    main()
