"""`python -m tests.cuda_probe OUT [--pretend-gpus N] RECIPE [key=value ...]`: run
`ffdist.train` in this process (under any launcher) and write OUT.<rank>.json with what it
did with CUDA: whether CUDA got initialised, the process-group backend, the device, the
torch.cuda functions it called, and the GPUs whose NVML process list holds this process.

--pretend-gpus N makes torch.cuda.is_available() say True and device_count() say N, so a
machine without GPUs runs the code paths that a GPU machine takes (a CUDA call then fails
here, or shows in the list of calls). Without it every count is the real one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

# torch.cuda functions that only ask (no CUDA context): availability and counts, imports, the
# seeding torch.manual_seed queues through _lazy_call while CUDA is not initialised.
QUERIES = {"is_available", "device_count", "is_initialized", "_is_compiled", "_lazy_call",
           "manual_seed_all", "_nvml_based_avail", "_device_count_nvml",
           "_raw_device_count_nvml", "_parse_visible_devices", "_raw_device_uuid_nvml",
           "_transform_uuid_to_ordinals", "_device_count_amdsmi", "<genexpr>", "<listcomp>",
           "<lambda>", "_get_nvml_device_index", "__getattr__", "<module>"}


def _trace_cuda_calls(calls: set[str]) -> None:
    import torch.cuda

    root = os.path.dirname(torch.cuda.__file__) + os.sep

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call" and frame.f_code.co_filename.startswith(root):
            name = frame.f_code.co_name
            if name not in QUERIES:
                calls.add(f"{os.path.basename(frame.f_code.co_filename)}:{name}")

    sys.setprofile(profile)
    threading.setprofile(profile)


def _nvml_gpus_holding(pid: int) -> list[int] | None:
    """Indices of the GPUs whose compute-process list names `pid` (None without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if any(p.pid == pid for p in procs):
                found.append(i)
        return found
    finally:
        pynvml.nvmlShutdown()


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    pretend = None
    if args[:1] == ["--pretend-gpus"]:
        pretend, args = int(args[1]), args[2:]
    import torch
    import torch.distributed as tdist

    if pretend is not None:
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: pretend
    seen: dict[str, object] = {"backend": None}
    real_init = tdist.init_process_group

    def init_process_group(*a, **kw):  # noqa: ANN002, ANN003 - passes everything on
        seen["backend"] = kw.get("backend", a[0] if a else None)
        return real_init(*a, **kw)

    tdist.init_process_group = init_process_group
    calls: set[str] = set()
    if pretend is not None:
        _trace_cuda_calls(calls)
    from ffdist import train

    code = train.main(args)
    sys.setprofile(None)
    threading.setprofile(None)
    report = {"exit": code, "backend": seen["backend"], "cuda_calls": sorted(calls),
              "cuda_initialized": torch.cuda.is_initialized(),
              "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
              "nvml_gpus_holding_me": _nvml_gpus_holding(os.getpid())}
    Path(f"{out}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
