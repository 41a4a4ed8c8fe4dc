"""Triton kernel: the rotary embedding's element work (:mod:`bread_kernels.backends.rotary` has the maths), forward
or backward, one launch per tensor where torch's rotate-half form launches five or six.

Each program takes ``ROWS`` rows (b, h, s) of ``x`` [B, H, S, D] and both halves of each (``x1 = x[..., :h]``,
``x2 = x[..., h:]``, with ``c``, ``z`` the row's cos and sin)::

    forward   out1 = x1·c1 − x2·z1        out2 = x2·c2 + x1·z2
    backward  out1 = x1·c1 + x2·z2        out2 = x2·c2 − x1·z1

each product rounded to out's dtype before the sum (the rounding of autograd's ops, so its values bit for bit); the
launch turns off FMA contraction, which would fuse an fp32 product into the sum.  Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import FLOAT_DTYPES
from .dtype_round import on_device, round_to

__all__ = ["rotary_"]


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, heads, seq, half, x_stride_b, x_stride_h, x_stride_s,
                   out_stride_b, out_stride_h, out_stride_s, table_stride_b, BACKWARD: tl.constexpr,
                   ROWS: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]  # [ROWS, 1]
    column = tl.arange(0, HALF)[None, :]  # [1, HALF]
    mask = (row < rows) & (column < half)
    s = row % seq
    h = (row // seq) % heads
    b = row // (seq * heads)
    x_row = x_ptr + b * x_stride_b + h * x_stride_h + s * x_stride_s
    out_row = out_ptr + b * out_stride_b + h * out_stride_h + s * out_stride_s
    table = b * table_stride_b + s * (2 * half)
    dtype = out_ptr.dtype.element_ty
    x1 = tl.load(x_row + column, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + column, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + table + column, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + half + column, mask=mask, other=0.0).to(tl.float32)
    z1 = tl.load(sin_ptr + table + column, mask=mask, other=0.0).to(tl.float32)
    z2 = tl.load(sin_ptr + table + half + column, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        out1 = round_to(x1 * c1, dtype) + round_to(x2 * z2, dtype)
        out2 = round_to(x2 * c2, dtype) - round_to(x1 * z1, dtype)
    else:
        out1 = round_to(x1 * c1, dtype) - round_to(x2 * z1, dtype)
        out2 = round_to(x2 * c2, dtype) + round_to(x1 * z2, dtype)
    tl.store(out_row + column, round_to(out1, dtype).to(dtype), mask=mask)  # exact once rounded
    tl.store(out_row + half + column, round_to(out2, dtype).to(dtype), mask=mask)


def rotary_(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """``out = x·cos + rotate_half(x)·sin`` (``backward``: ``x·cos + rotate_halfᵀ(x·sin)``) for ``x``, ``out``
    [B, H, S, D] with a unit last stride and contiguous ``cos``, ``sin`` [1 or B, S, D], D even; each product and
    the sum rounded to out's dtype."""
    batch, heads, seq, dim = x.shape
    if out.shape != x.shape or dim % 2 or x.stride(3) != 1 or out.stride(3) != 1:
        raise ValueError(f"rotary_: x and out must be [B, H, S, D] of one shape with an even D and unit last "
                         f"stride, got {tuple(x.shape)} {x.stride()} and {tuple(out.shape)} {out.stride()}")
    if cos.shape != sin.shape or cos.shape[1:] != (seq, dim) or cos.shape[0] not in (1, batch) \
            or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rotary_: cos and sin must be contiguous [1 or B, S, D] for x {tuple(x.shape)}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (x.dtype in FLOAT_DTYPES and out.dtype in FLOAT_DTYPES and cos.dtype == sin.dtype
            and cos.dtype in FLOAT_DTYPES):
        raise TypeError(f"rotary_: x, out, cos and sin must be float32, bfloat16 or float16 (cos and sin of one "
                        f"dtype), got {x.dtype}, {out.dtype}, {cos.dtype} and {sin.dtype}")
    rows = batch * heads * seq
    if rows == 0:
        return
    half = dim // 2
    half_block = triton.next_power_of_2(half)
    rows_per_program = max(1, min(16, 2048 // half_block))
    with on_device(x):
        _rotary_kernel[(triton.cdiv(rows, rows_per_program),)](
            x, out, cos, sin, rows, heads, seq, half, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
            out.stride(1), out.stride(2), 0 if cos.shape[0] == 1 else seq * dim, BACKWARD=bool(backward),
            ROWS=rows_per_program, HALF=half_block, enable_fp_fusion=False)
