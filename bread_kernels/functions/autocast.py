"""``torch.autocast`` and the fused functions (Hugging Face Trainer's ``bf16=True`` / ``fp16=True``).

Under an enabled autocast for the tensors' device type, with autocast dtype ``d``, torch computes ``F.linear`` and
``matmul`` with every floating operand cast to ``d`` (a GEMM in ``d``, fp32 accumulation inside, output in ``d``),
and autograd takes the gradients of the cast copies back through the casts: ``dW`` is the ``d`` GEMM's result cast
to W's own dtype, ``dX`` likewise to x's.  The fused functions do the same with explicit casts: the forward reads
``d`` here, computes in it and records it on ``ctx``; the backward computes in the recorded dtypes under
:func:`outside_autocast`, so an autocast that is (or is not) enabled where ``backward()`` is called changes nothing
(what ``torch.amp.custom_bwd`` gives a custom Function).  No low-precision copy of a weight outlives its use: the
forward and the backward each cast what they need.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_dtype", "outside_autocast"]


_available: dict[str, bool] = {}  # per device type: asked once (every fused forward and backward asks)
_NO_CONTEXT = contextlib.nullcontext()
#: whether an autocast is enabled for any of the device types it covers: one C call (torch's private query, which
#: ``torch.nn.RNN``'s forward makes too), where the per-type query below costs every fused forward and backward ~3 µs
#: of host time a call (``python -m bread_kernels.bench host``); ``tests/functions/test_autocast.py`` fails if torch
#: drops it or changes which types it covers
_any_autocast_enabled = torch._C._is_any_autocast_enabled
#: the autocast device types the query does not cover (torch 2.13)
QUERY_MISSES = frozenset({"mps", "maia"})
#: those of them this process has a device of (the current accelerator's type), asked by type: elsewhere
#: ``device.type`` is not read at all (it cost a fused forward ~5 µs of its ~55 in two calls)
_ASKED_BY_TYPE = QUERY_MISSES & {getattr(torch.accelerator.current_accelerator(), "type", None)}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype an enabled ``torch.autocast`` for ``device``'s type computes GEMMs in, or None when it is off."""
    if not _any_autocast_enabled() and (not _ASKED_BY_TYPE or device.type not in _ASKED_BY_TYPE):
        return None
    kind = device.type
    available = _available.get(kind)
    if available is None:
        available = _available[kind] = torch.amp.is_autocast_available(kind)
    if available and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def outside_autocast(device: torch.device):
    """A context in which no autocast for ``device``'s type is enabled (a no-op when none is)."""
    if autocast_dtype(device) is None:
        return _NO_CONTEXT
    return torch.autocast(device.type, enabled=False)
