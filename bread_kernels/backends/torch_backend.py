"""The pure-torch backend: runs anywhere torch does (CPU, CUDA, others); the fallback of the other two."""

from __future__ import annotations

from . import epilogue
from .chunked import ChunkedBackend


class TorchBackend(ChunkedBackend):
    name = "torch"
    # fp32 copy of the chunk, its sign, fp32 copy of the param, the new value, int64 index and hash temporaries
    bytes_per_element = 48

    def apply_update_(self, param, grad, step, sign, rounding, seed, offset=0, ok=None) -> None:
        epilogue.apply_update_(param, grad, step, sign, rounding.resolve(param.dtype), seed, offset, ok)

    def finite_flag(self, *tensors):
        return epilogue.finite_flag(*tensors)
