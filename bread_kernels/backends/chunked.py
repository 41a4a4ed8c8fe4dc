"""The CPU backends' weight update: the GEMM stays in BLAS, the epilogue runs over bounded row chunks of dW.

``update_weight_(W, g, x)`` computes ``W -= step · f(gᵀx)`` for W [N, K], g [M, N], x [M, K]:

* SGD with nearest rounding: one ``W.addmm_(gᵀ, x, beta=1, alpha=-step)`` gated on the flag
  (:meth:`ChunkedBackend.addmm_if_finite_`: the check and the write, one op on the native backend) — BLAS's
  ``C = αAB + βC`` *is* the fused epilogue, and no dW exists at all.
* SIGN, and any stochastic rounding: for each chunk of ``rows`` output rows,
  ``buf = g[:, rows]ᵀ x`` (one buffer in the weight's dtype, reused across chunks), then the backend's epilogue
  ``apply_update_(W[rows], buf)``, which works in fp32.  The extra memory is one chunk (plus the backend's
  temporaries per element).  A dW that fits the budget is one chunk: one GEMM, as autograd's; only larger ones are
  split, so the memory stays bounded without splitting GEMMs that BLAS runs best whole.

Every write is gated on the device by a finiteness flag (a 0-dim bool tensor; no host sync), which
``update_weight_`` computes from what it uses and returns (and'ed with a caller's ``ok``, if given):

* one chunk: the dW it computes anyway — the very ``.grad`` autograd would hand the reference's hook (the same
  GEMM), so the update is skipped exactly where the reference's gradient is not finite.  Finite g and x can give a
  dW that is not: an fp16 dW overflows at 65,504 (a loss-scaled backward under fp16 autocast); a non-finite g or x
  makes dW non-finite (inf·0 is nan);
* several chunks, decided before the first write (a weight is written whole or not at all):
  :func:`~bread_kernels.backends.epilogue.dw_finite_flag` — fp16, every chunk's GEMM once without writing, then
  again to write (twice the dW GEMMs: here for an fp16 dW larger than the budget; also for the experts of an fp16
  3-D weight and under ZeRO-3 in fp16, which decide before writing any slice); bf16/fp32, the bound
  ``M · max|g| · max|x| <`` the dtype's largest value (3.4·10³⁸), no extra GEMM;
* the ``addmm_`` path (fp32/bf16 SGD with nearest rounding: no dW exists): g and x; BLAS's fp32 sum, scaled
  inside, overflows only past 3.4·10³⁸ (fp16 takes the path above).

:meth:`ChunkedBackend.dw_finite_flag` is the before-any-write check, for a caller that writes several slices of one
parameter (the experts of a 3-D weight) and must skip them all together.

bf16/fp16: CPU torch has no mixed-output GEMM, so a chunk of dW is computed by BLAS with fp32 accumulation and
rounded once to the weight's dtype — exactly the dW the reference materialises — before the fp32 epilogue.

The GEMM runs in the operands' dtype (g and x share one, the *compute* dtype), which under ``torch.autocast`` is
autocast's and not W's (an fp32 W with bf16 g and x): the chunk buffer is then in the compute dtype, so each chunk
is the low-precision dW that autograd materialises under autocast, and the epilogue widens it to fp32 and writes
W in W's own dtype.  ``addmm_`` cannot mix dtypes, so that case (SGD with nearest rounding included) takes the
chunked path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..interrupts import whole_write
from ..rounding import Rounding
from . import epilogue
from .add_scaled import TorchSums
from .elementwise import TorchElementwise
from .rotary import TorchRotary
from .lora_gemm import lora_grads_gemm

DEFAULT_CHUNK_BYTES = 16 << 20


def chunk_budget_bytes() -> int:
    """Extra bytes the update may use: ``BREAD_CHUNK_BYTES`` (default 16 MiB; see ``bench/results/chunk_bytes_cpu.txt``
    for the measurement behind it: below ~16 MiB per chunk BLAS loses speed on wide weights, above it nothing is
    gained).  The reference materialises every inactive weight's whole dW; this is the bound on ours."""
    return env_bytes("BREAD_CHUNK_BYTES", DEFAULT_CHUNK_BYTES)


