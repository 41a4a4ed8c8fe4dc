"""The LoRA adapter gradients with plain GEMMs (the CPU backends, and the Triton backend's fallback above its
kernel's maximum rank).

With ``g`` [M, N], the adapter input ``x`` [M, K], ``u = x Aᵀ`` [M, r] from the forward and ``B`` [N, r]::

    v = g B,   dB = s · gᵀ u,   dA = s · vᵀ x

three GEMMs that share the two rank-r intermediates; nothing of size N×K or M×N is allocated.  Results are in
``B``'s dtype (the adapters' compute dtype — their own, or autocast's, for which the caller passes B cast to it; ``g``
is cast to it first, as peft's forward casts the adapter input).

``v`` and ``dB`` are computed transposed, ``vᵀ = Bᵀ gᵀ`` [r, M] and ``dBᵀ = s · uᵀ g`` [r, N], and returned as
transposed views: the same products, with the rank-r operand on the left, where BLAS runs its fast path.  On a
2-thread AVX-512 CPU at M = 1024, r = 8 and N = 512…1376 (``bench/results/lora_gemm_layout_cpu.txt``): fp32 ``v``
2.5-3x and ``dB`` 3x faster than ``g B`` and ``gᵀ u``, bf16 ``dB`` 1.6-1.8x, bf16 ``v`` the same.
"""

from __future__ import annotations

import torch


def lora_grads_gemm(grad_output: torch.Tensor, input: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float, need_a: bool, need_b: bool):
    """``(v, dA, dB)``; ``dA``/``dB`` are None when not needed."""
    g = grad_output.to(lora_b.dtype)
    v = torch.mm(lora_b.t(), g.t()).t()
    grad_b = torch.mm(u.to(lora_b.dtype).t(), g).mul_(scaling).t() if need_b else None
    grad_a = torch.mm(v.t(), input.to(lora_b.dtype)).mul_(scaling) if need_a else None
    return v, grad_a, grad_b
