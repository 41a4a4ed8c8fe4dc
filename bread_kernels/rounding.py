"""How an updated low-precision weight is rounded, and the counter-based random bits behind stochastic rounding.

The bottom of the package: :class:`Rounding`, the integer codes the kernels receive for it, and the host side of
the hash that every backend (the Triton kernel, the C++ epilogue, the torch epilogue) implements bit for bit.  The
random bits of element ``i`` of a parameter are ``lowbias32(lowbias32(i ^ k1) ^ k2)`` with ``(k1, k2) =
rng_keys(seed)``: Wellons' ``lowbias32`` applied twice with seed-derived keys, so a chunk, a transposed view or a
ZeRO shard draw the same bits as the whole tensor would.
"""

from __future__ import annotations

import enum

import torch

__all__ = ["Rounding", "ROUNDING_CODES", "MASK32", "lowbias32", "rng_keys", "FLOAT_DTYPES"]

MASK32 = 0xFFFFFFFF

#: the floating dtypes the engine's weights, activations and gradients take (and its kernels read and write)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Rounding(enum.Enum):
    """How an updated low-precision weight is rounded back to its dtype.

    ``NEAREST``: round-to-nearest-even, what ``p.add_(g, alpha=-lr)`` does.  In bf16 it drops every update smaller
    than half an ulp of the weight (for |w| ≈ 1: 2⁻⁹ ≈ 0.002), so small learning rates silently train nothing.
    ``STOCHASTIC``: round up with probability equal to the distance to the lower neighbour, so the expected
    rounded weight equals the exact fp32 result.  Random bits come from a counter-based hash of
    (seed, element index): reproducible, and the same on every backend and every rank.
    ``AUTO`` (the default): stochastic for bf16/fp16 weights, nearest for fp32 (where it is exact to fp32).
    An fp32 weight is written as its fp32 update computes it under every rounding: the update is fp32 arithmetic,
    which leaves nothing below the weight's precision to round (``STOCHASTIC`` there gives ``NEAREST``'s values).
    """

    AUTO = "auto"
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"

    def resolve(self, dtype: torch.dtype) -> "Rounding":
        if self is not Rounding.AUTO:
            return self
        return Rounding.STOCHASTIC if dtype in (torch.bfloat16, torch.float16) else Rounding.NEAREST


#: what the kernels receive for a resolved rounding
ROUNDING_CODES = {Rounding.NEAREST: 0, Rounding.STOCHASTIC: 1}


def lowbias32(x: int) -> int:
    """Wellons' 32-bit integer hash on a Python int (host side)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def rng_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a 64-bit seed; what the kernels receive instead of the seed."""
    seed &= 0xFFFFFFFFFFFFFFFF
    return lowbias32((seed & MASK32) ^ 0x9E3779B9), lowbias32((seed >> 32) ^ 0x85EBCA6B)