def env_bytes(name: str, default: int) -> int:
    """A positive whole number of bytes from the environment variable ``name`` (``default`` where it is unset);
    anything else is refused, naming the variable and an example."""
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of bytes (a whole number, e.g. {default} for the "
                         f"default {default >> 20} MiB), got {raw!r}")
    return value


@dataclass
class PartBuffers:
    """Everything :meth:`ChunkedBackend.update_weight_` allocates to write one part of a parameter written in parts
    (an expert's slice, a vocabulary tile's rows), allocated before the first part writes and reused by each: with
    them it allocates nothing, so running out of memory cannot stop a write in parts halfway.  Sized for the largest
    part: ``rows`` rows of ``width`` elements and ``tokens`` rows of g and x.

    * ``chunk``: [rows', width] in the compute dtype, for dW (whole, or a row chunk of it);
    * ``epilogue``: the backend's epilogue temporaries for such a chunk (the torch backend's; None for the others);
    * ``grad_t``, ``input``, ``zero``: where the torch form of :meth:`ChunkedBackend.addmm_if_finite_` zeroes g and x
      (flat, for [tokens, rows] and [tokens, width]; SGD with nearest rounding; the native backend's op needs none).
    """

    chunk: torch.Tensor | None = None
    epilogue: object | None = None
    grad_t: torch.Tensor | None = None
    input: torch.Tensor | None = None
    zero: torch.Tensor | None = None


