"""The update epilogue in plain torch, and the counter-based random bits every backend shares.

Given an fp32 gradient ``G`` (a whole dW, a row chunk of it, or a bias gradient) and the parameter ``P`` it belongs
to, the epilogue computes, element by element and in fp32::

    u     = G            (SGD)      or  sign(G)  (SIGN)
    P_new = fp32(P) - step · u                        # two fp32 roundings: step·u, then the subtraction
    P     = round(P_new) to P.dtype                    # nearest-even, or stochastic

Stochastic rounding uses 32 random bits per element from ``random_bits(offset + i, seed)``, where ``i`` is the
element's row-major index in the *logical* parameter (so a chunk, a transposed view or a ZeRO shard draw the same
bits as the whole tensor would).  bf16: add the low 16 bits to the fp32 bit pattern and truncate (torchao's
``_fp32_to_bf16_sr``).  fp16: with ``ulp`` the fp16 spacing at ``|P_new|`` (subnormals included),
``q = P_new/ulp``, ``P = ulp · (floor(q) + [r < q - floor(q)])`` with ``r = bits[31:8] · 2⁻²⁴``.  Both round up with probability equal to the
distance from the lower neighbour in ulps, so ``E[P] = P_new`` exactly.

The hash and its keys are :mod:`bread_kernels.rounding`'s; the Triton kernel and the C++ extension implement the
same function bit for bit (tests compare them).
"""

from __future__ import annotations

import torch

from ..rounding import MASK32, Rounding, rng_keys

def _lowbias32_tensor(x: torch.Tensor) -> torch.Tensor:
    # int64 holding uint32 values; products wrap in int64 but the low 32 bits are exact.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def random_bits(index: torch.Tensor, key1: int, key2: int) -> torch.Tensor:
    """32 random bits (as int64 in [0, 2³²)) for each element counter in ``index`` (int64)."""
    h = _lowbias32_tensor((index & MASK32) ^ key1)
    return _lowbias32_tensor(h ^ key2)


def round_to_dtype(value: torch.Tensor, dtype: torch.dtype, rounding: Rounding, bits: torch.Tensor | None):
    """Round an fp32 tensor to ``dtype``: nearest-even, or stochastically with the given random bits."""
    if rounding is Rounding.NEAREST or dtype == torch.float32:
        return value.to(dtype)
    if dtype == torch.bfloat16:
        pattern = value.view(torch.int32).to(torch.int64) + (bits & 0xFFFF)
        return (pattern & ~0xFFFF).to(torch.int32).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        exponent = ((value.view(torch.int32) >> 23) & 0xFF) - 127
        exponent = exponent.clamp(-14, 15)
        ulp = ((exponent - 10 + 127) << 23).to(torch.int32).view(torch.float32)
        inv_ulp = ((127 - (exponent - 10)) << 23).to(torch.int32).view(torch.float32)
        uniform = (bits >> 8).to(torch.float32) * 2.0**-24
        scaled = value * inv_ulp  # exact: a power of two
        lower = torch.floor(scaled)
        return ((lower + (uniform < scaled - lower).to(torch.float32)) * ulp).to(torch.float16)
    raise TypeError(f"stochastic rounding supports bf16/fp16/fp32 parameters, got {dtype}")


def finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: no element of any of them is inf or nan.  One min/max reduction
    per tensor (nan propagates through it; ``isfinite`` would build masks of the tensor's size).  No host sync."""
    extremes = [value.float() for t in tensors if t.numel() for value in torch.aminmax(t)]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return torch.isfinite(torch.stack(extremes)).all()


def dw_row_chunks(grad_output: torch.Tensor, input: torch.Tensor, rows: int):
    """``(start, stop, dW[start:stop])`` of ``dW = gᵀx`` (g [M, N], x [M, K]) in g's dtype, ``rows`` output rows at a
    time in one reused buffer: each chunk is overwritten by the next."""
    n_rows = grad_output.shape[1]
    rows = max(1, min(rows, n_rows))
    buffer = torch.empty(rows, input.shape[1], dtype=grad_output.dtype, device=grad_output.device)
    for start in range(0, n_rows, rows):
        stop = min(n_rows, start + rows)
        yield start, stop, torch.mm(grad_output[:, start:stop].t(), input, out=buffer[: stop - start])


def dw_finite_flag(grad_output: torch.Tensor, input: torch.Tensor, rows: int, finite=finite_flag) -> torch.Tensor:
    """Whether ``dW = gᵀx`` (g [M, N], x [M, K] in one dtype) is finite in that dtype, as autograd's ``.grad``
    would be; decided without writing anything, on the device.  fp16 (a dW past 65,504 from finite operands: a
    loss-scaled backward): the GEMMs, ``rows`` output rows at a time in one reused buffer.  bf16/fp32: the bound
    ``M · max|g| · max|x| <`` the dtype's largest value (3.4·10³⁸; only absurd gradients fail it, and a non-finite
    g or x makes it nan or inf), no GEMM.  ``finite``: the backend's flag of a tensor."""
    if grad_output.dtype == torch.float16:
        flags = [finite(chunk) for _, _, chunk in dw_row_chunks(grad_output, input, rows)]
        if not flags:
            return torch.ones((), dtype=torch.bool, device=grad_output.device)
        return flags[0] if len(flags) == 1 else torch.stack(flags).all()
    if not grad_output.numel() or not input.numel():
        return torch.ones((), dtype=torch.bool, device=grad_output.device)
    (g_min, g_max), (x_min, x_max) = torch.aminmax(grad_output), torch.aminmax(input)
    # in fp32 (every device has it): the product overflows to inf only where the bound is past fp32's range anyway
    bound = torch.maximum(-g_min, g_max).float() * torch.maximum(-x_min, x_max).float() * float(grad_output.shape[0])
    return bound < torch.finfo(grad_output.dtype).max


def apply_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    step: float,
    sign: bool,
    rounding: Rounding,
    seed: int,
    offset: int = 0,
    ok: torch.Tensor | None = None,
) -> None:
    """``param -= step · (sign(grad) if sign else grad)`` in fp32, rounded into ``param`` (any strides, 1-D or 2-D).

    ``grad`` (fp32, or bf16/fp16 widened to fp32 first) has ``param``'s shape.  ``offset`` is the logical row-major index of ``param[0, 0]`` in the
    full parameter, so random bits do not depend on how the parameter is chunked.  ``ok`` (a 0-dim bool tensor)
    False leaves ``param`` as it was, decided on the device.  Uses a bounded number of temporaries of ``grad``'s
    size (the caller chunks: :meth:`~bread_kernels.backends.torch_backend.TorchBackend.apply_update_`).
    """
    grad = grad.float()
    update = torch.sign(grad) if sign else grad
    new = param.float() - update * step
    bits = None
    rounding = rounding if param.dtype != torch.float32 else Rounding.NEAREST
    if rounding is Rounding.STOCHASTIC:
        index = torch.arange(param.numel(), dtype=torch.int64, device=param.device).view(param.shape) + offset
        bits = random_bits(index, *rng_keys(seed))
    rounded = round_to_dtype(new, param.dtype, rounding, bits)
    param.copy_(rounded if ok is None else torch.where(ok, rounded, param))
