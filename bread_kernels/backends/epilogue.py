"""The update epilogue in plain torch, and the counter-based random bits every backend shares.

Given an fp32 gradient ``G`` (a whole dW, a row chunk of it, or a bias gradient) and the parameter ``P`` it belongs
to, the epilogue computes, element by element and in fp32::

    u     = G            (SGD)      or  sign(G)  (SIGN)
    P_new = fp32(P) - step · u                        # two fp32 roundings: step·u, then the subtraction
    P     = round(P_new) to P.dtype                    # nearest-even, or stochastic

Stochastic rounding uses 32 random bits per element from ``random_bits_(offset + i, *rng_keys(seed))``, where ``i``
is the element's row-major index in the *logical* parameter (so a chunk, a transposed view or a ZeRO shard draw the
same bits as the whole tensor would).  bf16: add the low 16 bits to the fp32 bit pattern and truncate (torchao's
``_fp32_to_bf16_sr``).  fp16: with ``ulp`` the fp16 spacing at ``|P_new|`` (subnormals included),
``q = P_new/ulp``, ``P = ulp · (floor(q) + [r < q - floor(q)])`` with ``r = bits[31:8] · 2⁻²⁴``.  Both round up with probability equal to the
distance from the lower neighbour in ulps, so ``E[P] = P_new`` exactly.

The hash and its keys are :mod:`bread_kernels.rounding`'s; the Triton kernel and the C++ extension implement the
same function bit for bit (tests compare them).
"""

from __future__ import annotations

import torch

from ..rounding import MASK32, Rounding, rng_keys

