"""Backend dispatch for the fused weight update (and the fused loss's chunk loop).

Every backend implements the same methods (``W`` [N, K], ``g`` [M, N], ``x`` [M, K], any strides)::

    finite_flag(*tensors) -> ok                                      # 0-dim bool on the device: no inf/nan
    update_weight_(W, g, x, step, sign, rounding, seed, ok, offset, check, also) -> ok'   # W -= step·f(gᵀx)
    dw_finite_flag(W, g, x, sign, rounding) -> ok' | None           # that dW's finiteness, before any write
    prepare_update_(W, g, x, sign, rounding, ok, offset)             # a part's compile/tuning, before any part writes
    prepare_apply_(P, G, sign, rounding, ok, offset)                 # the same for a part apply_update_ writes
    apply_update_(P, G, step, sign, rounding, seed, offset, ok)      # P -= step · f(G), G fp32 (biases, chunks)
    apply_update_if_finite_(P, G, ..., checked, ok) -> ok'           # the same, gated on `checked` being finite too
    lora_grads(g, x, u, B, s, need_a, need_b) -> (v, dA, dB)         # LoRA: v = gB, dB = s·gᵀu, dA = s·vᵀx
    lora_input_dtype(x dtype, adapters' dtype, r) -> dtype           # the dtype lora_grads wants x in
    add_scaled_(T, O, alpha, round_term)                             # T += alpha·O across dtypes, rounded once
    add_product_(T, v, a, alpha, round_term)                         # add_scaled_ with O = v a (rank r)
    rotary_(out, x, cos, sin, backward)                              # out = x·cos + rotate_half(x)·sin (or its ᵀ)
    linear_cross_entropy(h, W, b, y, c, rows, grads, dw) -> (S, dh, dW, db) | None   # the head+loss (see liger)
    rms_norm(x, w, eps) -> (y, r) | None; rms_norm_backward(g, x, w, r, ...)       # the fused norm's element work
    silu_mul(a, u) -> h | None; silu_mul_backward(g, a, u, need_a, need_u)          # and the SwiGLU product's

with ``f`` the identity or ``sign`` and ``rounding`` a :class:`~bread_kernels.plan.Rounding`.  ``g`` and ``x``
share one dtype, the GEMM's compute dtype; under ``torch.autocast`` it is autocast's and may differ from W's (an
fp32 W with bf16 ``g``, ``x``): dW is computed in the compute dtype and the update written in W's own dtype.
``ok`` gates the write on the device (nothing is written where it is False): the backward never reads a flag on
the host.  ``update_weight_`` checks finiteness itself, from what it uses (the CPU backends: the dW they build, as
autograd's ``.grad`` — an fp16 one overflows from finite g and x; the Triton kernel: g and x) and the tensors
``also`` (a bias's gradient) in one check, and returns the flag it gated its writes on, and'ed with a caller's
``ok``; ``check=False`` gates on ``ok`` alone (a caller that decided before writing several slices).
``linear_cross_entropy`` is the fused head+loss's chunk loop for a head without a tiled update: the summed
cross-entropy ``S`` of the logits ``c·tanh((hWᵀ + b)/c)`` and its gradients (:mod:`.liger`), or None where the
backend has no kernels of its own for it and the caller's torch loop runs (the CPU backends).
``lora_input_dtype`` is the dtype ``lora_grads`` wants the adapter input ``x`` in: the adapters' (one cast, shared by
the adapters that read one x), or x's own where the backend reads it as it is (native: fp32 adapters, bf16/fp16 x).
``add_scaled_`` is :func:`.add_scaled.add_scaled_` (a low-precision tensor plus an fp32 one, as torch sums them): one
C++ pass on the native backend, torch's add elsewhere; ``add_product_`` the same with ``O = v a`` for a rank-r
``v`` [M, r] and ``a`` [r, K] (the LoRA dX's ``s · v A``), which the native backend sums per element without the
[M, K] product.
``rms_norm``/``silu_mul`` and their backwards (:mod:`.elementwise`) are the fused RMSNorm's and SwiGLU's element
work: one Triton kernel each way, or None where torch's ops in the Functions serve (the CPU backends, always).
``rotary_`` is the rotary embedding's element work (:mod:`.rotary`: autograd's values bit for bit), one C++ pass per
tensor on the native backend, torch's ops elsewhere.
``offset`` (default 0) is the logical row-major index of the first element in the whole parameter, so stochastic
rounding draws the same bits for a slice (a chunk, one expert of a 3-D expert weight) as for the whole tensor.

Choice: ``BREAD_BACKEND=triton|native|torch`` forces one (an error if it cannot serve the tensor's device);
otherwise ``triton`` for CUDA tensors, ``native`` for CPU tensors, and ``torch`` when the preferred one is
unavailable (said once, with the reason).  A plan's own update target (:class:`~bread_kernels.update.LocalTarget`:
a plan whose ``target`` is None) asks once, at the plan's first update, and keeps the answer for its writes; every
other caller (a ZeRO-3 target, the fused loss, the LoRA gradients) asks at each call.
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import torch

from ..rounding import Rounding

__all__ = ["Backend", "get_backend", "records_ops", "BACKEND_NAMES"]

BACKEND_NAMES = ("triton", "native", "torch")


def records_ops(*tensors: torch.Tensor) -> bool:
    """Whether autograd records ops on these tensors (a double backward, ``create_graph=True``, runs the backward
    under grad mode on tensors that require grad): a backend's own kernels have no derivative, so its torch ops serve
    there."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Backend(Protocol):
    name: str

    def finite_flag(self, *tensors: torch.Tensor) -> torch.Tensor: ...

    def update_weight_(self, weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor, step: float,
                       sign: bool, rounding: Rounding, seed: int, ok: torch.Tensor | None = None,
                       offset: int = 0, check: bool = True, also: tuple = (),
                       work: object | None = None) -> torch.Tensor | None: ...

    def part_buffers(self, weight: torch.Tensor, tokens: int, compute: torch.dtype, sign: bool,
                     rounding: Rounding) -> object | None:
        """What ``update_weight_(..., check=False, work=...)`` needs to write a part of at most ``weight``'s shape
        (g and x of at most ``tokens`` rows) without allocating, allocated now; None where it allocates nothing."""

    def prepare_update_(self, weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor, sign: bool,
                        rounding: Rounding, ok: torch.Tensor | None = None, offset: int = 0) -> None:
        """Does now, writing nothing, what the first ``update_weight_(weight, grad_output, input, ..., ok=ok,
        offset=offset)`` of such arguments does once before it writes (the Triton backend on a GPU tunes its kernel
        for the shapes, and compiles and loads the variant that the tensors' dtypes and alignments and the integers'
        values make), so that a write in parts, which prepares every part before the first part writes, does none
        of it between two parts; nothing on the CPU backends."""

    def prepare_apply_(self, param: torch.Tensor, grad: torch.Tensor, sign: bool, rounding: Rounding,
                       ok: torch.Tensor | None = None, offset: int = 0) -> None:
        """:meth:`prepare_update_` for a part that ``apply_update_(param, grad, ..., offset, ok)`` writes (a head
        tile's bias)."""

    def epilogue_buffers(self, numel: int, dtype: torch.dtype, rounding: Rounding,
                         device: torch.device) -> object | None:
        """What ``apply_update_(..., buffers=...)`` needs for ``numel`` elements without allocating, allocated now;
        None where it allocates nothing."""

    def apply_update_if_finite_(self, param: torch.Tensor, grad: torch.Tensor, step: float, sign: bool,
                                rounding: Rounding, seed: int, offset: int = 0, checked: tuple = (),
                                ok: torch.Tensor | None = None, buffers: object | None = None
                                ) -> torch.Tensor | None: ...

    def dw_finite_flag(self, weight: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor, sign: bool,
                       rounding: Rounding) -> torch.Tensor | None: ...

    def apply_update_(self, param: torch.Tensor, grad: torch.Tensor, step: float, sign: bool, rounding: Rounding,
                      seed: int, offset: int = 0, ok: torch.Tensor | None = None,
                      buffers: object | None = None) -> None: ...

    def update_temporary_bytes(self, param: torch.Tensor) -> int: ...

    def lora_grads(self, grad_output: torch.Tensor, input: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor,
                   scaling: float, need_a: bool, need_b: bool) -> tuple: ...

    def lora_input_dtype(self, input_dtype: torch.dtype, lora_dtype: torch.dtype, rank: int) -> torch.dtype: ...

    def add_product_(self, target: torch.Tensor, v: torch.Tensor, a: torch.Tensor, alpha: float = 1.0,
                     round_term: bool = False) -> None: ...

    def add_scaled_(self, target: torch.Tensor, other: torch.Tensor, alpha: float = 1.0,
                    round_term: bool = False) -> None: ...

    def rotary_(self, out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool) -> None: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple | None: ...

    def rms_norm_backward(self, grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor, need_x: bool, split: bool, need_w: bool) -> tuple | None: ...

    def silu_mul(self, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None: ...

    def silu_mul_backward(self, grad_output: torch.Tensor, a: torch.Tensor, u: torch.Tensor, need_a: bool,
                          need_u: bool) -> tuple | None: ...

    def linear_cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, softcap: float | None, max_rows: int, need_grads: bool,
                             need_dw: bool) -> tuple | None: ...


