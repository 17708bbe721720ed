"""Cost of the per-step NaN/stop flag (Trainer._sync_flags) on the digits model.

    PYTHONPATH=. python -m benchmarks.nan_check_overhead      # 2 gloo ranks on the CPU

Times DDP training steps of the digits SmallCNN (global batch 64 = 2 x 32) with and without
the extra 2-number all-reduce + host read per step, interleaved in blocks so that load
from other processes hits both alike. Prints numbers; asserts nothing.
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

STEPS, BLOCKS = 50, 6


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(SmallCNN(num_classes=10, in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    crit = nn.CrossEntropyLoss()

    def step(check: bool) -> None:
        loss = crit(model(x), y)
        loss.backward()
        if check:  # what Trainer._sync_flags does
            flags = torch.zeros(2)
            flags[0] = (~torch.isfinite(loss.detach())).float()
            flags[1] = 0.0
            dist.all_reduce(flags)
            flags.tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(10):
        step(True)
    for _ in range(BLOCKS):
        for check in (False, True):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step(check)
            times[check].append((time.perf_counter() - t0) / STEPS * 1000)
    if rank == 0:
        out["off"], out["on"] = statistics.median(times[False]), statistics.median(times[True])
    dist.destroy_process_group()


def main() -> None:
    from tests.helpers import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=2)
        off, on = out["off"], out["on"]
    print(f"digits SmallCNN, DDP 2 gloo ranks x 1 thread, batch 64: step {off:.2f} ms without "
          f"the NaN/stop flag, {on:.2f} ms with it: +{on - off:.3f} ms ({100 * (on / off - 1):.1f}%)")


if __name__ == "__main__":
    main()
