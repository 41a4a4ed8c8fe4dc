"""The pure-torch backend: runs anywhere torch does (CPU, CUDA, others); the fallback of the other two."""

from __future__ import annotations

from ..interrupts import whole_write
from . import epilogue
from .chunked import ChunkedBackend, chunk_budget_bytes


class TorchBackend(ChunkedBackend):
    name = "torch"
    # fp32 copy of the chunk, its sign, fp32 copy of the param, the new value, int64 index and hash temporaries
    bytes_per_element = 48

    def apply_update_(self, param, grad, step, sign, rounding, seed, offset=0, ok=None, buffers=None) -> None:
        """The epilogue's update over slices of ``param``'s rows (a 1-D ``param``'s elements) whose temporaries
        (``bytes_per_element`` each) fit the chunk budget: a whole gradient — the fused head's dW, a hooked
        parameter's — takes no more than a chunk of a fused dW does.  Each element draws the random bits of its
        index in the whole ``param``, so the slices change no value.  Several slices share one set of temporaries
        (``buffers``, else allocated before the first slice writes: :class:`~.epilogue.EpilogueBuffers`)."""
        rounding = rounding.resolve(param.dtype)
        width = param.shape[1] if param.dim() == 2 else 1
        rows = max(1, chunk_budget_bytes() // (width * self.bytes_per_element))
        if rows >= param.shape[0]:
            epilogue.apply_update_(param, grad, step, sign, rounding, seed, offset, ok, buffers)
            return
        if buffers is None or not buffers.serves(param[:rows], rounding):
            buffers = self.epilogue_buffers(rows * width, param.dtype, rounding, param.device)
        with whole_write():  # every slice, or none: a Ctrl-C between two comes after the last
            for start in range(0, param.shape[0], rows):
                stop = min(param.shape[0], start + rows)
                epilogue.apply_update_(param[start:stop], grad[start:stop], step, sign, rounding, seed,
                                       offset + start * width, ok, buffers)

    def epilogue_buffers(self, numel, dtype, rounding, device):
        return epilogue.EpilogueBuffers(numel, dtype, rounding, device)

    def finite_flag(self, *tensors):
        return epilogue.finite_flag(*tensors)
