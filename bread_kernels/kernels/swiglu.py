"""Triton kernels: the SwiGLU product ``h = silu(a) · u`` and its backward, one launch each way where torch's ops
launch two forward and four backward (:mod:`bread_kernels.functions.swiglu` has the maths).

Element by element, in fp32 with each result rounded where torch's ops round to the tensors' dtype ``d`` (FMA
contraction off; on a GPU ``exp`` the CUDA math library's, which torch's kernels call, and the divisions correctly
rounded; torch's CUDA kernels may contract a multiply-add, nvcc's default, so an fp32 result can differ from theirs
in its last bit, a bf16/fp16 one only where that bit crosses a rounding boundary)::

    e = exp(−a)                      s = d(a / (1 + e))                 h = d(s · u)
    backward, with g = ∂L/∂h:        σ = 1 / (1 + e)
    ∂L/∂a = d(d(g·u) · σ · (1 + a·(1 − σ)))      (silu_backward's formula, in its order)
    ∂L/∂u = d(s · g)

so both gradients come from one ``exp`` and one read of g, a and u.  Under the interpreter ``exp`` is numpy's, which
can differ from torch's CPU ``exp`` in the last bit of fp32: the tests compare within that.  Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import FLOAT_DTYPES
from .dtype_round import exp, on_device, round_to

__all__ = ["silu_mul_forward", "silu_mul_backward"]

_BLOCK = 1024


@triton.jit
def _silu_mul_forward_kernel(a_ptr, u_ptr, h_ptr, n, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dtype = h_ptr.dtype.element_ty
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = round_to(tl.math.div_rn(a, 1.0 + exp(-a, PRECISE)), dtype)
    tl.store(h_ptr + offsets, round_to(silu * u, dtype).to(dtype), mask=mask)


@triton.jit
def _silu_mul_backward_kernel(g_ptr, a_ptr, u_ptr, da_ptr, du_ptr, n, NEED_A: tl.constexpr, NEED_U: tl.constexpr,
                              PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dtype = a_ptr.dtype.element_ty
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    e = exp(-a, PRECISE)
    if NEED_A:
        u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        product = round_to(g * u, dtype)
        sigmoid = tl.math.div_rn(1.0, 1.0 + e)
        grad_a = product * sigmoid * (1.0 + a * (1.0 - sigmoid))
        tl.store(da_ptr + offsets, round_to(grad_a, dtype).to(dtype), mask=mask)
    if NEED_U:
        silu = round_to(tl.math.div_rn(a, 1.0 + e), dtype)
        tl.store(du_ptr + offsets, round_to(silu * g, dtype).to(dtype), mask=mask)


def _check(what: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() for t in tensors) or \
            first.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: the tensors must be contiguous, of one shape and one dtype (float32, bfloat16 or "
                         f"float16), got {[(tuple(t.shape), t.dtype, t.is_contiguous()) for t in tensors]}")


def silu_mul_forward(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h = silu(a) · u`` for contiguous ``a``, ``u`` of one shape and dtype; ``h`` in that dtype."""
    _check("silu_mul_forward", a, u)
    h = torch.empty_like(a)
    n = a.numel()
    if n:
        with on_device(a):
            _silu_mul_forward_kernel[(triton.cdiv(n, _BLOCK),)](a, u, h, n, PRECISE=a.device.type == "cuda",
                                                               BLOCK=_BLOCK, enable_fp_fusion=False)
    return h


def silu_mul_backward(grad_output: torch.Tensor, a: torch.Tensor, u: torch.Tensor, need_a: bool,
                      need_u: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂L/∂a, ∂L/∂u)`` of ``h = silu(a) · u`` for ``g = grad_output``, all contiguous, of one shape and dtype;
    None for a gradient not asked for."""
    _check("silu_mul_backward", grad_output, a, u)
    grad_a = torch.empty_like(a) if need_a else None
    grad_u = torch.empty_like(u) if need_u else None
    n = a.numel()
    if n and (need_a or need_u):
        with on_device(a):
            _silu_mul_backward_kernel[(triton.cdiv(n, _BLOCK),)](
                grad_output, a, u, a if grad_a is None else grad_a, u if grad_u is None else grad_u, n,
                NEED_A=bool(need_a), NEED_U=bool(need_u), PRECISE=a.device.type == "cuda", BLOCK=_BLOCK,
                enable_fp_fusion=False)
    return grad_a, grad_u
