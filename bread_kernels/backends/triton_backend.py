"""The Triton backend: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations


class TritonBackend:
    name = "triton"

    def __init__(self):
        from ..kernels import wgrad_update  # imports triton: only when this backend is chosen

        self._kernels = wgrad_update

    def update_weight_(self, weight, grad_output, input, step, sign, rounding, seed) -> None:
        self._kernels.wgrad_update_(weight, grad_output, input, step, sign, rounding, seed)

    def apply_update_(self, param, grad, step, sign, rounding, seed, offset=0) -> None:
        self._kernels.apply_update_(param, grad, step, sign, rounding, seed, offset)
