"""Triton kernel: both LoRA adapter gradients from one pass over ``g`` and one over ``x``.

For a LoRA layer ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` with ``x`` [M, K] (the adapter's input, after dropout), ``g = ∂L/∂y``
[M, N], ``A`` [r, K], ``B`` [N, r] and ``u = x Aᵀ`` [M, r] saved by the forward::

    v  = g B            [M, r]   (returned: the dense dX adds s·v A, one more GEMM outside)
    dB = s · gᵀ u       [N, r]
    dA = s · vᵀ x       [r, K]

Each program owns ``BLOCK_M`` rows of M.  It streams its rows of ``g`` once, in ``BLOCK_N`` column tiles: each
tile feeds both ``v += g_t B_t`` and this tile's share of ``dB`` (``g_tᵀ u``); then it streams its rows of ``x``
once for ``dA += vᵀ x_t``.  Plain torch reads ``g`` twice (``g B`` and ``gᵀ u``).  The partial dA/dB of the programs
are summed with fp32 atomics, so the summation order (and the last bits of dA, dB) may differ between runs on a
GPU.  Products and sums are fp32 (``input_precision="ieee"`` unless the user allowed TF32 for fp32 matmuls);
``r`` is padded to a power of two >= 16 inside the kernel (tl.dot's minimum) and must be <= ``MAX_RANK``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import interpreted, time_in_place

__all__ = ["lora_grads", "MAX_RANK"]

MAX_RANK = 128


@triton.jit
def _lora_grads_kernel(
    g_ptr, x_ptr, u_ptr, b_ptr, v_ptr, da_ptr, db_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br,
    scaling,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_m = offs_m < M
    mask_r = offs_r < R
    u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)

    v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        if IEEE:
            v = tl.dot(g, b, v, input_precision="ieee")
        else:
            v = tl.dot(g, b, v)
        if NEED_B:
            if IEEE:
                part = tl.dot(tl.trans(g), u, input_precision="ieee")
            else:
                part = tl.dot(tl.trans(g), u)
            tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], part * scaling,
                          mask=mask_n[:, None] & mask_r[None, :])
    tl.store(v_ptr + offs_m[:, None] * R + offs_r[None, :], v, mask=mask_m[:, None] & mask_r[None, :])

    if NEED_A:
        v_t = tl.trans(v)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            if IEEE:
                part = tl.dot(v_t, x, input_precision="ieee")
            else:
                part = tl.dot(v_t, x)
            tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], part * scaling,
                          mask=mask_r[:, None] & mask_k[None, :])


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 128, 128, 4, 3),
        (32, 128, 128, 4, 3),
        (32, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 64, 64, 8, 3),
    ]
]
# tuning launches run the kernel several times: the atomically accumulated dA and dB are zeroed before each
_lora_grads_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["N", "K", "R", "NEED_A", "NEED_B"],
                                    reset_to_zero=["da_ptr", "db_ptr"], do_bench=time_in_place)(_lora_grads_kernel)
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def lora_grads(grad_output: torch.Tensor, input: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor,
               scaling: float, need_a: bool, need_b: bool):
    """``(v, dA, dB)`` for ``g`` = grad_output [M, N], ``x`` = input [M, K], ``u`` [M, r], ``B`` = lora_b [N, r].

    ``v`` is fp32 [M, r]; ``dA`` [r, K] and ``dB`` [N, r] are fp32 (None when not needed).
    """
    M, N = grad_output.shape
    K = input.shape[1]
    R = lora_b.shape[1]
    if R > MAX_RANK:
        raise ValueError(f"lora_grads: rank {R} is above the kernel's maximum {MAX_RANK}")
    device = grad_output.device
    v = torch.empty(M, R, dtype=torch.float32, device=device)
    grad_a = torch.zeros(R, K, dtype=torch.float32, device=device) if need_a else v  # v: an unused valid pointer
    grad_b = torch.zeros(N, R, dtype=torch.float32, device=device) if need_b else v
    interpret = interpreted(device)
    fp32_in = torch.float32 in (grad_output.dtype, input.dtype, lora_b.dtype)
    ieee = interpret or not (fp32_in and torch.backends.cuda.matmul.allow_tf32)
    args = (
        grad_output, input, u, lora_b, v, grad_a, grad_b,
        M, N, K, R,
        grad_output.stride(0), grad_output.stride(1), input.stride(0), input.stride(1),
        u.stride(0), u.stride(1), lora_b.stride(0), lora_b.stride(1),
        float(scaling),
    )
    flags = dict(NEED_A=bool(need_a), NEED_B=bool(need_b), IEEE=ieee, BLOCK_R=max(16, triton.next_power_of_2(R)))
    if interpret:
        grid = (triton.cdiv(M, _INTERPRET_BLOCKS["BLOCK_M"]),)
        _lora_grads_kernel[grid](*args, **flags, **_INTERPRET_BLOCKS)
    else:
        _lora_grads_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](*args, **flags)
    return v, (grad_a if need_a else None), (grad_b if need_b else None)
