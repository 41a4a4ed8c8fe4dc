"""Which forwards of one patched model run now, in the calling thread, with proof that they still run.

A forward of a patched model may start at the model or at a module below it on the way to its blocks
(``model.model``, peft's ``base_model``): :mod:`bread_kernels.patch` opens an entry at each such module's forward
pre-hook and closes it at its forward hook; the outermost open entry is the forward that counts.  Two things would
leave the entries wrong:

* torch calls a forward hook registered with ``always_call=True`` where the forward raised an ``Exception``, but not
  a ``BaseException`` — a ``KeyboardInterrupt`` (a notebook cell interrupted and run again), ``SystemExit``,
  ``GeneratorExit`` — and none while ``torch.compile`` traces.  An entry left open makes every later forward that
  starts below it look nested in it.  So each entry holds the ``Module._call_impl`` frame that runs its module's
  call: that call still runs exactly where the frame is one of the callers of the frame that asks (the frames of
  one thread form one chain), and an entry whose frame is not is stale, dropped when next asked.  Asking walks the
  frames from the asker up to the innermost open entry's (11 from ``model.model``'s pre-hook to the model's in a
  transformers Llama: 1-2 µs on a 2-core AVX2 EPYC), no host sync.  The frame is held only while its call runs
  (the entry closes inside it); one an interrupt left open is held, with the module and the inputs it holds, as
  long as the interrupt's traceback holds it, or until the next forward of the model in the thread or the
  optimizer's step in it drops it, or the thread ends (its cycle through the model is the garbage collector's).
* two threads running forwards of one model (a background evaluation under ``torch.no_grad()`` while the main thread
  trains) would interleave on one stack, each closing the other's forward: the entries are per thread, in a
  ``threading.local`` (an attribute read costs about what ``dict.get(threading.get_ident())`` does), so a thread
  that ends takes its entries with it — one a ``SystemExit`` (or another ``BaseException``) left open holds the
  thread's frames, which no later forward or step of another thread drops — and a new thread given a dead one's
  identifier starts with none.
"""

from __future__ import annotations

import threading
import types
from typing import NamedTuple

from torch import nn

__all__ = ["OpenForward", "OpenForwards", "module_call_frame"]

#: the code of the frame that runs one module's call, hooks included
_CALL_IMPL = nn.Module._call_impl.__code__
#: how far above a hook's own frame its module's ``_call_impl`` frame may lie: ``torch.compiler.disable``'s wrapper
#: and ``_call_impl``'s inner function come between
_HOOK_CALLERS = 6


def module_call_frame(hook_frame: types.FrameType) -> types.FrameType | None:
    """The ``Module._call_impl`` frame that called the hook whose frame is ``hook_frame`` (None where none lies within
    :data:`_HOOK_CALLERS` frames: a module whose call torch does not run, a call dynamo transformed)."""
    frame = hook_frame
    for _ in range(_HOOK_CALLERS):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code is _CALL_IMPL:
            return frame
    return None


class OpenForward(NamedTuple):
    """One module's forward that started and has not returned: where the module lies (0: the model, ``i``: its
    ``i``-th entry module) and the ``_call_impl`` frame that runs it (None: not found; then trusted)."""

    depth: int
    frame: types.FrameType | None


class _ThreadEntries(threading.local):
    """One model's open entries in the calling thread, outermost first (None: none open)."""

    entries: list[OpenForward] | None = None  # a class default: None in a thread that never set it


class OpenForwards:
    """The open forwards of one patched model: per thread (a ``threading.local``), outermost first."""

    __slots__ = ("_thread",)

    def __init__(self):
        self._thread = _ThreadEntries()

    def entries(self) -> list[OpenForward]:
        """The calling thread's entries as last recorded (stale ones included), a copy."""
        return list(self._thread.entries or ())

    def running(self, frame: types.FrameType) -> bool:
        """Whether a forward of the model runs in the calling thread, asked from ``frame`` (a hook's own); the
        entries that no longer run are dropped."""
        thread = self._thread
        entries = thread.entries
        if entries is None:
            return False
        if _drop_stale(entries, frame):
            return True
        thread.entries = None
        return False

    def open(self, depth: int, frame: types.FrameType) -> bool:
        """The module at ``depth`` starts its forward (its pre-hook's frame is ``frame``): forget the entries that no
        longer run and those at or below ``depth`` (none of them can run while it starts), record its entry, and
        return whether it is nested in a forward that runs (False: it starts the model's forward)."""
        entry = OpenForward(depth, module_call_frame(frame))
        thread = self._thread
        entries = thread.entries
        if entries is None:  # the common case: the model's forward, or model.model(...), from outside
            thread.entries = [entry]
            return False
        _drop_stale(entries, frame)
        while entries and entries[-1].depth >= depth:
            entries.pop()
        nested = bool(entries)
        entries.append(entry)
        return nested

    def close(self, depth: int, frame: types.FrameType) -> bool | None:
        """The module at ``depth`` returned (or raised an ``Exception``) in the calling thread (its forward hook's
        frame is ``frame``): close its entry and the ones inside it left open; return whether its forward was the
        outermost (None: it has no entry — its pre-hook did not run, another pre-hook raised before it)."""
        thread = self._thread
        entries = thread.entries or ()
        for index in range(len(entries) - 1, -1, -1):
            if entries[index].depth == depth:
                if not _opened_by(entries[index], module_call_frame(frame)):
                    return None  # an entry an interrupt left open: this call's pre-hook did not run
                if index == 0:
                    thread.entries = None
                    return True
                del entries[index:]
                return False
        return None

    def clear(self) -> None:
        """Forget the calling thread's entries."""
        self._thread.entries = None


def _drop_stale(entries: list[OpenForward], frame: types.FrameType) -> bool:
    """Drop the entries whose call no longer runs (asked from ``frame``); return whether any is left.  Stale entries
    are the innermost (an exception unwinds the inner calls first), and an entry that runs proves the ones outside
    it run: only the innermost is checked, until one runs."""
    while entries and not _runs(entries[-1], frame):
        entries.pop()
    return bool(entries)


def _opened_by(entry: OpenForward, call: types.FrameType | None) -> bool:
    """Whether ``entry`` is the one the call running in ``call`` (a ``_call_impl`` frame) opened."""
    return entry.frame is None or call is None or entry.frame is call


def _runs(entry: OpenForward, frame: types.FrameType | None) -> bool:
    """Whether ``entry``'s call still runs: its frame is ``frame`` or one of its callers."""
    target = entry.frame
    if target is None:
        return True  # no proof either way: trusted, as before the frames were recorded
    while frame is not None and frame is not target:
        frame = frame.f_back
    return frame is not None
