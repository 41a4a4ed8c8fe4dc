"""The rotary position embedding's element work (Llama's rotate-half form), forward and backward, into ``out``.

For ``x`` [B, H, S, D] (D even, ``h = D/2``) and ``cos``, ``sin`` [1 or B, S, D] of x's dtype, with
``rotate_half(v) = cat(−v[..., h:], v[..., :h])`` and its transpose ``rotate_halfᵀ(v) = cat(v[..., h:], −v[..., :h])``::

    forward   out = x · cos + rotate_half(x) · sin           (transformers' ``apply_rotary_pos_emb``, for q and k)
    backward  out = g · cos + rotate_halfᵀ(g · sin)          (g = ∂L/∂(x·cos + rotate_half(x)·sin); cos, sin constant)

each product rounded to the dtype and then the sum, as autograd's ops round: its negation is exact and the zeros its
slice gradients add change nothing, so both are autograd's values bit for bit.  :func:`rotated` is the torch form
every backend falls back to (the forward is transformers' expression itself); the native backend runs
``bread_kernels::rotary_`` (``csrc/rotary.cpp``), one pass where these are five or six ops and their temporaries.
"""

from __future__ import annotations

import torch

__all__ = ["rotated", "TorchRotary"]


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (``backward``: ``x·cos + rotate_halfᵀ(x·sin)``) in torch ops, into ``out``
    where given (a new tensor otherwise: then ops autograd can differentiate); ``cos`` and ``sin`` [1 or B, S, D]
    are broadcast over the heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    if backward:
        scaled = x * sin
        return torch.add(x * cos, torch.cat((scaled[..., half:], -scaled[..., :half]), dim=-1), out=out)
    return torch.add(x * cos, torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin, out=out)


class TorchRotary:
    """The backends' ``rotary_`` in torch ops (the native backend overrides it)."""

    def rotary_(self, out, x, cos, sin, backward) -> None:
        rotated(x, cos, sin, backward, out=out)
