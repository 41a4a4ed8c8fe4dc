"""The rotary position embedding's element work (Llama's rotate-half form), forward and backward, into ``out``.

For ``x`` [B, H, S, D] (D even, ``h = D/2``) and ``cos``, ``sin`` [1 or B, S, D], with
``rotate_half(v) = cat(−v[..., h:], v[..., :h])`` and its transpose ``rotate_halfᵀ(v) = cat(v[..., h:], −v[..., :h])``::

    forward   out = x · cos + rotate_half(x) · sin           (transformers' ``apply_rotary_pos_emb``, for q and k)
    backward  out = g · cos + rotate_halfᵀ(g · sin)          (g = ∂L/∂(x·cos + rotate_half(x)·sin); cos, sin constant)

each product rounded to the output's dtype and then the sum, as autograd's ops round: its negation is exact, the zeros
its slice gradients add change nothing, and where the dtypes differ (a bf16 q under autocast with an fp32 model's fp32
cos) the forward computes in the promoted dtype and each gradient term is rounded to q's dtype before the sum, so both
are autograd's values bit for bit.  :func:`rotated` is the torch form
every backend falls back to (the forward is transformers' expression itself); the native backend runs
``bread_kernels::rotary_`` (``csrc/rotary.cpp``), one pass where these are five or six ops and their temporaries.
"""

from __future__ import annotations

import torch

from ..rounding import FLOAT_DTYPES
from . import records_ops

__all__ = ["rotated", "one_pass_serves", "TorchRotary"]


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (``backward``: ``x·cos + rotate_halfᵀ(x·sin)``) in torch ops, each product
    rounded to ``dtype`` (``out``'s; by default the promoted dtype of x and cos) before the sum, into ``out`` where
    given (a new tensor otherwise: then ops autograd can differentiate); ``cos`` and ``sin`` [1 or B, S, D] are
    broadcast over the heads."""
    dtype = out.dtype if out is not None else dtype or torch.promote_types(x.dtype, cos.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    if backward:
        scaled = (x * sin).to(dtype)
        return torch.add((x * cos).to(dtype), torch.cat((scaled[..., half:], -scaled[..., :half]), dim=-1), out=out)
    return torch.add((x * cos).to(dtype), (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin).to(dtype),
                     out=out)


def one_pass_serves(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether a backend's one-pass op (native C++, Triton) takes these tensors: x and out fp32/bf16/fp16 with a unit
    last stride, cos and sin contiguous in one of those dtypes, and no autograd recording the ops (a double
    backward: its torch form is what autograd differentiates)."""
    return x.dtype in FLOAT_DTYPES and out.dtype in FLOAT_DTYPES and cos.dtype == sin.dtype \
        and cos.dtype in FLOAT_DTYPES \
        and x.stride(-1) == 1 and out.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous() \
        and not records_ops(x, cos, sin)


class TorchRotary:
    """The backends' ``rotary_`` in torch ops (the native backend overrides it)."""

    def rotary_(self, out, x, cos, sin, backward) -> None:
        rotated(x, cos, sin, backward, out=out)