class ChunkedBackend(TorchSums, TorchRotary, TorchElementwise):
    """Base of the CPU backends; subclasses provide ``apply_update_`` and its memory cost per chunk element."""

    name = "chunked"
    #: bytes of temporaries the epilogue needs per chunk element, beyond the chunk buffer itself
    bytes_per_element = 0

    def apply_update_(self, param, grad, step, sign, rounding, seed, offset=0, ok=None, buffers=None) -> None:
        """``buffers``: :meth:`epilogue_buffers` for at least ``param``'s elements, or None (allocated as needed)."""
        raise NotImplementedError

    def epilogue_buffers(self, numel: int, dtype: torch.dtype, rounding: Rounding, device: torch.device):
        """The temporaries :meth:`apply_update_` needs for ``numel`` elements of a ``dtype`` parameter, allocated now
        (None: it needs none)."""
        return None

    #: whether :meth:`addmm_if_finite_` needs g- and x-sized temporaries (:class:`PartBuffers`) to gate its write
    addmm_gates_with_copies = True

    def part_buffers(self, weight: torch.Tensor, tokens: int, compute: torch.dtype, sign: bool,
                     rounding: Rounding) -> PartBuffers:
        """:class:`PartBuffers` for parts of at most ``weight``'s shape [rows, width] (a view of the largest part)
        with g and x of at most ``tokens`` rows in the ``compute`` dtype."""
        rows, width = weight.shape
        if self._fused_addmm(weight, compute, sign, rounding):
            if not self.addmm_gates_with_copies:
                return PartBuffers()
            return PartBuffers(grad_t=torch.empty(tokens * rows, dtype=compute, device=weight.device),
                               input=torch.empty(tokens * width, dtype=compute, device=weight.device),
                               zero=torch.zeros((), dtype=compute, device=weight.device))
        rows = min(rows, self.chunk_rows(weight, tokens, compute))
        return PartBuffers(chunk=torch.empty(rows, width, dtype=compute, device=weight.device),
                           epilogue=self.epilogue_buffers(rows * width, weight.dtype, rounding, weight.device))

    def prepare_update_(self, weight, grad_output, input, sign, rounding, ok=None, offset=0) -> None:
        """Nothing: BLAS and the epilogue need no tuning nor compiling (their buffers are :meth:`part_buffers`)."""

    def prepare_apply_(self, param, grad, sign, rounding, ok=None, offset=0) -> None:
        """Nothing (the epilogue's buffers are :meth:`epilogue_buffers`)."""

    def finite_flag(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update_temporary_bytes(self, param: torch.Tensor) -> int:
        """The bytes :meth:`apply_update_` allocates at once to write a whole gradient of ``param``: its epilogue's
        temporaries (``bytes_per_element`` each), over slices within the chunk budget."""
        return min(chunk_budget_bytes(), param.numel() * self.bytes_per_element)

    def apply_update_if_finite_(self, param, grad, step, sign, rounding, seed, offset=0, checked=(),
                                ok=None, buffers=None) -> torch.Tensor | None:
        """:meth:`apply_update_` unless ``ok`` is False or an element of the tensors ``checked`` is not finite;
        returns the flag it gated on (``ok`` and'ed with the check; None, and an ungated write, with neither).  One op
        on the native backend."""
        ok = self._gate(checked, ok)
        self.apply_update_(param, grad, step, sign, rounding, seed, offset=offset, ok=ok, buffers=buffers)
        return ok

    def addmm_if_finite_(self, weight, grad_output, input, alpha, checked=(), ok=None,
                         work: PartBuffers | None = None) -> torch.Tensor | None:
        """``W += alpha·gᵀx`` (g [M, N], x [M, K]) unless ``ok`` is False or an element of the tensors ``checked``
        is not finite, without reading a flag on the host; returns the flag it gated on (``ok`` and'ed with the
        check; None, and an ungated write, with neither).  Here by zeroing both operands where it is False (one
        activation-sized temporary each: 0·inf would still be nan; in ``work``'s buffers where given); the native
        backend checks and reads the flag inside one op instead."""
        ok = self._gate(checked, ok)
        if ok is None:
            weight.addmm_(grad_output.t(), input, beta=1, alpha=alpha)
        elif work is None:
            weight.addmm_(torch.where(ok, grad_output.t(), 0), torch.where(ok, input, 0), beta=1, alpha=alpha)
        else:  # gᵀ in the layout of g.t(), as where's result above has it
            grad_t = work.grad_t[: grad_output.numel()].view(grad_output.shape).t()
            zeroed = work.input[: input.numel()].view(input.shape)
            weight.addmm_(torch.where(ok, grad_output.t(), work.zero, out=grad_t),
                          torch.where(ok, input, work.zero, out=zeroed), beta=1, alpha=alpha)
        return ok

    def _gate(self, checked, ok):
        """``ok`` and'ed with the finiteness flag of ``checked``; None where there is neither (an ungated write, as
        :meth:`update_weight_` with ``check=False`` and no ``ok`` has always made on every path)."""
        return _both(ok, self.finite_flag(*checked)) if checked else ok

    def lora_grads(self, grad_output, input, u, lora_b, scaling, need_a, need_b):
        return lora_grads_gemm(grad_output, input, u, lora_b, scaling, need_a, need_b)

    def lora_input_dtype(self, input_dtype, lora_dtype, rank) -> torch.dtype:
        """The adapters' dtype: BLAS multiplies operands of one dtype."""
        return lora_dtype

    def linear_cross_entropy(self, hidden, weight, bias, targets, softcap, max_rows, need_grads, need_dw):
        """None: on the CPU the fused loss's own torch loop serves (BLAS GEMMs and in-place softmax)."""
        return None

    def chunk_rows(self, weight: torch.Tensor, tokens: int, dtype: torch.dtype | None = None) -> int:
        """Rows of ``weight`` per chunk of dW computed in ``dtype`` (default: W's) within the budget."""
        dtype = weight.dtype if dtype is None else dtype
        size = dtype.itemsize
        per_row = weight.shape[1] * (size + self.bytes_per_element)
        if dtype == torch.bfloat16:
            per_row += tokens * size  # oneDNN's bf16 GEMM packs g's rows through the torch allocator
        return max(1, min(weight.shape[0], chunk_budget_bytes() // per_row))

    def _fused_addmm(self, weight, compute, sign, rounding: Rounding) -> bool:
        """Whether the update is ``W.addmm_`` (no dW exists): SGD, nearest rounding, dW in W's dtype, not fp16
        (whose dW, autograd's ``.grad``, overflows from finite g and x: it is built and checked)."""
        return not sign and rounding.resolve(weight.dtype) is Rounding.NEAREST and compute == weight.dtype \
            and compute != torch.float16

    def dw_finite_flag(self, weight, grad_output, input, sign, rounding: Rounding) -> torch.Tensor | None:
        """Whether the dW [N, K] that :meth:`update_weight_` would compute for ``weight`` is finite, decided before
        any write (an fp16 dW: its GEMMs once more), or None where it checks nothing beyond g and x."""
        if self._fused_addmm(weight, grad_output.dtype, sign, rounding):
            return None
        rows = self.chunk_rows(weight, grad_output.shape[0], grad_output.dtype)
        return epilogue.dw_finite_flag(grad_output, input, rows, self.finite_flag)

    def update_weight_(self, weight, grad_output, input, step, sign, rounding: Rounding, seed, ok=None,
                       offset=0, check=True, also=(), work: PartBuffers | None = None) -> torch.Tensor | None:
        """``offset``: the logical row-major index of ``weight[0, 0]`` in the whole parameter (non-zero for one
        expert's slice of a 3-D expert weight), so stochastic rounding draws that element's bits.  ``grad_output``
        and ``input`` share the compute dtype, which may differ from W's (autocast: see the module docstring).
        Returns the finiteness flag the writes were gated on (see the module docstring) — of what it uses and of
        the tensors ``also`` (a bias's gradient), in one check — and'ed with ``ok``; ``check=False``: ``ok`` alone
        (a caller that decided before writing several slices).  ``work``: :meth:`part_buffers` for this write, one
        part of a parameter written in parts, whose caller decided ``ok`` before the first (``check=False``): then
        nothing is allocated here.  A dW of several chunks allocates its buffers before its first chunk writes."""
        compute = grad_output.dtype
        if input.dtype != compute:
            raise TypeError(f"update_weight_: grad_output is {compute} but input is {input.dtype}; the dW GEMM "
                            "takes both in one dtype")
        if self._fused_addmm(weight, compute, sign, rounding):
            return self.addmm_if_finite_(weight, grad_output, input, -step, (grad_output, input, *also) if check
                                         else (), ok, work)
        rounding = rounding.resolve(weight.dtype)
        n_rows, n_cols = weight.shape
        rows = self.chunk_rows(weight, grad_output.shape[0], compute)
        if work is not None:  # sized for the largest part's tokens: no more rows than this part's budget
            rows = min(rows, work.chunk.shape[0])
        if rows >= n_rows:  # one GEMM: no slicing, no preallocated buffer (but a caller's)
            grad = torch.mm(grad_output.t(), input, out=None if work is None else work.chunk[:n_rows])
            return self.apply_update_if_finite_(weight, grad, step, sign, rounding, seed, offset,
                                                (grad, *also) if check else (), ok,
                                                None if work is None else work.epilogue)
        if check:
            ok = _both(ok, epilogue.dw_finite_flag(grad_output, input, rows, self.finite_flag))
            if also:
                ok = ok & self.finite_flag(*also)
        if work is None:  # before the first chunk writes: an out-of-memory error then stops none halfway
            work = self.part_buffers(weight, grad_output.shape[0], compute, sign, rounding)
        with whole_write():  # every chunk, or none: a Ctrl-C between two comes after the last
            for start, stop, chunk in epilogue.dw_row_chunks(grad_output, input, rows, work.chunk):
                self.apply_update_(weight[start:stop], chunk, step, sign, rounding, seed,
                                   offset=offset + start * n_cols, ok=ok, buffers=work.epilogue)
        return ok


def _both(ok: torch.Tensor | None, flag: torch.Tensor) -> torch.Tensor:
    """``ok & flag`` on the device (``flag`` where ``ok`` is None)."""
    return flag if ok is None else ok & flag
