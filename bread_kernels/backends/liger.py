"""Liger-Kernel's fused linear cross-entropy behind the Triton backend: on a GPU, the head+loss chunk loop of a
frozen head, an active one, and an on-the-fly head whose dW is accumulated in the forward runs Liger's kernels
(one pass per chunk of logits: softmax, loss and gradient in place) instead of this library's torch loop.

For hidden states ``h`` [T, H], head ``W`` [V, H], bias ``b`` [V] or None and targets ``y`` [T] (−1: an ignored
token), :func:`linear_cross_entropy` returns, for the *summed* loss ``S = Σ_{t: y_t ≥ 0} CE(z_t, y_t)`` of the
logits ``z = c·tanh((h Wᵀ + b)/c)`` (soft-capping ``c`` optional)::

    S  0-d fp32,   ∂S/∂h [T, H] (h's dtype),   ∂S/∂W [V, H] (W's dtype, accumulated over the chunks in fp32),
    ∂S/∂b [V] (b's dtype)

so the caller scales every one by ``γ/n`` in its backward.  Liger computes the logits in h's dtype and soft-caps
and normalises them in fp32 inside its kernel (HF soft-caps in the logits' dtype first: the same in fp32, one
rounding apart in bf16).

Liger's chunk loop, ``liger_kernel.ops.fused_linear_cross_entropy.fused_linear_cross_entropy_forward``, is not its
public API (the public one is an ``autograd.Function`` whose backward cannot carry this library's update), so this
is the one module that calls it: the version is checked against the tested range and the keywords it must take
against its signature, and ``tests/backends/test_liger.py`` fails loudly when either changes.  Where it cannot
serve (not installed, another version), :func:`unavailable_reason` says why and the caller runs its own loop.

Liger reads the count of non-ignored tokens on the host (``.item()``) in the forward: one host sync per step,
outside the backward.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

__all__ = ["linear_cross_entropy", "unavailable_reason", "TESTED_VERSIONS", "liger_chunk_rows"]

#: liger-kernel releases whose internal chunk loop this module was written against (``>=`` first, ``<`` second)
TESTED_VERSIONS = ("0.8", "0.9")
_KEYWORDS = ("ce_weight", "bias", "ignore_index", "reduction", "softcap", "accum_dtype", "compute_gradients",
             "weight_requires_grad", "chunk_mem_const")
_RETURNS = 7  # loss, z_loss, token_accuracy, predicted_tokens, grad_input, grad_weight, grad_bias


@functools.cache
def _forward():
    """(Liger's chunk loop, None) or (None, why it cannot serve)."""
    try:
        from importlib.metadata import version

        from packaging.version import Version

        installed = version("liger-kernel")
    except Exception as exc:  # not installed (PackageNotFoundError), or no packaging
        return None, f"liger-kernel is not installed ({type(exc).__name__}: {exc}); pip install 'liger-kernel>=0.8,<0.9'"
    low, high = TESTED_VERSIONS
    if not Version(low) <= Version(installed) < Version(high):
        return None, (f"liger-kernel {installed} is installed, but bread_kernels drives its internal chunk loop and "
                      f"was tested with >={low},<{high}; pip install 'liger-kernel>={low},<{high}'")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
    except Exception as exc:
        return None, f"liger-kernel {installed} failed to import its fused linear cross-entropy ({exc})"
    missing = [k for k in _KEYWORDS if k not in inspect.signature(fused_linear_cross_entropy_forward).parameters]
    if missing:
        return None, (f"liger-kernel {installed}'s fused_linear_cross_entropy_forward lacks the keywords "
                      f"{', '.join(missing)} that bread_kernels passes")
    return fused_linear_cross_entropy_forward, None


def unavailable_reason() -> str | None:
    """None where Liger's fused linear cross-entropy can serve, else why not (said once as a warning)."""
    reason = _forward()[1]
    if reason is not None and not _warned:
        _warned.append(reason)
        warnings.warn(f"bread_kernels: the fused loss runs its own torch loop on the GPU: {reason}", RuntimeWarning,
                      stacklevel=3)
    return reason


_warned: list[str] = []


def liger_chunk_rows(tokens: int, hidden: int, vocab: int, mem_const: int) -> int:
    """The rows of one block of logits in Liger's loop for ``chunk_mem_const = mem_const`` (its own rule)."""
    inc_factor = -(-vocab // (mem_const * hidden))
    rows = 1 << max(0, (-(-tokens // inc_factor) - 1).bit_length())
    return max(1, min(rows, tokens))


def _mem_const_for(tokens: int, hidden: int, vocab: int, max_rows: int) -> int:
    """The largest ``chunk_mem_const`` whose blocks have at most ``max_rows`` rows (1, Liger's smallest blocks — about
    the hidden states' size — where even those are larger)."""
    best = 1
    for const in range(2, -(-vocab // max(1, hidden)) + 1):
        if liger_chunk_rows(tokens, hidden, vocab, const) > max_rows:
            break
        best = const
    return best


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, softcap: float | None, max_rows: int, need_grads: bool,
                         need_dw: bool):
    """``(S, ∂S/∂h, ∂S/∂W, ∂S/∂b)`` as in the module docstring, computed by Liger's kernels.

    Args:
        hidden, weight, bias: [T, H], [V, H], [V] or None, in one (the compute) dtype.
        targets: [T] int64, −1 for an ignored token; every other one in [0, V) (checked on the device).
        softcap: the soft-capping ``c``, or None.
        max_rows: the rows one block of logits may have (the caller's memory budget).
        need_grads: compute ∂S/∂h (and ∂S/∂b); False: the loss only (the gradients are None).
        need_dw: with ``need_grads``, compute ∂S/∂W too.
    """
    forward, reason = _forward()
    if forward is None:
        raise RuntimeError(f"bread_kernels: Liger's fused linear cross-entropy cannot serve: {reason}")
    vocab = weight.shape[0]
    if targets.numel():  # Liger's kernel reads the logit of y unchecked: fail on the device, without a host sync
        torch._assert_async((targets < vocab).all(), "fused_head_loss: a target is outside the vocabulary")
    tokens = hidden.shape[0]
    mem_const = _mem_const_for(tokens, hidden.shape[1], vocab, max_rows)
    out = forward(hidden, weight, targets, ce_weight=None, bias=bias, ignore_index=-1, reduction="sum",
                  softcap=softcap, accum_dtype=torch.float32, compute_gradients=need_grads,
                  weight_requires_grad=need_grads and need_dw, chunk_mem_const=mem_const)
    if not isinstance(out, tuple) or len(out) != _RETURNS:
        raise RuntimeError(f"bread_kernels: Liger's fused_linear_cross_entropy_forward returned "
                           f"{len(out) if isinstance(out, tuple) else type(out).__name__} values, not the "
                           f"{_RETURNS} of the tested versions; pin liger-kernel to {TESTED_VERSIONS}")
    loss, _, _, _, dh, dw, db = out
    if not need_grads:
        dh = db = None
    return loss.float(), dh, dw, db
