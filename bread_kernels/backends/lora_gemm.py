"""The LoRA adapter gradients with plain GEMMs (the CPU backends — the native one where it does not read a bf16/fp16
g as it is, :meth:`~.native.NativeBackend.lora_grads`; on a GPU cuBLAS, the Triton backend's default, or its
fallback above its kernel's maximum rank with ``BREAD_LORA_KERNEL=triton``).

With ``g`` [M, N], the adapter input ``x`` [M, K], ``u = x Aᵀ`` [M, r] from the forward and ``B`` [N, r]::

    v = g B,   dB = s · gᵀ u,   dA = s · vᵀ x

three GEMMs that share the two rank-r intermediates; nothing of size N×K or M×N is allocated.  Results are in
``B``'s dtype (the adapters' compute dtype — their own, or autocast's, for which the caller passes B cast to it; ``g``
is cast to it first, as peft's forward casts the adapter input).

On a CPU ``v`` and ``dB`` are computed transposed, ``vᵀ = Bᵀ gᵀ`` [r, M] and ``dBᵀ = s · uᵀ g`` [r, N], and returned
as transposed views: the same products with the rank-r operand on the left, where the CPU's BLAS runs its fast path.
The adapter backward (these three GEMMs with the casts and the ``dX += s · v A`` around them) then runs 1.4-3x
faster with fp32 adapters on an fp32 layer, 1.25-2x with peft's fp32 adapters on a bf16 layer and 1.05-1.25x with
bf16 adapters, on a 2-thread AVX-512 CPU at M = 1024, r = 8, N and K of 512 and 1376 (``python -m
bench.lora_gemm_layout``, ``bench/results/lora_gemm_layout_cpu.txt``; a shared machine, rows ±30%).  On a GPU the
products keep their written form (not measured there).
"""

from __future__ import annotations

import torch


def lora_grads_gemm(grad_output: torch.Tensor, input: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, need_a: bool, need_b: bool):
    """``(v, dA, dB)``; ``dA``/``dB`` are None when not needed."""
    g = grad_output.to(lora_b.dtype)
    u = u.to(lora_b.dtype)
    if g.device.type == "cpu":
        v = torch.mm(lora_b.t(), g.t()).t()
        grad_b = torch.mm(u.t(), g).mul_(scaling).t() if need_b else None
    else:
        v = g @ lora_b
        grad_b = torch.mm(g.t(), u).mul_(scaling) if need_b else None
    grad_a = torch.mm(v.t(), input.to(lora_b.dtype)).mul_(scaling) if need_a else None
    return v, grad_a, grad_b
