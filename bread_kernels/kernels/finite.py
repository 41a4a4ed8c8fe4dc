"""Triton kernel: the finiteness flag of an update's operands, in one launch per two tensors.

``finite_flag(*tensors, ok=None)`` returns a 0-dim bool tensor on the tensors' device: ``ok`` (True when None) and'ed
with "no element of any tensor is inf or nan".  The flag starts as a copy of ``ok`` (or True) and each program of
the kernel clears it where its block of elements holds a non-finite value; no program ever sets it, so the order in
which programs run does not matter and no atomics are needed.  Each element is widened to fp32 (exactly: inf and
nan stay inf and nan) and tested on its bits, exponent all ones, as the native backend's C++ does: no float
comparison a compiler could fold.

Against the torch form (:func:`bread_kernels.backends.epilogue.finite_flag`: an ``aminmax`` per tensor, casts, a
``stack``, ``isfinite`` and ``all``: five to nine launches for g and x), the GPU update path runs two: the flag's
copy and this kernel (three with a bias's gradient) — on a step of a BCD variant that updates every weight on the
fly, that is per weight, and the host's launch time is what bounds it at these sizes.

Like Liger-Kernel's ops: the kernel, then the launch function that flattens.  Program offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import FLOAT_DTYPES

__all__ = ["finite_flag"]

_BLOCK = 1024


@triton.jit
def _clear_unless_finite_kernel(a_ptr, n_a, b_ptr, n_b, flag_ptr, BLOCK: tl.constexpr):
    """Programs ``[0, cdiv(n_a, BLOCK))`` read flat ``a``, the rest flat ``b``; a program that meets inf or nan
    writes 0 to the one-byte flag at ``flag_ptr``."""
    pid = tl.program_id(0).to(tl.int64)
    blocks_a = tl.cdiv(n_a, BLOCK)
    lanes = tl.arange(0, BLOCK)
    if pid < blocks_a:
        offsets = pid * BLOCK + lanes
        values = tl.load(a_ptr + offsets, mask=offsets < n_a, other=0.0).to(tl.float32)
    else:
        offsets = (pid - blocks_a) * BLOCK + lanes
        values = tl.load(b_ptr + offsets, mask=offsets < n_b, other=0.0).to(tl.float32)
    exponent = values.to(tl.int32, bitcast=True) & 0x7F800000  # all ones exactly for inf and nan
    finite = tl.min((exponent != 0x7F800000).to(tl.int32), axis=0)  # 1: every element of the block is finite
    # the flag's one byte, written by the first lane only, and only to clear it
    tl.store(flag_ptr + lanes * 0, tl.zeros([BLOCK], dtype=tl.uint8), mask=(lanes + finite) == 0)


def finite_flag(*tensors: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
    """0-dim bool on the tensors' device: ``ok`` (a 0-dim bool there, or None for True) and no element of any of
    ``tensors`` (fp32/bf16/fp16, any shape and strides) is inf or nan.  Nothing is read on the host."""
    if not tensors:
        raise ValueError("finite_flag: give at least one tensor")
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"finite_flag: tensors on {device} and {t.device}; give tensors of one device")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"finite_flag: tensors must be float32, bfloat16 or float16, got {t.dtype}")
    if ok is None:
        flag = torch.ones((), dtype=torch.bool, device=device)
    else:
        if ok.dtype != torch.bool or ok.numel() != 1 or ok.device != device:
            raise ValueError(f"finite_flag: ok must be a one-element bool tensor on {device}, got {ok.dtype} "
                             f"{tuple(ok.shape)} on {ok.device}")
        flag = ok.reshape(()).clone()
    byte = flag.view(torch.uint8)
    flat = [t.reshape(-1) for t in tensors if t.numel()]  # a view where t is contiguous (g and x are)
    for start in range(0, len(flat), 2):
        a = flat[start]
        b = flat[start + 1] if start + 1 < len(flat) else a[:0]
        grid = (triton.cdiv(a.numel(), _BLOCK) + triton.cdiv(b.numel(), _BLOCK),)
        _clear_unless_finite_kernel[grid](a, a.numel(), b, b.numel(), byte, BLOCK=_BLOCK)
    return flag
