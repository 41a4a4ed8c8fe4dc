"""Allocation traces: how many bytes a piece of code allocates on top of what already exists.

On CPU the trace comes from the profiler's memory events (every c10 allocation and free, in order), which gives
both the peak of live extra bytes and the largest single allocation.  On CUDA the caching allocator's own
statistics give the peak.  The profiler part reads ``kineto_results``, which is not public API: it is isolated
here and fails loudly if torch changes it.
"""

from __future__ import annotations

import contextlib
import os
import sys

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class AllocationTrace:
    peak_bytes: int  #: the most bytes live at once, counting only what ``fn`` allocated
    largest_bytes: int  #: the largest single allocation (CPU only; -1 on CUDA, where only the peak is known)
    allocations: int  #: number of allocations
    retained_bytes: int = -1  #: bytes ``fn`` allocated and did not free (CPU only; -1 on CUDA)


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines (``USDT: ... profiler_start``) on file descriptor 2: they
    are not the benchmark's output, so fd 2 points at /dev/null while it runs (Python's own stderr is flushed)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def trace_allocations(fn: Callable[[], object], device: str | torch.device = "cpu") -> AllocationTrace:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        return AllocationTrace(peak_bytes=peak, largest_bytes=-1, allocations=-1)

    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        records = sorted((e.start_ns(), e.nbytes()) for e in events if e.device_type() == torch.device("cpu").type
                         or str(e.device_type()).endswith("CPU"))
    except AttributeError as exc:  # torch moved the profiler's internals
        raise RuntimeError(f"bread_kernels.bench.memory: this torch's profiler has no memory events API ({exc})")
    live = peak = largest = count = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
        if nbytes > 0:
            largest = max(largest, nbytes)
            count += 1
    return AllocationTrace(peak_bytes=peak, largest_bytes=largest, allocations=count, retained_bytes=live)
