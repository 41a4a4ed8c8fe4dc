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
(``SIG_IGN``, ``SIG_DFL``, or one installed from C), it does nothing.

Other exceptions cannot be held back, so a write in parts allocates everything its parts need before the first part
writes (an out-of-memory error then comes before any part, never between two).  The data-parallel writes cannot:
each part waits for a collective (the ranks' sum of that part's gradient, whose buffers and transport the collective
library allocates) and a failure there cannot be prevented from here.  An exception that stops one of them after its
first part is marked (:func:`mark_partly_written`): a note says what is partly written, and the update's caller
names the weight (:func:`partly_written`).
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["whole_write", "mark_partly_written", "partly_written", "add_note"]

_MARK = "_bread_kernels_partly_written"


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


def mark_partly_written(exc: BaseException, what: str) -> None:
    """Mark ``exc``, raised by a write in parts after its first part wrote, as having left ``what`` partly written:
    a note saying so and what to do (once; the first mark, the innermost, says it)."""
    if getattr(exc, _MARK, None) is not None:
        return
    try:
        setattr(exc, _MARK, what)
    except AttributeError:  # an exception type that takes no attributes: the note alone
        pass
    add_note(exc, f"bread_kernels: this stopped an on-the-fly update written in parts after its first part: {what} "
                  "took this step's update in part only (some of its elements did, the others did not). Restore the "
                  "model (and optimizer) from a checkpoint before training on.")


def partly_written(exc: BaseException) -> str | None:
    """What ``exc`` left partly written (:func:`mark_partly_written`), or None."""
    return getattr(exc, _MARK, None)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where Python has it (3.11+); on 3.10 the exception propagates without the note."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
