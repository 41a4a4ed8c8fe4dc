"""Whether this thread is recomputing a streamed block (``bread_kernels.stream``), and the deferred output GEMM
that this allows the fused functions.

The streaming backward recomputes a block with ``torch.utils.checkpoint`` (non-reentrant), which stops the
recompute as soon as the last tensor the backward needs has been saved ("early stop").  An aten op saves its inputs
*before* it computes, so for a plain model the block's last GEMM (Llama's ``down_proj``, whose output only feeds
the residual add) never runs in the recompute.  An ``autograd.Function`` saves its tensors *after* its forward
returns, which would cost the fused functions that GEMM.  So, while recomputing, their forward returns a placeholder
of the output's shape (one element of storage) and hands the computation to :func:`apply_deferring_output`, which
runs it right after ``apply`` returns and moves the result into the placeholder (``set_``: the values are the
forward's own, bit for bit).  When saving raised the checkpoint's stop, ``apply`` never returns and nothing reads
the placeholder.  When the output is needed (a post-norm block's LayerNorm saves its input), it exists before anyone
reads it.

The placeholder costs two ops (``empty_strided``, ``set_``) and only pays where the stop comes at this very call.
So each call site (its ``site``: the weight's plan, rewritten at every block switch) remembers whether ``apply``
returned in an earlier recompute; if it did, the output was computed then as well, and later recomputes compute it
at once without a placeholder.  Only the sites where the recompute stops (a pre-norm block's last GEMM) keep it.
The GEMMs run are the same either way; a site whose pattern changes costs at most one GEMM, never a wrong value.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable, ContextManager

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["Recomputing", "is_recomputing", "register_recompute_scope", "deferred_output", "apply_deferring_output",
           "ThreadFlag", "ForwardRecord", "replayed"]


class ThreadFlag(threading.local):
    """A per-thread ``active`` flag, False in a thread that never set it: a class default, so reading it raises and
    catches nothing (``getattr(local, name, default)`` does, on a path every fused call takes)."""

    active = False


_state = ThreadFlag()
_scopes: OrderedDict[int, Callable[[], ContextManager]] = OrderedDict()


def register_recompute_scope(scope: Callable[[], ContextManager]) -> RemovableHandle:
    """Enter ``scope()`` around every recompute of a streamed block, and exit it however the recompute ends,
    including the checkpoint's early stop, which unwinds the block's forward from inside its last GEMM past every
    module's forward hooks.  An integration whose hooks keep per-forward state (DeepSpeed ZeRO-3's stack of the
    modules in their forward) registers its repair here, so this module never imports it.  Returns the handle that
    removes it."""
    handle = RemovableHandle(_scopes)
    _scopes[handle.id] = scope
    return handle


class Recomputing:
    """Context manager marking a block's recompute; reusable, as ``torch.utils.checkpoint`` enters the same object
    at every recompute of a block (``retain_graph=True``).  ``on_enter`` is called each time (the stream counts
    recomputes with it).  The flag is thread-local: a CUDA backward runs on autograd's device thread, which is where
    both the recompute and the fused functions run."""

    def __init__(self, on_enter: Callable[[], None] | None = None):
        self.on_enter = on_enter
        self._outer: list[tuple[bool, contextlib.ExitStack]] = []

    def __enter__(self):
        scopes = contextlib.ExitStack()
        for scope in list(_scopes.values()):
            scopes.enter_context(scope())
        self._outer.append((is_recomputing(), scopes))
        _state.active = True
        if self.on_enter is not None:
            self.on_enter()
        return self

    def __exit__(self, *exc):
        outer, scopes = self._outer.pop()
        _state.active = outer
        scopes.__exit__(*exc)
        return False


def is_recomputing() -> bool:
    return _state.active


class _CurrentRecord(threading.local):
    record = None  # the ForwardRecord of the streamed block whose forward (or recompute) runs in this thread


_current = _CurrentRecord()


class ForwardRecord:
    """What a streamed block's forward decided from state that may change before its recompute runs — peft's
    active adapter of each LoRA layer, which ``set_adapter`` or ``disable_adapter()`` between a forward and its
    backward changes — in call order: recorded in the forward, replayed by every recompute (as the checkpoint
    replays the RNG state), so the recompute computes what the forward did.  One per block forward; the stream
    runs the block inside it (``with record:``; a class's ``__enter__``, where a generator context manager cost
    each block's forward and recompute ~1 µs more of host time)."""

    __slots__ = ("values", "position", "_outer")

    def __init__(self):
        self.values: list = []
        self.position: int | None = None  # None while recording

    def __enter__(self) -> "ForwardRecord":
        self._outer, _current.record = _current.record, self
        self.position = 0 if is_recomputing() else None
        return self

    def __exit__(self, *exc) -> bool:
        _current.record = self._outer
        return False


def replayed(decide: Callable[..., object], *args) -> object:
    """``decide(*args)`` in a block's forward (recorded), the value it gave then in the block's recompute, and plain
    ``decide(*args)`` outside a streamed block."""
    record = _current.record
    if record is None:
        return decide(*args)
    if record.position is None:
        value = decide(*args)
        record.values.append(value)
        return value
    if record.position >= len(record.values):
        raise RuntimeError("bread_kernels: a block's recompute made more adapter choices than its forward did; the "
                           "model's structure changed between the forward and the backward")
    value = record.values[record.position]
    record.position += 1
    return value


def deferred_output(deferred: list, like: torch.Tensor, shape, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A placeholder of ``shape`` (``like``'s dtype and device, one element of storage) that receives ``compute()``
    once ``apply`` returns."""
    placeholder = torch.empty_strided(tuple(shape), (0,) * len(shape), dtype=like.dtype, device=like.device)
    deferred.append(lambda: placeholder.set_(compute()))
    return placeholder


_RETURNED_ATTR = "_bread_recompute_returned"


def apply_deferring_output(function: type[torch.autograd.Function], site: object, *args) -> torch.Tensor:
    """``function.apply(*args, deferred)``: outside a recompute, or inside one at a ``site`` whose ``apply``
    returned before, ``deferred`` is None and the forward computes its output; otherwise it is a list to which the
    forward appends the computation of the placeholder it returned."""
    if not is_recomputing() or getattr(site, _RETURNED_ATTR, False):
        return function.apply(*args, None)
    deferred: list[Callable[[], None]] = []
    output = function.apply(*args, deferred)
    setattr(site, _RETURNED_ATTR, True)
    with torch.no_grad():
        for fill in deferred:
            fill()
    return output
