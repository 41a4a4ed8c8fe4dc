"""``target += alpha · other`` across dtypes, rounded once: the sums where a low-precision tensor meets an fp32 one.

For ``target`` [*] and ``other`` [*] (one shape; each fp32, bf16 or fp16), element by element::

    term   = alpha · other           in other's dtype (what ``other * alpha`` computes; ``other`` itself for alpha 1)
    term   = round(term) to target's dtype          only with ``round_term`` (an addend rounded first, as autograd
                                                    rounds a gradient to its tensor's dtype before summing it)
    target = round(fp32(target) + fp32(term))       nearest-even, to target's dtype

which is what ``target.add_(term)`` computes: torch sums mixed dtypes in fp32 and rounds once.  The callers:

* a peft LoRA layer with fp32 adapters on a bf16/fp16 base: ``y = round(fp32(x Wᵀ) + s · (u Bᵀ))`` (peft's
  ``result + lora_B(...) * scaling``, then ``.to``), ``other`` the fp32 [M, N] adapter output, ``alpha = s``;
* its backward's ``dX = g W + round(s · v A)`` (``round_term``: autograd sums the adapter branch's gradient after
  the cast back to x's dtype);
* the fused loss's fp32 head dW accumulating each chunk's bf16/fp16 [V, H] GEMM.

On a CPU torch's mixed-dtype add first copies the low-precision operand to fp32 and writes the fp32 sum before
rounding it: about 30 bytes of memory traffic per element where one pass needs 8-12.  The native backend's
``bread_kernels::add_scaled_`` is that one pass (``csrc/epilogue.cpp``); this module is the torch form every backend
falls back to, in row slices on a CPU so the fp32 copy it makes stays within :data:`SLICE_ELEMENTS`.
"""

from __future__ import annotations

import torch

__all__ = ["add_scaled_", "TorchSums", "SLICE_ELEMENTS"]

#: on a CPU, the most elements one mixed-dtype add casts at once (4 MiB of fp32)
SLICE_ELEMENTS = 1 << 20


def add_scaled_(target: torch.Tensor, other: torch.Tensor, alpha: float = 1.0, round_term: bool = False) -> None:
    """``target = round(fp32(target) + alpha · other)`` in place (see the module docstring); ``other`` unchanged."""
    if target.shape != other.shape:
        raise ValueError(f"add_scaled_: target shape {tuple(target.shape)} != other shape {tuple(other.shape)}")
    # only an add of two dtypes copies an operand to fp32 (whole, on a CPU): slice that one
    if target.dtype == other.dtype or target.device.type != "cpu" or target.dim() == 0 \
            or target.numel() <= SLICE_ELEMENTS:
        _add_term_(target, other, alpha, round_term)
        return
    rows = target.shape[0]
    step = max(1, SLICE_ELEMENTS // max(1, target.numel() // rows))
    for start in range(0, rows, step):
        _add_term_(target[start:start + step], other[start:start + step], alpha, round_term)


def _add_term_(target: torch.Tensor, other: torch.Tensor, alpha: float, round_term: bool) -> None:
    term = other if alpha == 1.0 else other * alpha
    if round_term:
        term = term.to(target.dtype)
    target.add_(term)


class TorchSums:
    """The backends' ``add_scaled_`` and ``add_product_`` in torch ops (the native backend overrides both)."""

    def add_scaled_(self, target, other, alpha=1.0, round_term=False) -> None:
        add_scaled_(target, other, alpha, round_term)

    def add_product_(self, target, v, a, alpha=1.0, round_term=False) -> None:
        """``add_scaled_(target, v @ a, ...)``: the rank-r product by BLAS (on a GPU the add is one kernel)."""
        add_scaled_(target, v @ a, alpha, round_term)
