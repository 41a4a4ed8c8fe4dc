"""Triton kernels: the Llama-style RMSNorm ``y = w · d_x(x_f · rsqrt(mean(x_f²) + ε))`` and its backward, one launch
each way where torch's ops launch about eight forward and fifteen backward (:mod:`bread_kernels.functions.rms_norm`
has the maths and the dtypes: ``x`` [R, K] in ``d_x``, ``w`` [K] in ``d_w``, ``y`` in ``d_y = promote(d_w, d_x)``).

Forward: each program takes ``ROWS`` rows whole (K ≤ :data:`MAX_COLUMNS`), sums ``x_f²`` in fp32, writes the row's
``r = rsqrt(mean + ε)`` (fp32, saved for the backward) and ``y = d_y(w · d_x(x_f · r))``, rounded where torch's ops
round (FMA contraction off; two products, each rounded once), so ``y`` is what torch's ops give from that ``r`` bit
for bit; ``r`` itself agrees with torch's to fp32 rounding (another order of the sum, a division by K where torch's
GPU mean multiplies by 1/K; on a GPU the CUDA math library's ``rsqrtf``, as torch's).

Backward, with ``g = ∂L/∂y`` in ``d_y``: each program walks a contiguous range of rows, writes each row's ::

    ĝ = fp32(d_x(d_y(g · w)))      ∂L/∂r = Σ_K ĝ · x_f      c = (∂L/∂r · −½ · r³) / K · 2
    ∂L/∂x = d_x(ĝ · r + x_f · c)   (or, for fp32 x, the two terms apart: autograd hands them to x one by one)

and sums ``d_y(g · d_x(x_f · r))`` over its rows in fp32 for ∂L/∂w; the launch function adds the programs' partial
sums (fp32) and rounds them to ``d_y``, then ``d_w``, as torch's sum over rows does.  Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import FLOAT_DTYPES
from .dtype_round import on_device, round_to, rsqrt

__all__ = ["rms_norm_forward", "rms_norm_backward", "MAX_COLUMNS"]

#: the widest row a program holds whole (wider rows: torch's ops, see the backend)
MAX_COLUMNS = 32768


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, cols_f, x_stride, y_stride, eps,
                             PRECISE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # cols_f: K as a float argument (Triton specialises an int argument of 1 into a constant, which has no .to)
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # [ROWS]
    column = tl.arange(0, BLOCK)
    mask = (row[:, None] < rows) & (column[None, :] < cols)
    x = tl.load(x_ptr + row[:, None] * x_stride + column[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x * x, axis=1), cols_f)
    rstd = rsqrt(mean + eps, PRECISE)
    tl.store(rstd_ptr + row, rstd, mask=row < rows)
    normalized = round_to(x * rstd[:, None], x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + column, mask=column < cols, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    tl.store(y_ptr + row[:, None] * y_stride + column[None, :], round_to(w[None, :] * normalized, dtype).to(dtype),
             mask=mask)


@triton.jit
def _rms_norm_backward_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dx_again_ptr, dw_ptr, rows, cols, cols_f,
                              rows_per_program, g_stride, x_stride, dx_stride, NEED_X: tl.constexpr,
                              SPLIT: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    column = tl.arange(0, BLOCK)
    mask = column < cols
    x_dtype = x_ptr.dtype.element_ty
    g_dtype = g_ptr.dtype.element_ty
    w = tl.load(w_ptr + column, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    stop = tl.minimum(start + rows_per_program, rows)
    for row in range(start, stop):
        g = tl.load(g_ptr + row * g_stride + column, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + column, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if NEED_W:
            dw += round_to(g * round_to(x * rstd, x_dtype), g_dtype)
        if NEED_X:
            grad_hat = round_to(round_to(g * w, g_dtype), x_dtype)
            grad_rstd = tl.sum(grad_hat * x, axis=0)
            through = x * (tl.math.div_rn(grad_rstd * -0.5 * (rstd * rstd * rstd), cols_f) * 2.0)
            if SPLIT:
                tl.store(dx_ptr + row * dx_stride + column, grad_hat * rstd, mask=mask)
                tl.store(dx_again_ptr + row * dx_stride + column, through, mask=mask)
            else:
                tl.store(dx_ptr + row * dx_stride + column, round_to(grad_hat * rstd + through, x_dtype).to(x_dtype),
                         mask=mask)
    if NEED_W:
        tl.store(dw_ptr + pid * cols + column, dw, mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16 if block <= 16384 else 32


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],) or not weight.is_contiguous() or \
            x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES or x.shape[1] > MAX_COLUMNS:
        raise ValueError(f"rms_norm kernels: x must be [R, K] with a unit last stride and K <= {MAX_COLUMNS}, "
                         f"weight contiguous [K], both float32, bfloat16 or float16; got x {tuple(x.shape)} "
                         f"{x.stride()} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [R, K] in promote(d_w, d_x), r [R] fp32)`` for ``x`` [R, K] (unit last stride), ``weight`` [K]."""
    _check(x, weight)
    rows, cols = x.shape
    y = torch.empty((rows, cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows and cols:
        block = triton.next_power_of_2(cols)
        rows_per_program = max(1, min(16, 4096 // block))
        with on_device(x):
            _rms_norm_forward_kernel[(triton.cdiv(rows, rows_per_program),)](
                x, weight, y, rstd, rows, cols, float(cols), x.stride(0), y.stride(0), float(eps),
                PRECISE=x.device.type == "cuda", ROWS=rows_per_program, BLOCK=block, num_warps=_warps(block),
                enable_fp_fusion=False)
    return y, rstd


def _programs(rows: int, device: torch.device) -> int:
    """The backward's programs: enough to fill a GPU twice over (each sums its rows' ∂L/∂w), a few elsewhere."""
    if device.type == "cuda":
        return max(1, min(rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def rms_norm_backward(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_x: bool, split: bool, need_w: bool):
    """``(∂L/∂x, ∂L/∂x's second term or None, ∂L/∂w)`` for ``g = grad_output`` [R, K] (unit last stride), the
    forward's ``x`` [R, K], ``weight`` [K] and ``r`` [R].  ``split`` (fp32 x): ∂L/∂x as its two fp32 terms
    ``ĝ · r`` and ``x_f · c``; otherwise one tensor in x's dtype.  None where not asked for."""
    _check(x, weight)
    rows, cols = x.shape
    if grad_output.shape != x.shape or grad_output.stride(1) != 1 or rstd.shape != (rows,) or \
            rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rms_norm_backward: grad_output must be [R, K] = {tuple(x.shape)} with a unit last stride "
                         f"and rstd [R] fp32, got {tuple(grad_output.shape)} {grad_output.stride()} and "
                         f"{tuple(rstd.shape)} {rstd.dtype}")
    x_dtype = torch.float32 if split else x.dtype
    grad_x = torch.empty((rows, cols), dtype=x_dtype, device=x.device) if need_x else None
    grad_x_again = torch.empty((rows, cols), dtype=torch.float32, device=x.device) if need_x and split else None
    programs = _programs(rows, x.device)
    partial = torch.empty((programs, cols), dtype=torch.float32, device=x.device) if need_w else None
    if rows and cols and (need_x or need_w):
        block = triton.next_power_of_2(cols)
        placeholder = grad_output  # a pointer the kernel never writes (NEED_X or SPLIT off)
        with on_device(x):
            _rms_norm_backward_kernel[(programs,)](
                grad_output, x, weight, rstd, placeholder if grad_x is None else grad_x,
                placeholder if grad_x_again is None else grad_x_again, placeholder if partial is None else partial,
                rows, cols, float(cols), triton.cdiv(rows, programs), grad_output.stride(0), x.stride(0), cols,
                NEED_X=bool(need_x), SPLIT=bool(split and need_x), NEED_W=bool(need_w), BLOCK=block,
                num_warps=_warps(block), enable_fp_fusion=False)
    grad_weight = None
    if need_w:
        summed = partial.sum(0) if rows else torch.zeros(cols, dtype=torch.float32, device=x.device)
        grad_weight = summed.to(grad_output.dtype).to(weight.dtype)
    return grad_x, grad_x_again, grad_weight
