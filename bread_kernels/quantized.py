"""Which tensors are quantized weights: stored otherwise than as the plain float32/bf16/fp16 elements the engine
computes with and writes in place.

QLoRA and friends load the base model quantized — bitsandbytes' ``Int8Params`` (int8) and ``Params4bit`` (packed
uint8), HQQ's ``W_q`` (uint8), GPTQ/AWQ's packed int32 buffers, transformers' fp8 linears (``float8_e4m3fn``
weights beside a scale), torchao's and quanto's tensor subclasses (a float dtype outside, int8 data and scales
inside) — and computes each layer from its dequantized weight in the layer's own forward.  Such a weight can be a
frozen operand of plain autograd (LoRA adapters train over it), but no fused function may compute with its raw
elements, and no update (Adam's for the active block, the on-the-fly SGD/sign step) can be written into it: the
engine asks :func:`quantized_weight` before it does either.  The bottom of the package: it imports nothing of it.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["quantized_weight"]


@functools.cache
def _dtensor_class() -> type:
    """``torch.distributed.tensor.DTensor``, or a class no tensor is an instance of (a torch without distributed)."""
    if not torch.distributed.is_available():
        return type("NoDTensor", (), {})
    from torch.distributed.tensor import DTensor

    return DTensor


def quantized_weight(tensor: torch.Tensor) -> str | None:
    """How ``tensor`` is stored, said for a user, where it is a quantized weight; None for a plain tensor of a
    floating dtype wider than a byte (float32, bf16, fp16 — and float64, which :func:`~bread_kernels.patch.patch`
    refuses on its own with the remedy of a cast) or of a complex dtype (a weight an optimizer trains as any other).

    Quantized: an integer or bool dtype (int8, packed uint8/int32), a one-byte float (``float8_*``: transformers' fp8
    linears keep the scale in another parameter), or a tensor subclass holding other tensors inside (torchao's
    ``Int8Tensor``, quanto's ``WeightQBytesTensor``; not ``DTensor``, a sharded plain weight that ``patch`` and the
    optimizers refuse with their own remedies)."""
    if is_traceable_wrapper_subclass(tensor) and not isinstance(tensor, _dtensor_class()):
        return f"a {type(tensor).__name__} (a tensor subclass holding its data in other tensors)"
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return f"stored as {tensor.dtype}"
    if tensor.dtype.itemsize == 1:
        return f"stored as {tensor.dtype}"
    return None