_instances: dict[str, Backend] = {}
_warned: set[str] = set()


def _instantiate(name: str) -> Backend:
    if name not in _instances:
        if name == "torch":
            from .torch_backend import TorchBackend

            _instances[name] = TorchBackend()
        elif name == "native":
            from .native import NativeBackend

            _instances[name] = NativeBackend()
        else:
            from .triton_backend import TritonBackend

            _instances[name] = TritonBackend()
    return _instances[name]


def _triton_can_run(device: torch.device) -> str | None:
    """None if Triton can run kernels on tensors of this device, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"Triton runs on {device.type} tensors only under TRITON_INTERPRET=1 (set it before importing bread_kernels)"


_chosen: dict = {}

#: selects the Triton kernel for the LoRA adapters' gradients on a GPU (``triton``); unset: cuBLAS GEMMs there
LORA_KERNEL_ENV = "BREAD_LORA_KERNEL"


def lora_kernel_requested() -> bool:
    """Whether ``BREAD_LORA_KERNEL=triton`` asks for the Triton adapter-gradient kernel; any value but that one (or
    unset) is refused, so that a misspelt one does not measure cuBLAS's GEMMs as the kernel."""
    choice = os.environ.get(LORA_KERNEL_ENV, "").strip().lower()
    if choice not in ("", "triton"):
        raise ValueError(f"{LORA_KERNEL_ENV}={choice!r} is not a choice; use 'triton' (the Triton adapter-gradient "
                         "kernel on a GPU) or leave it unset (cuBLAS GEMMs)")
    return choice == "triton"


