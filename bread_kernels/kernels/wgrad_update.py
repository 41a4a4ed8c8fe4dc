"""Triton kernels: the weight-gradient GEMM with the on-the-fly update as its epilogue, and the bare epilogue.

``wgrad_update_``: for a weight ``W`` [N, K] (any strides, fp32/bf16/fp16), output gradient ``g`` [M, N] and input
``x`` [M, K] (M = tokens), each program owns one ``BLOCK_N × BLOCK_K`` tile of W and computes

    dW_tile = Σ_m g[m, tile_n]ᵀ · x[m, tile_k]          (fp32 accumulator, M-loop, no split-K)
    W_tile  = round(W_tile − step · f(dW_tile))          f = identity (SGD) or sign (SIGN)

so the update is applied after the whole reduction over tokens (sign needs the complete sum) and no dW tensor
ever exists outside registers.  ``ok`` (a one-element flag, the finiteness of g and x computed on the device)
masks the store: a non-finite gradient leaves W untouched without the host ever reading the flag.  ``round`` is
nearest-even or stochastic with the counter-based bits of ``backends/epilogue.py`` (same hash, same element indices:
results are bit-identical to the CPU backends for the same fp32 dW).  ``apply_update_`` is the same epilogue over
a given fp32 gradient (biases, tests).  ``g`` and ``x`` share one dtype, which under ``torch.autocast`` is
autocast's and may differ from W's (bf16 operands, an fp32 W): the reduction stays in fp32 and is not rounded to
that dtype before the epilogue (the CPU backends round it once, as the GEMM autograd runs does), and the store is in
W's dtype.

Like Liger-Kernel's ops: kernels first, then launch functions that flatten to 2-D.  Program offsets are int64.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); on a GPU the GEMM kernel is autotuned on the
first call for each shape with launches that do not store (``store=0``), so tuning never applies the update and
allocates nothing (no W clone, no L2-flush buffer).

On a GPU, Triton compiles (and loads) a kernel once per *variant*: its constexprs and its specialisation, which
``triton.runtime.jit`` computes from the other arguments at each launch: a tensor's dtype and whether its address
is a multiple of 16 bytes; an integer's width (32 or 64 bits), whether it is a multiple of 16, and whether it is 1
(then a constant).  The parts of one write (the head's vocabulary tiles and their bias, an expert weight's slices)
can differ there: a last tile of 1 row or of a row count not a multiple of 16, a tile or slice that starts off a
16-byte boundary, an expert with one token.  A compile, or the module's load, can fail (out of memory) at a part's
first launch, after the earlier parts wrote; :func:`warm_wgrad_update_` and :func:`warm_apply_update_` launch each
part's variant beforehand with ``store=0`` (and tune it), once per variant a process meets.  Arguments that change
at every call but are data (the seeds, the RNG offset, the step, ``store``) are not specialised, and the integers
among them are declared 64-bit: a seed's key past 2³¹ would otherwise make a 64-bit variant of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..rounding import ROUNDING_CODES, Rounding, rng_keys
from .tuning import interpreted, time_in_place

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _epilogue(w, grad, index, step, key1, key2, SIGN: tl.constexpr, STOCHASTIC: tl.constexpr,
              DTYPE_CODE: tl.constexpr, EXACT_MUL: tl.constexpr):
    """w (any float dtype), grad fp32, index int64 logical element index -> new w in fp32, ready to store."""
    if SIGN:
        grad = tl.where(grad > 0, 1.0, tl.where(grad < 0, -1.0, 0.0))
    if EXACT_MUL:
        # GPU: the compiler would contract `w - grad * step` into one FMA (one rounding instead of two), so fp32
        # results would differ from the CPU backends' in the last bit; mul.rn is never contracted.
        value = w.to(tl.float32) - libdevice.mul_rn(grad, step)
    else:  # the interpreter runs numpy: two roundings already
        value = w.to(tl.float32) - grad * step
    if not STOCHASTIC and DTYPE_CODE == 1:
        # round-to-nearest-even to bf16 on the bit pattern (the interpreter's cast truncates instead)
        pattern = value.to(tl.uint32, bitcast=True)
        value = ((pattern + 0x7FFF + ((pattern >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    if STOCHASTIC and DTYPE_CODE != 0:
        counter = (index & 0xFFFFFFFF).to(tl.uint32)
        bits = _lowbias32(_lowbias32(counter ^ key1.to(tl.uint32)) ^ key2.to(tl.uint32))
        pattern = value.to(tl.uint32, bitcast=True)
        if DTYPE_CODE == 1:  # bf16: add 16 random bits, truncate
            value = ((pattern + (bits & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:  # fp16: floor(q) + [r < frac(q)] in units of the fp16 ulp at |value|
            exponent = ((pattern >> 23) & 0xFF).to(tl.int32) - 127
            exponent = tl.minimum(tl.maximum(exponent, -14), 15)
            ulp = ((exponent - 10 + 127) << 23).to(tl.float32, bitcast=True)
            inv_ulp = ((127 - (exponent - 10)) << 23).to(tl.float32, bitcast=True)
            uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08
            scaled = value * inv_ulp
            lower = tl.floor(scaled)
            value = (lower + tl.where(uniform < scaled - lower, 1.0, 0.0)) * ulp
    return value


@triton.jit
def _gated(mask, ok_ptr):
    """``mask`` where the one-byte flag at ``ok_ptr`` is set, nothing where it is not (broadcast to the block: the
    interpreter refuses a scalar in a mask)."""
    ok = tl.load(ok_ptr).to(tl.int32) + tl.zeros(mask.shape, tl.int32)
    return mask & (ok != 0)


# The per-call seeds and step are data, not shape: specialising on them (Triton specialises integers by value,
# e.g. divisibility by 16, and by width) would recompile — and re-autotune — the kernel for fresh seeds; the integers
# among them are declared 64-bit, so that no value makes a variant of its own (see the module docstring).
@triton.jit(do_not_specialize=["offset", "step", "key1", "key2", "store"])
def _wgrad_update_kernel(
    g_ptr, x_ptr, w_ptr, ok_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
    offset: tl.int64, step, key1: tl.int64, key2: tl.int64, store,
    SIGN: tl.constexpr, STOCHASTIC: tl.constexpr, DTYPE_CODE: tl.constexpr, IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands; fp32 products of bf16 values are exact
            acc = tl.dot(tl.trans(g.to(tl.float32)), x.to(tl.float32), acc)
        elif IEEE_FP32:
            acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), x, acc)

    mask = _gated(mask_n[:, None] & mask_k[None, :], ok_ptr)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    index = offs_n[:, None] * K + offs_k[None, :] + offset
    value = _epilogue(w, acc, index, step, key1, key2, SIGN, STOCHASTIC, DTYPE_CODE, not UPCAST)
    # store == 0: the autotuner's and the warm-up's launches, which must leave W untouched (see _store_nothing);
    # broadcast to the block, as in _gated, for the interpreter (where the tests simulate tuning)
    storing = (store + tl.zeros(mask.shape, tl.int32)) != 0
    tl.store(w_ptrs, value.to(w_ptr.dtype.element_ty), mask=mask & storing)


@triton.jit(do_not_specialize=["offset", "step", "key1", "key2", "store"])
def _apply_update_kernel(
    p_ptr, grad_ptr, ok_ptr, R, C, stride_pr, stride_pc, offset: tl.int64,
    step, key1: tl.int64, key2: tl.int64, store,
    SIGN: tl.constexpr, STOCHASTIC: tl.constexpr, DTYPE_CODE: tl.constexpr, EXACT_MUL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    index = offs_r[:, None] * C + offs_c[None, :]
    grad = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
    p_ptrs = p_ptr + offs_r[:, None] * stride_pr + offs_c[None, :] * stride_pc
    w = tl.load(p_ptrs, mask=mask, other=0.0)
    value = _epilogue(w, grad, index + offset, step, key1, key2, SIGN, STOCHASTIC, DTYPE_CODE, EXACT_MUL)
    storing = (store + tl.zeros(mask.shape, tl.int32)) != 0  # store == 0: a warm-up launch (warm_apply_update_)
    tl.store(p_ptrs, value.to(p_ptr.dtype.element_ty), mask=_gated(mask, ok_ptr) & storing)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bn, bk, bm, w, s in [
        (128, 128, 32, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
    ]
]


# Timing launches pass ``store=0``, so W is read but never written and nothing needs restoring (see tuning.py)
_wgrad_update_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["N", "K"], do_bench=time_in_place)(
    _wgrad_update_kernel
)
#: the autotuner keys (:func:`_tuning_key`) tuned, and the variants (:func:`_variant`) compiled and loaded, so far
_tuned: set = set()
_warmed: set = set()
_INTERPRET_BLOCK_M = 16


def _interpreter_tile(extent: int, smallest: int, largest: int = 128) -> int:
    """A tile size along a dimension of ``extent`` under the interpreter, where each program costs the same numpy
    overhead whatever its tile: the largest power of two that still cuts the dimension into about four tiles or
    more (so a kernel's tile edges and masks are crossed as on a GPU), between ``smallest`` and ``largest``."""
    tile = 1 << max(0, (max(1, extent // 4)).bit_length() - 1)
    return max(smallest, min(largest, tile))


_ALWAYS: dict = {}


def _flag(ok: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``ok`` as the one-byte tensor the kernels load (a bool tensor viewed as uint8); a cached True when None."""
    if ok is None:
        if device not in _ALWAYS:
            _ALWAYS[device] = torch.ones((), dtype=torch.uint8, device=device)
        return _ALWAYS[device]
    if ok.dtype != torch.bool or ok.numel() != 1 or ok.device != device:
        raise ValueError(f"triton backend: ok must be a one-element bool tensor on {device}, got {ok.dtype} "
                         f"{tuple(ok.shape)} on {ok.device}")
    return ok.reshape(()).view(torch.uint8)


def _check_dtype(t: torch.Tensor, what: str) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"triton backend: {what} must be float32, bfloat16 or float16, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def _launch(weight, grad_output, input, step, sign, rounding, seed, ok, offset):
    """The arguments of a launch of the GEMM kernel (but ``store``) and its flags."""
    code = _check_dtype(weight, "weight")
    M, N = grad_output.shape
    K = input.shape[1]
    key1, key2 = rng_keys(seed)
    stochastic = ROUNDING_CODES[rounding.resolve(weight.dtype)] == 1
    ieee = grad_output.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (
        grad_output, input, weight, _flag(ok, weight.device), M, N, K,
        grad_output.stride(0), grad_output.stride(1), input.stride(0), input.stride(1),
        weight.stride(0), weight.stride(1),
        int(offset), float(step), key1, key2,
    )
    flags = dict(SIGN=bool(sign), STOCHASTIC=stochastic, DTYPE_CODE=code, IEEE_FP32=ieee,
                 UPCAST=interpreted(weight.device))
    return args, flags


def _specialisation(value) -> object:
    """What Triton's launcher specialises a non-constexpr argument on (``native_specialize_impl`` of
    ``triton.runtime.jit``): a tensor by its dtype and whether its address is a multiple of 16 bytes; an integer by
    whether it is 1 (then compiled as a constant), whether it fits 32 bits and whether it is a multiple of 16."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return _int_specialisations((value,))[0]


def _int_specialisations(values) -> tuple:
    """:func:`_specialisation` of each integer in ``values``, in one comprehension (a key is asked for at every
    part of every write: ~1 µs for nine integers rather than ~7 through a call each)."""
    return tuple([1 if n == 1 else (-2147483648 <= n < 2147483648, n % 16 == 0) for n in values])


def _flag_aligned(ok: torch.Tensor | None) -> bool:
    """The specialisation of the flag a launch passes for ``ok`` (:func:`_flag`: always uint8; the cached True is
    a fresh, aligned allocation)."""
    return ok is None or ok.data_ptr() % 16 == 0


def _wgrad_variant(weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor, sign: bool,
                   rounding: Rounding, ok: torch.Tensor | None) -> tuple:
    """What tells apart two launches of the GEMM kernel that Triton compiles (and loads) separately, computed from
    the tensors without building the launch (:func:`_launch` costs ~30 µs of host time, and every part of every
    write asks): the autotuner's key (:func:`_tuning_key`: its winner's tiles go with it), the specialisation of
    the specialised arguments (g, x, W, the flag; M, N, K and the six strides) and the constexprs (sign, the
    rounding, fp32's IEEE mode; the dtype code is W's dtype, in the tuning key).  The unspecialised arguments (a
    float step, ``store``, the 64-bit seeds and offset) make no variant."""
    M, N = grad_output.shape
    ieee = grad_output.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    sizes = (M, N, input.shape[1], *grad_output.stride(), *input.stride(), *weight.stride())
    return ("wgrad", _tuning_key(weight, grad_output, input), _specialisation(grad_output), _specialisation(input),
            _specialisation(weight), _flag_aligned(ok), _int_specialisations(sizes), bool(sign),
            rounding.resolve(weight.dtype), ieee)


def _apply_variant(param: torch.Tensor, grad: torch.Tensor, sign: bool, rounding: Rounding,
                   ok: torch.Tensor | None) -> tuple:
    """:func:`_wgrad_variant` for the bare epilogue's kernel: the specialisation of its specialised arguments
    (param as 2-D, grad — a contiguous copy, a fresh aligned allocation, where it is not contiguous —, the flag;
    R, C and param's strides) and its constexprs (sign, rounding, the dtype, the tiles)."""
    p2 = param.unsqueeze(0) if param.dim() == 1 else param
    R, C = p2.shape
    grad_aligned = grad.data_ptr() % 16 == 0 if grad.is_contiguous() else True
    return ("apply", param.dtype, param.device, grad.dtype, _specialisation(p2), grad_aligned, _flag_aligned(ok),
            _int_specialisations((R, C, *p2.stride())), bool(sign), rounding.resolve(param.dtype),
            _apply_tiles(R, C, interpreted(param.device)))


def _compiled(device: torch.device) -> bool:
    """Whether launches on ``device`` are compiled per variant, the GEMM kernel's through its autotuner (a GPU's),
    rather than run by the interpreter with fixed tiles (the tests simulate a GPU's compiles and tuning under the
    interpreter by answering True)."""
    return not interpreted(device)


def _tuning_key(weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> tuple:
    """What :data:`_tuned` remembers a tuned shape by: the autotuner's key (N and K, and every tensor argument's
    dtype, the flag's always uint8) and the device.  It must tell apart every launch the autotuner's key does: a
    ``store=1`` launch of a shape the autotuner has not timed would apply the update once per timing launch."""
    return (grad_output.shape[1], input.shape[1], grad_output.dtype, input.dtype, weight.dtype, weight.device.index)


def _grid(N: int, K: int):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))


def _store_nothing(args: tuple, flags: dict, N: int, K: int) -> None:
    """The GEMM kernel's launch through the autotuner with ``store=0``: W is read, never written.  The autotuner
    times every configuration first where it has not for this shape (each timing launch with ``store=0`` too), and
    the launch compiles and loads the winner's variant for these arguments where it was not."""
    _wgrad_update_tuned[_grid(N, K)](*args, 0, **flags)


def warm_wgrad_update_(weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor, sign: bool,
                       rounding: Rounding, ok: torch.Tensor | None = None, offset: int = 0) -> None:
    """On a GPU, does now, writing nothing, everything that the first :func:`wgrad_update_` of these arguments
    (the same tensors, ``ok`` and ``offset``; the step and seed make no variant) does before it writes: tunes the
    GEMM kernel for the shapes, compiles and loads the variant it launches (one ``store=0`` launch through the
    autotuner, only where this process has not warmed that tuning key and variant).  A write in parts warms every
    part before the first part writes, so nothing between two parts can fail for want of a compile, a module load
    or a tuning.  Nothing under the interpreter, which compiles nothing."""
    if not _compiled(weight.device):
        return
    variant = _wgrad_variant(weight, grad_output, input, sign, rounding, ok)
    if variant in _warmed:
        return
    args, flags = _launch(weight, grad_output, input, 0.0, sign, rounding, 0, ok, offset)
    _store_nothing(args, flags, grad_output.shape[1], input.shape[1])
    _tuned.add(_tuning_key(weight, grad_output, input))
    _warmed.add(variant)


def wgrad_update_(
    weight: torch.Tensor,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    step: float,
    sign: bool,
    rounding: Rounding,
    seed: int,
    ok: torch.Tensor | None = None,
    offset: int = 0,
) -> None:
    """``weight -= step · f(grad_outputᵀ · input)`` in one kernel; weight [N, K], grad_output [M, N], input [M, K];
    nothing is written where ``ok`` (0-dim bool) is False.  ``offset``: the logical index of ``weight[0, 0]`` in the
    whole parameter (the random bits' counter).  The first launch of a shape on a GPU tunes first, with launches
    that store nothing (a write in parts warms each part first: :func:`warm_wgrad_update_`)."""
    args, flags = _launch(weight, grad_output, input, step, sign, rounding, seed, ok, offset)
    N, K = grad_output.shape[1], input.shape[1]
    if not _compiled(weight.device):
        blocks = {"BLOCK_N": _interpreter_tile(N, 16), "BLOCK_K": _interpreter_tile(K, 32),
                  "BLOCK_M": _INTERPRET_BLOCK_M}
        grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(K, blocks["BLOCK_K"]))
        _wgrad_update_kernel[grid](*args, 1, **flags, **blocks)
        return
    tuning = _tuning_key(weight, grad_output, input)
    if tuning not in _tuned:
        _store_nothing(args, flags, N, K)
        _tuned.add(tuning)
    _wgrad_update_tuned[_grid(N, K)](*args, 1, **flags)


def _apply_tiles(R: int, C: int, interpret: bool) -> tuple[int, int]:
    """The bare epilogue's tiles (BLOCK_R, BLOCK_C): fixed on a GPU, fitted to the shape under the interpreter."""
    return (_interpreter_tile(R, 16), _interpreter_tile(C, 64)) if interpret else (16, 64)


def _apply_launch(param, grad, step, sign, rounding, seed, offset, ok):
    """The grid, arguments (but ``store``) and constexprs of a launch of the bare epilogue's kernel."""
    code = _check_dtype(param, "param")
    p2 = param.unsqueeze(0) if param.dim() == 1 else param
    R, C = p2.shape
    key1, key2 = rng_keys(seed)
    stochastic = ROUNDING_CODES[rounding.resolve(param.dtype)] == 1
    interpret = interpreted(param.device)
    block_r, block_c = _apply_tiles(R, C, interpret)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    args = (p2, grad.contiguous(), _flag(ok, param.device), R, C, p2.stride(0), p2.stride(1), int(offset),
            float(step), key1, key2)
    constexprs = dict(SIGN=bool(sign), STOCHASTIC=stochastic, DTYPE_CODE=code, EXACT_MUL=not interpret,
                      BLOCK_R=block_r, BLOCK_C=block_c)
    return grid, args, constexprs


def warm_apply_update_(param: torch.Tensor, grad: torch.Tensor, sign: bool, rounding: Rounding,
                       ok: torch.Tensor | None = None, offset: int = 0) -> None:
    """On a GPU, compiles and loads now the epilogue kernel's variant that :func:`apply_update_` of these arguments
    launches (one ``store=0`` launch, writing nothing), where this process has not: as
    :func:`warm_wgrad_update_`, for the parts of a write that are written by the bare epilogue (a head tile's
    bias).  Nothing under the interpreter."""
    if not _compiled(param.device):
        return
    variant = _apply_variant(param, grad, sign, rounding, ok)
    if variant in _warmed:
        return
    grid, args, constexprs = _apply_launch(param, grad, 0.0, sign, rounding, 0, offset, ok)
    _apply_update_kernel[grid](*args, 0, **constexprs)
    _warmed.add(variant)


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
    """The bare epilogue: ``param -= step · f(grad)``, param 1-D or 2-D (any strides), grad fp32 (or bf16/fp16,
    widened); nothing is written where ``ok`` (0-dim bool) is False."""
    grid, args, constexprs = _apply_launch(param, grad, step, sign, rounding, seed, offset, ok)
    _apply_update_kernel[grid](*args, 1, **constexprs)
