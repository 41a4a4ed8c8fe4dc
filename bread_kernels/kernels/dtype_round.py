"""Triton helpers the element-wise kernels share: a value rounded as torch rounds a tensor to a dtype, and ``exp`` and
``rsqrt`` as torch's GPU kernels compute them, so that a kernel reproduces the roundings of a chain of torch ops."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

try:  # the CUDA math library's functions (on a GPU: what torch's own kernels call); absent in old Triton releases
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - the interpreter path below does not use it
    libdevice = None

__all__ = ["round_to", "exp", "rsqrt", "on_device"]


@triton.jit
def round_to(value, dtype: tl.constexpr):
    """fp32 ``value`` rounded to ``dtype`` nearest-even, back in fp32 (bf16 on the bit pattern: the interpreter's
    cast truncates; nan stays nan)."""
    if dtype == tl.bfloat16:
        pattern = value.to(tl.uint32, bitcast=True)
        rounded = ((pattern + 0x7FFF + ((pattern >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(value != value, value, rounded)  # a nan's carry would reach the sign bit or give ±0
    return value.to(dtype).to(tl.float32)


@triton.jit
def exp(value, PRECISE: tl.constexpr):
    """``exp`` of fp32 ``value``: the CUDA math library's ``expf`` where ``PRECISE`` (what torch's GPU kernels call,
    for their values), Triton's own (the interpreter's numpy ``exp``) otherwise."""
    if PRECISE:
        return libdevice.exp(value)
    return tl.exp(value)


@triton.jit
def rsqrt(value, PRECISE: tl.constexpr):
    """``rsqrt`` of fp32 ``value``: the CUDA math library's ``rsqrtf`` where ``PRECISE`` (torch's GPU ``rsqrt``),
    Triton's own otherwise."""
    if PRECISE:
        return libdevice.rsqrt(value)
    return tl.math.rsqrt(value)


def on_device(tensor: torch.Tensor):
    """The context a launch runs in: the tensor's CUDA device made current (Triton launches on the current device,
    which need not be the tensor's in a model spread over several GPUs); nothing elsewhere."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