def _lowbias32_(x: torch.Tensor, spare: torch.Tensor | None) -> torch.Tensor:
    """The lowbias32 hash of ``x`` (int64 holding uint32 values), in place; ``spare``: an int64 buffer of x's shape
    for the shifted copies (None: allocated).  Products wrap in int64 but the low 32 bits are exact."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=spare))
    x.mul_(0x7FEB352D).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=spare))
    x.mul_(0x846CA68B).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=spare))


def random_bits_(index: torch.Tensor, key1: int, key2: int, spare: torch.Tensor | None = None) -> torch.Tensor:
    """32 random bits (as int64 in [0, 2³²)) for each element counter in ``index`` (int64), written over it."""
    _lowbias32_(index.bitwise_and_(MASK32).bitwise_xor_(key1), spare)
    return _lowbias32_(index.bitwise_xor_(key2), spare)


class FlatBuffers:
    """Named flat buffers allocated at once, handed out as contiguous tensors of a part's shape: a caller that writes
    one parameter in parts (row chunks, vocabulary tiles, expert slices) allocates every temporary its parts need
    before the first part writes, so that running out of memory cannot stop it after the first part has written.
    The views are kept per shape (a write in parts has at most two: its parts', and a shorter last one)."""

    def __init__(self, device: torch.device, numel: int, **dtypes: torch.dtype):
        self.numel = numel
        self._flat = {name: torch.empty(numel, dtype=dtype, device=device) for name, dtype in dtypes.items()}
        self._views: dict[tuple[str, torch.Size], torch.Tensor] = {}

    def take(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The buffer ``name`` as a contiguous tensor of ``shape`` (None where there is no such buffer)."""
        view = self._views.get((name, shape))
        if view is None:
            flat = self._flat.get(name)
            if flat is None:
                return None
            view = self._views[(name, shape)] = flat[: shape.numel()].view(shape)
        return view


class EpilogueBuffers(FlatBuffers):
    """Every temporary :func:`apply_update_` needs for up to ``numel`` elements of a ``dtype`` parameter with
    ``rounding``, allocated at once (:class:`FlatBuffers`).  Per element: the fp32 update (4 bytes), and for
    stochastic rounding the counters and a spare int64 (16), for fp16 two fp32 more (8), and below fp32 the rounded
    value (2)."""

    def __init__(self, numel: int, dtype: torch.dtype, rounding: Rounding, device: torch.device):
        rounding = rounding.resolve(dtype) if dtype != torch.float32 else Rounding.NEAREST
        names = {"value": torch.float32}
        if rounding is Rounding.STOCHASTIC:
            names.update(index=torch.int64, spare=torch.int64)
            if dtype == torch.float16:
                names.update(lower=torch.float32, uniform=torch.float32)
        if dtype != torch.float32:
            names["rounded"] = dtype
        super().__init__(device, numel, **names)
        self.dtype, self.rounding = dtype, rounding

    def serves(self, param: torch.Tensor, rounding: Rounding) -> bool:
        """Whether these buffers hold :func:`apply_update_`'s temporaries for ``param`` with ``rounding``."""
        resolved = rounding.resolve(param.dtype) if param.dtype != torch.float32 else Rounding.NEAREST
        return param.dtype == self.dtype and resolved is self.rounding and param.numel() <= self.numel


def _take(buffers: EpilogueBuffers | None, name: str, shape: torch.Size) -> torch.Tensor | None:
    return None if buffers is None else buffers.take(name, shape)


def round_to_dtype(value: torch.Tensor, dtype: torch.dtype, rounding: Rounding, bits: torch.Tensor | None,
                   buffers: EpilogueBuffers | None = None):
    """Round an fp32 tensor to ``dtype``: nearest-even, or stochastically with the given random bits.  ``value`` and
    ``bits`` are overwritten; ``buffers``: where the other temporaries go (None: allocated)."""
    shape = value.shape
    rounded = _take(buffers, "rounded", shape)
    if rounding is Rounding.NEAREST or dtype == torch.float32:
        if dtype == torch.float32:
            return value
        return value.to(dtype) if rounded is None else rounded.copy_(value)
    if dtype == torch.bfloat16:
        # the fp32 bit pattern plus the low 16 random bits, truncated: in ``spare``, then back over ``value``
        pattern = _take(buffers, "spare", shape)
        pattern = value.view(torch.int32).to(torch.int64) if pattern is None else pattern.copy_(value.view(torch.int32))
        pattern.add_(bits.bitwise_and_(0xFFFF)).bitwise_and_(~0xFFFF)
        value.view(torch.int32).copy_(pattern)
        return value.to(torch.bfloat16) if rounded is None else rounded.copy_(value)
    if dtype == torch.float16:
        # int32 halves of the spare int64 buffer: the exponent (then 1/ulp's bits) and ulp's bits
        spare = _take(buffers, "spare", shape)
        halves = spare.view(torch.int32).view(-1)[: 2 * shape.numel()] if spare is not None else None
        exponent = torch.bitwise_right_shift(value.view(torch.int32), 23,
                                             out=None if halves is None else halves[: shape.numel()].view(shape))
        exponent.bitwise_and_(0xFF).sub_(127).clamp_(-14, 15)
        ulp = torch.add(exponent, 127 - 10, out=None if halves is None else halves[shape.numel():].view(shape))
        ulp = ulp.bitwise_left_shift_(23).view(torch.float32)
        inv_ulp = exponent.neg_().add_(127 + 10).bitwise_left_shift_(23).view(torch.float32)
        uniform = _take(buffers, "uniform", shape)
        uniform = bits.bitwise_right_shift_(8).to(torch.float32) if uniform is None else uniform.copy_(
            bits.bitwise_right_shift_(8))
        uniform.mul_(2.0**-24)
        scaled = value.mul_(inv_ulp)  # exact: a power of two
        lower = torch.floor(scaled, out=_take(buffers, "lower", shape))
        torch.lt(uniform, scaled.sub_(lower), out=scaled)  # scaled now holds the round-up indicator, 0 or 1
        lower.add_(scaled).mul_(ulp)
        return lower.to(torch.float16) if rounded is None else rounded.copy_(lower)
    raise TypeError(f"stochastic rounding supports bf16/fp16/fp32 parameters, got {dtype}")


def finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: no element of any of them is inf or nan.  One min/max reduction
    per tensor (nan propagates through it; ``isfinite`` would build masks of the tensor's size).  No host sync."""
    extremes = [value.float() for t in tensors if t.numel() for value in torch.aminmax(t)]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return torch.isfinite(torch.stack(extremes)).all()


def dw_row_chunks(grad_output: torch.Tensor, input: torch.Tensor, rows: int, buffer: torch.Tensor | None = None):
    """``(start, stop, dW[start:stop])`` of ``dW = gᵀx`` (g [M, N], x [M, K]) in g's dtype, ``rows`` output rows at a
    time in one reused buffer (``buffer``'s first rows where given, else allocated before the first chunk): each
    chunk is overwritten by the next."""
    n_rows = grad_output.shape[1]
    rows = max(1, min(rows, n_rows))
    if buffer is None:
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
    buffers: EpilogueBuffers | None = None,
) -> None:
    """``param -= step · (sign(grad) if sign else grad)`` in fp32, rounded into ``param`` (any strides, 1-D or 2-D).

    ``grad`` (fp32, or bf16/fp16 widened to fp32 first) has ``param``'s shape.  ``offset`` is the logical row-major
    index of ``param[0, 0]`` in the full parameter, so random bits do not depend on how the parameter is chunked.
    ``ok`` (a 0-dim bool tensor) False leaves ``param`` as it was, decided on the device.  Uses a bounded number of
    temporaries of ``grad``'s size (the caller chunks: :meth:`~bread_kernels.backends.torch_backend.TorchBackend.
    apply_update_`), all of them in ``buffers`` where given (:class:`EpilogueBuffers` that :meth:`~EpilogueBuffers.
    serves` ``param``; then it allocates nothing), else allocated here.
    """
    shape = param.shape
    value = _take(buffers, "value", shape)
    if value is None:
        grad = grad.float()
        update = torch.sign(grad) if sign else grad
        value = update * step
    elif sign:
        value.copy_(grad).sign_().mul_(step)
    elif grad.dtype == torch.float32:
        torch.mul(grad, step, out=value)
    else:
        value.copy_(grad).mul_(step)
    new = torch.sub(param, value, out=None if buffers is None else value)  # fp32: param widens exactly
    bits = None
    rounding = rounding if param.dtype != torch.float32 else Rounding.NEAREST
    if rounding is Rounding.STOCHASTIC:
        index = torch.arange(param.numel(), dtype=torch.int64, device=param.device,
                             out=None if buffers is None else buffers.take("index", torch.Size([param.numel()])))
        bits = random_bits_(index.view(shape).add_(offset), *rng_keys(seed), _take(buffers, "spare", shape))
    rounded = round_to_dtype(new, param.dtype, rounding, bits, buffers)
    if ok is None:
        param.copy_(rounded)
    else:
        param.copy_(torch.where(ok, rounded, param, out=None if buffers is None else rounded))
