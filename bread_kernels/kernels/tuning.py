"""What the kernels' launches share: the autotuners' timer, and whether a launch runs under Triton's interpreter.

Triton's default ``do_bench`` allocates a 256 MiB buffer to flush L2 (and ``restore_value`` would clone the
tensors a kernel writes): both would happen on the first backward of every new shape, inside a training step's
memory budget.  This timer uses CUDA events and allocates nothing; kernels whose timing launches must not change
their outputs arrange that themselves (``store=0`` in the weight-update kernel, ``reset_to_zero`` for atomics).
"""

from __future__ import annotations

import os

import torch

#: read once at import, as Triton itself reads it
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs under Triton's interpreter (asked for, or a tensor not on a GPU)."""
    return _INTERPRET or device.type != "cuda"


def time_in_place(kernel_call, quantiles):
    kernel_call()  # compiles
    kernel_call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]
