"""Whether this thread is recomputing a streamed block (``bread_kernels.stream``), and the deferred output GEMM
that this allows the fused functions.

The streaming backward recomputes a block with ``torch.utils.checkpoint`` (non-reentrant), which stops the
recompute as soon as the last tensor the backward needs has been saved ("early stop").  An aten op saves its inputs
*before* it computes, so for a plain model the block's last GEMM (Llama's ``down_proj``, whose output only feeds
the residual add) never runs in the recompute.  An ``autograd.Function`` saves its tensors *after* its forward
returns, which would cost the fused functions that GEMM.  So, while recomputing, their forward returns an
uninitialised output and hands the GEMM to :func:`apply_deferring_output`, which runs it right after ``apply``
returns; when saving raised the checkpoint's stop, ``apply`` never returns and nothing reads the output.  When the
output is needed (a post-norm block's LayerNorm saves its input), the GEMM runs before anyone reads it: the result
is the same either way.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

__all__ = ["recomputing", "is_recomputing", "apply_deferring_output"]

_state = threading.local()


@contextlib.contextmanager
def recomputing():
    """Mark the body as a block's recompute (entered by the stream in the backward; the backward of a CUDA model
    runs on autograd's device thread, which is where the fused functions read it)."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def is_recomputing() -> bool:
    return getattr(_state, "active", False)


def apply_deferring_output(function: type[torch.autograd.Function], *args) -> torch.Tensor:
    """``function.apply(*args, deferred)``: outside a recompute ``deferred`` is None and the forward computes its
    output; inside, it is a list to which the forward appends a closure that fills the output it returned empty."""
    if not is_recomputing():
        return function.apply(*args, None)
    deferred: list[Callable[[], None]] = []
    output = function.apply(*args, deferred)
    with torch.no_grad():
        for fill in deferred:
            fill()
    return output
