"""The native CPU backend: the epilogue in C++ (``csrc/epilogue.cpp``, OpenMP through ATen's parallel_for),
registered with ``torch.library`` as ``torch.ops.bread_kernels.apply_update_`` (and ``add_scaled_``, the
mixed-dtype sums of :mod:`.add_scaled`, in one pass); the GEMM stays in BLAS.  A whole weight's update checks its
gradient's finiteness and writes in one op (``apply_update_if_finite_``, and ``addmm_if_finite_`` for SGD's
``W.addmm_``): one dispatch per weight where a check, a flag and a write were two or three.

The extension is compiled with ninja through ``torch.utils.cpp_extension.load`` on first use and cached in
torch's extension directory (``TORCH_EXTENSIONS_DIR``), so later processes only load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
from pathlib import Path
import threading

import torch

from ..rounding import FLOAT_DTYPES, ROUNDING_CODES, Rounding, rng_keys
from . import records_ops
from .chunked import ChunkedBackend
from .rotary import one_pass_serves

_lock = threading.Lock()
_state: dict = {}


def _arch_flags() -> list[str]:
    """AVX2 code generation where this CPU has it (the extension is built on the machine that runs it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mbmi2", "-mf16c"] if {"avx2", "fma", "bmi2", "f16c"} <= set(flags) else []


_SOURCES = ("epilogue.cpp", "lora_grads.cpp", "rotary.cpp")
_HEADERS = ("mixed_sum.h",)  # not compiled on their own; hashed with the sources
_OPS = ("apply_update_", "apply_update_if_finite_", "all_finite", "addmm_if_finite_", "add_scaled_", "rank_products",
        "add_rank_product_", "rotary_")


def _source(name: str):
    """``csrc/<name>``: installed as ``bread_kernels._csrc``, or beside the package in a source checkout
    (a checkout on ``sys.path`` shadows the editable install's mapping of ``csrc/``)."""
    try:
        return importlib.resources.files("bread_kernels._csrc").joinpath(name)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "csrc" / name


def extension_name(sources, paths) -> str:
    """The extension's name, and so its build directory in ``~/.cache/torch_extensions``: a hash of the sources'
    bytes and of where they are.  The build there records the sources' paths, so two checkouts of the same version
    (a git worktree, an installed copy beside a source checkout) sharing one name rebuilt it (~40 s) whenever a
    process of the other had used it last; checkouts of different versions never share one either."""
    digest = hashlib.sha256()
    for source, path in zip(sources, paths):
        digest.update(str(source).encode() + b"\0" + Path(path).read_bytes())
    return f"bread_kernels_native_{digest.hexdigest()[:12]}"


def load_native() -> None:
    """Build (first time) and load the extension; raises ``RuntimeError`` saying why it cannot."""
    with _lock:
        if "error" in _state:
            raise _state["error"]
        if _state.get("loaded"):
            return
        try:
            from torch.utils.cpp_extension import load

            with contextlib.ExitStack() as files:
                sources = [_source(name) for name in (*_SOURCES, *_HEADERS)]
                paths = [files.enter_context(importlib.resources.as_file(source)) for source in sources]
                headers, compiled = paths[len(_SOURCES):], paths[:len(_SOURCES)]
                load(
                    name=extension_name(sources, paths),
                    sources=[str(path) for path in compiled],
                    extra_include_paths=sorted({str(Path(path).parent) for path in headers}),
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *_arch_flags()],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as exc:  # no compiler, no ninja, headers missing, ...
            _state["error"] = RuntimeError(f"the native CPU backend could not be built: {type(exc).__name__}: {exc}")
            raise _state["error"] from exc
        missing = [op for op in _OPS if not hasattr(torch.ops.bread_kernels, op)]
        if missing:
            _state["error"] = RuntimeError(f"the native extension loaded but registered no bread_kernels::{missing[0]}")
            raise _state["error"]
        _state["loaded"] = True


class NativeBackend(ChunkedBackend):
    name = "native"
    bytes_per_element = 0  # the chunk buffer only (counted by the base); the epilogue allocates nothing
    #: the largest LoRA rank whose adapter gradients :meth:`lora_grads` computes with ``rank_products`` (its r dot
    #: products and r row sums per element are not blocked as a GEMM's: above this BLAS on fp32 copies is faster)
    max_rank_products = 16

    def __init__(self):
        load_native()

    #: its addmm_if_finite_ op reads the flag inside: no zeroed copies of g and x
    addmm_gates_with_copies = False

    def apply_update_(self, param, grad, step, sign, rounding: Rounding, seed, offset=0, ok=None,
                      buffers=None) -> None:
        """One op; it allocates nothing (``buffers``, the torch epilogue's temporaries, are not needed)."""
        code, key1, key2 = _rounding_args(rounding, param.dtype, seed)
        torch.ops.bread_kernels.apply_update_(
            param, grad.contiguous(), float(step), bool(sign), code, key1, key2, int(offset), ok,
        )

    def apply_update_if_finite_(self, param, grad, step, sign, rounding: Rounding, seed, offset=0, checked=(),
                                ok=None, buffers=None) -> torch.Tensor | None:
        if not checked and ok is None:  # an ungated write (the op itself refuses one)
            return super().apply_update_if_finite_(param, grad, step, sign, rounding, seed, offset)
        code, key1, key2 = _rounding_args(rounding, param.dtype, seed)
        return torch.ops.bread_kernels.apply_update_if_finite_(
            param, grad.contiguous(), float(step), bool(sign), code, key1, key2, int(offset), list(checked), ok,
        )

    def finite_flag(self, *tensors):
        return torch.ops.bread_kernels.all_finite(list(tensors))

    def addmm_if_finite_(self, weight, grad_output, input, alpha, checked=(), ok=None,
                         work=None) -> torch.Tensor | None:
        if not checked and ok is None:  # an ungated write (the op itself refuses one)
            return super().addmm_if_finite_(weight, grad_output, input, alpha)
        return torch.ops.bread_kernels.addmm_if_finite_(weight, grad_output, input, float(alpha), list(checked), ok)

    def lora_input_dtype(self, input_dtype, lora_dtype, rank) -> torch.dtype:
        """A bf16/fp16 adapter input as it is where :meth:`lora_grads` reads it so (no fp32 copy of x̃); the
        adapters' dtype in a backward that builds a graph (``create_graph=True``), which BLAS on the cast serves."""
        served = self._reads_low_precision(input_dtype, lora_dtype, rank) and not torch.is_grad_enabled()
        return input_dtype if served else lora_dtype

    def lora_grads(self, grad_output, input, u, lora_b, scaling, need_a, need_b):
        """fp32 adapters with a bf16/fp16 ``g`` (peft's default on a bf16 model), up to :attr:`max_rank_products`:
        ``v`` and ``dBᵀ`` from g, ``dA`` from x̃, reading them as they are (``bread_kernels::rank_products``,
        ``csrc/lora_grads.cpp``); BLAS's GEMMs on fp32 copies otherwise, and where autograd records the ops."""
        if not self._reads_low_precision(grad_output.dtype, lora_b.dtype, lora_b.shape[1]) or \
                records_ops(grad_output, input, u, lora_b):
            return super().lora_grads(grad_output, input, u, lora_b, scaling, need_a, need_b)
        products = torch.ops.bread_kernels.rank_products
        v, grad_bt = products(grad_output.contiguous(), lora_b.t().contiguous(),
                              u.to(torch.float32).contiguous() if need_b else None)
        grad_a = products(input.contiguous(), None, v)[1].mul_(scaling) if need_a else None
        return v, grad_a, grad_bt.mul_(scaling).t() if need_b else None

    def _reads_low_precision(self, low_dtype, lora_dtype, rank) -> bool:
        """fp32 adapters with a bf16/fp16 g and x̃, up to :attr:`max_rank_products`."""
        return lora_dtype == torch.float32 and low_dtype in (torch.bfloat16, torch.float16) \
            and rank <= self.max_rank_products

    def add_product_(self, target, v, a, alpha=1.0, round_term=False) -> None:
        """One pass in C++ for a contiguous 2-D fp32/bf16/fp16 ``target`` and fp32 ``v``, ``a`` up to
        :attr:`max_rank_products` (``bread_kernels::add_rank_product_``): no fp32 [M, K] product."""
        if v.dim() == 2 and v.dtype == a.dtype == torch.float32 and target.dtype in FLOAT_DTYPES and target.dim() == 2 \
                and target.is_contiguous() and v.shape[1] <= self.max_rank_products \
                and not records_ops(target, v, a):
            torch.ops.bread_kernels.add_rank_product_(target, v.contiguous(), a.contiguous(), float(alpha),
                                                      bool(round_term))
        else:
            super().add_product_(target, v, a, alpha, round_term)

    def rotary_(self, out, x, cos, sin, backward) -> None:
        """One pass in C++ (``bread_kernels::rotary_``) where :func:`.rotary.one_pass_serves`; torch's ops
        otherwise."""
        if one_pass_serves(out, x, cos, sin):
            torch.ops.bread_kernels.rotary_(out, x, cos, sin, bool(backward))
        else:
            super().rotary_(out, x, cos, sin, backward)

    def add_scaled_(self, target, other, alpha=1.0, round_term=False) -> None:
        """One pass in C++ for contiguous fp32/bf16/fp16 tensors of one shape; torch's add otherwise."""
        if target.shape == other.shape and target.dtype in FLOAT_DTYPES and other.dtype in FLOAT_DTYPES \
                and target.is_contiguous() and other.is_contiguous() and not records_ops(target, other):
            torch.ops.bread_kernels.add_scaled_(target, other, float(alpha), bool(round_term))
        else:
            super().add_scaled_(target, other, alpha, round_term)


def _rounding_args(rounding: Rounding, dtype: torch.dtype, seed: int) -> tuple[int, int, int]:
    """What the native update ops take for ``rounding`` of a ``dtype`` weight: its code and the random-bit keys of
    ``seed``.  Nearest rounding reads no bits, so it is spared the two host-side hashes (a few µs of every hooked
    update's host time)."""
    resolved = rounding.resolve(dtype)
    if resolved is Rounding.NEAREST:
        return ROUNDING_CODES[resolved], 0, 0
    return (ROUNDING_CODES[resolved], *rng_keys(seed))