def get_backend(device: torch.device | str) -> Backend:
    """The backend for tensors on ``device``: decided once per (device, ``BREAD_BACKEND``, ``TRITON_INTERPRET``)
    and then looked up, since every fused backward asks."""
    forced = os.environ.get("BREAD_BACKEND", "")
    key = (device, forced, os.environ.get("TRITON_INTERPRET"))
    backend = _chosen.get(key)
    if backend is None:
        backend = _chosen[key] = _choose(torch.device(device), forced.strip().lower())
    return backend


def _choose(device: torch.device, forced: str) -> Backend:
    if forced:
        if forced not in BACKEND_NAMES:
            raise ValueError(f"BREAD_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKEND_NAMES)}")
        if forced == "triton" and (reason := _triton_can_run(device)):
            raise RuntimeError(f"BREAD_BACKEND=triton: {reason}")
        if forced == "native" and device.type != "cpu":
            raise RuntimeError(f"BREAD_BACKEND=native serves CPU tensors only, got a tensor on {device}")
        return _instantiate(forced)

    preferred = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else "torch"
    if preferred == "triton" and (reason := _triton_can_run(device)):
        return _fallback(preferred, reason)
    try:
        return _instantiate(preferred)
    except (RuntimeError, ImportError) as exc:
        return _fallback(preferred, str(exc))


def _fallback(preferred: str, reason: str) -> Backend:
    if preferred not in _warned:
        _warned.add(preferred)
        warnings.warn(
            f"bread_kernels: the {preferred} backend is unavailable ({reason}); using the torch backend, which is "
            "correct but slower. Set BREAD_BACKEND=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _instantiate("torch")
