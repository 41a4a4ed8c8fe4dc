"""A write made of several parts (row chunks, vocabulary tiles, expert slices of one tensor) finishes whole.

An on-the-fly update of a large weight is written in parts so that no whole dW exists: the CPU backends' row chunks
of ``W -= lr·s·f(dW)``, the fused head+loss's vocabulary tiles, the slices of a 3-D expert weight.  On a CPU the
backward runs in the main thread, where Python delivers Ctrl-C (``KeyboardInterrupt``) between any two bytecodes —
between two parts, too — and a loop that a notebook user interrupts and re-runs would carry on from a weight whose
first rows took this step's update and whose other rows did not.  The reference's hook writes each weight with one op
(``p.add_(g, alpha=-lr·s)``), so its weights are either updated or not.

:func:`whole_write` holds a SIGINT back for the duration of one such write and delivers it right after, to the
handler that was in place (Python's, raising ``KeyboardInterrupt``; or the user's): the backward then stops at the
same place as the reference's would stop after that weight's hook.  It costs two ``signal.signal`` calls (~10 µs of
host time), so the writes of one part (a weight within one chunk) do not use it.  Outside the main thread (a CUDA
backward runs in autograd's device thread, where Python delivers no signal) and where a non-Python handler is set
(``SIG_IGN``, ``SIG_DFL``, or one installed from C), it does nothing.  Other exceptions raised between parts (an
out-of-memory while a tile's logits are allocated) still stop the write partway.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["whole_write"]


@contextlib.contextmanager
def whole_write():
    """Run the block inside with SIGINT held back; a SIGINT that arrived meanwhile is raised again on exit, to the
    handler in place before (so ``KeyboardInterrupt`` comes right after the write, not inside it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN / SIG_DFL, or a handler not installed from Python (None): left alone
        yield
        return
    arrived = []
    signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived:
            signal.raise_signal(signal.SIGINT)  # the previous handler runs now: KeyboardInterrupt, by default
