"""The Triton backend: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations


import torch

from ..rounding import FLOAT_DTYPES
from . import epilogue, lora_kernel_requested, records_ops
from .add_scaled import TorchSums
from .rotary import TorchRotary, one_pass_serves
from .lora_gemm import lora_grads_gemm


class TritonBackend(TorchSums, TorchRotary):
    name = "triton"

    def __init__(self):
        from ..kernels import finite, lora_grads, rms_norm, rotary, swiglu, wgrad_update  # imports triton: when chosen

        self._kernels = wgrad_update
        self._finite = finite
        self._lora = lora_grads
        self._rotary = rotary
        self._rms_norm = rms_norm
        self._swiglu = swiglu

    def update_weight_(self, weight, grad_output, input, step, sign, rounding, seed, ok=None, offset=0, check=True,
                       also=(), work=None):
        """One kernel, gated on the finiteness of g, x and ``also`` (and ``ok``; ``check=False``: ``ok`` alone),
        which the flag's kernel decides first (:mod:`bread_kernels.kernels.finite`: two launches, three with
        ``also``); dW stays an fp32 sum in registers, never rounded to an fp16 that could overflow."""
        if check:
            ok = self.finite_flag(grad_output, input, *also, ok=ok)
        self._kernels.wgrad_update_(weight, grad_output, input, step, sign, rounding, seed, ok, offset)
        return ok

    def part_buffers(self, weight, tokens, compute, sign, rounding) -> None:
        """None: one kernel per part allocates nothing (with ``check=False``: the flag decided before the first)."""
        return None

    def prepare_update_(self, weight, grad_output, input, sign, rounding, ok=None, offset=0) -> None:
        """On a GPU: tunes the GEMM kernel for these shapes, and compiles and loads the variant these arguments
        launch, where this process has not (a launch that stores nothing)."""
        self._kernels.warm_wgrad_update_(weight, grad_output, input, sign, rounding, ok, offset)

    def prepare_apply_(self, param, grad, sign, rounding, ok=None, offset=0) -> None:
        """On a GPU: compiles and loads the epilogue kernel's variant these arguments launch, where this process has
        not (a launch that stores nothing)."""
        self._kernels.warm_apply_update_(param, grad, sign, rounding, ok, offset)

    def epilogue_buffers(self, numel, dtype, rounding, device) -> None:
        """None: the epilogue kernel allocates nothing."""
        return None

    def dw_finite_flag(self, weight, grad_output, input, sign, rounding):
        """None: the kernel's fp32 sum of finite g and x overflows only past 3.4·10³⁸ (see the CPU backends)."""
        return None

    def apply_update_(self, param, grad, step, sign, rounding, seed, offset=0, ok=None, buffers=None) -> None:
        self._kernels.apply_update_(param, grad, step, sign, rounding, seed, offset, ok)

    def update_temporary_bytes(self, param) -> int:
        """0: the update kernel writes ``param`` in place."""
        return 0

    def apply_update_if_finite_(self, param, grad, step, sign, rounding, seed, offset=0, checked=(),
                                ok=None, buffers=None) -> torch.Tensor | None:
        """:meth:`apply_update_` unless ``ok`` is False or an element of ``checked`` is not finite; returns the flag
        it gated on (None, and an ungated write, with neither)."""
        if checked:
            ok = self.finite_flag(*checked, ok=ok)
        self.apply_update_(param, grad, step, sign, rounding, seed, offset, ok)
        return ok

    def finite_flag(self, *tensors, ok=None):
        """``ok`` (None: True) and'ed with the tensors' finiteness: the flag's kernel
        (:mod:`bread_kernels.kernels.finite`, which starts from ``ok``) for fp32/bf16/fp16 tensors, the torch form
        for any other (an fp64 gradient); the flag stays on the device."""
        if tensors and all(t.dtype in FLOAT_DTYPES for t in tensors):
            return self._finite.finite_flag(*tensors, ok=ok)
        flag = epilogue.finite_flag(*tensors)
        return flag if ok is None else ok & flag

    def lora_grads(self, grad_output, input, u, lora_b, scaling, need_a, need_b):
        """cuBLAS GEMMs by default: measured on an H200 (bench/results/lora_layer_h200.txt) they beat the fused
        kernel (fp32 1.05-1.11x, bf16 1.7-2.3x slower than cuBLAS, at 8192 tokens, 4096-wide layers, r 8-64).
        ``BREAD_LORA_KERNEL=triton`` selects the kernel (always, under the interpreter, where it is tested), except
        under ``torch.use_deterministic_algorithms(True)``: the kernel sums its programs' parts with atomics."""
        use_kernel = lora_kernel_requested() or grad_output.device.type != "cuda"
        if not use_kernel or torch.are_deterministic_algorithms_enabled() or \
                records_ops(grad_output, input, u, lora_b) or lora_b.shape[1] > self._lora.MAX_RANK:
            return lora_grads_gemm(grad_output, input, u, lora_b, scaling, need_a, need_b)
        return self._lora.lora_grads(grad_output, input, u, lora_b, scaling, need_a, need_b)

    def rotary_(self, out, x, cos, sin, backward) -> None:
        """One kernel per tensor (:mod:`bread_kernels.kernels.rotary`) where :func:`.rotary.one_pass_serves`;
        torch's ops otherwise."""
        if one_pass_serves(out, x, cos, sin):
            self._rotary.rotary_(out, x, cos, sin, backward)
        else:
            super().rotary_(out, x, cos, sin, backward)

    def rms_norm(self, x, weight, eps):
        """One kernel (:mod:`bread_kernels.kernels.rms_norm`) for a contiguous ``x`` [..., K] and weight [K] in the
        kernel's dtypes, K up to its widest row; None (torch's ops) otherwise.  ``(y, r)`` with ``r`` [..., 1]."""
        if not _norm_serves(x, weight, self._rms_norm.MAX_COLUMNS):
            return None
        y, rstd = self._rms_norm.rms_norm_forward(x.view(-1, x.shape[-1]), weight, eps)
        return y.view(x.shape), rstd.view(*x.shape[:-1], 1)

    def rms_norm_backward(self, grad_output, x, weight, rstd, need_x, split, need_w):
        """One kernel (and a sum of its programs' partial ∂L/∂w) where :meth:`rms_norm` served the forward; None
        where autograd records the backward's ops (a double backward) or the tensors do not suit it."""
        if not _norm_serves(x, weight, self._rms_norm.MAX_COLUMNS) or grad_output.shape != x.shape or \
                rstd.dtype != torch.float32 or records_ops(grad_output, x, weight, rstd):
            return None
        width = x.shape[-1]
        grad_x, grad_x_again, grad_w = self._rms_norm.rms_norm_backward(
            grad_output.reshape(-1, width).contiguous(), x.view(-1, width), weight, rstd.reshape(-1).contiguous(),
            need_x, split, need_w)
        return (None if grad_x is None else grad_x.view(x.shape),
                None if grad_x_again is None else grad_x_again.view(x.shape), grad_w)

    def silu_mul(self, a, u):
        """One kernel (:mod:`bread_kernels.kernels.swiglu`) for contiguous ``a``, ``u`` of one shape and dtype;
        None (torch's ops) otherwise."""
        if not _product_serves(a, u):
            return None
        return self._swiglu.silu_mul_forward(a, u)

    def silu_mul_backward(self, grad_output, a, u, need_a, need_u):
        """One kernel for both gradients where :meth:`silu_mul` serves ``a``, ``u`` and g has their shape and dtype;
        None where autograd records the backward's ops (a double backward)."""
        if not _product_serves(a, u) or grad_output.shape != a.shape or grad_output.dtype != a.dtype or \
                records_ops(grad_output, a, u):
            return None
        return self._swiglu.silu_mul_backward(grad_output.contiguous(), a, u, need_a, need_u)

    def lora_input_dtype(self, input_dtype, lora_dtype, rank):
        """The adapters' dtype, which cuBLAS and the kernel read."""
        return lora_dtype

    def linear_cross_entropy(self, hidden, weight, bias, targets, softcap, max_rows, need_grads, need_dw):
        """Liger-Kernel's fused linear cross-entropy (:mod:`.liger`), or None where it cannot serve (the fused
        loss's own torch loop then runs; said once)."""
        from . import liger

        if liger.unavailable_reason() is not None:
            return None
        return liger.linear_cross_entropy(hidden, weight, bias, targets, softcap, max_rows, need_grads, need_dw)


def _norm_serves(x: torch.Tensor, weight: torch.Tensor, max_columns: int) -> bool:
    return x.dim() >= 1 and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES and weight.dim() == 1 \
        and x.is_contiguous() and weight.is_contiguous() and x.shape[-1] == weight.shape[0] \
        and 0 < x.shape[-1] <= max_columns and x.device == weight.device


def _product_serves(a: torch.Tensor, u: torch.Tensor) -> bool:
    return a.shape == u.shape and a.dtype == u.dtype and a.dtype in FLOAT_DTYPES and a.is_contiguous() \
        and u.is_contiguous() and a.device == u.device
