"""The native CPU backend: the epilogue in C++ (``csrc/epilogue.cpp``, OpenMP through ATen's parallel_for),
registered with ``torch.library`` as ``torch.ops.bread_kernels.apply_update_`` (and ``add_scaled_``, the
mixed-dtype sums of :mod:`.add_scaled`, in one pass); the GEMM stays in BLAS.

The extension is compiled with ninja through ``torch.utils.cpp_extension.load`` on first use and cached in
torch's extension directory (``TORCH_EXTENSIONS_DIR``), so later processes only load it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path
import threading

import torch

from ..rounding import ROUNDING_CODES, Rounding, rng_keys
from .chunked import ChunkedBackend

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
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


def _epilogue_source():
    """``csrc/epilogue.cpp``: installed as ``bread_kernels._csrc``, or beside the package in a source checkout
    (a checkout on ``sys.path`` shadows the editable install's mapping of ``csrc/``)."""
    try:
        return importlib.resources.files("bread_kernels._csrc").joinpath("epilogue.cpp")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "csrc" / "epilogue.cpp"


def load_native() -> None:
    """Build (first time) and load the extension; raises ``RuntimeError`` saying why it cannot."""
    with _lock:
        if "error" in _state:
            raise _state["error"]
        if _state.get("loaded"):
            return
        try:
            from torch.utils.cpp_extension import load

            with importlib.resources.as_file(_epilogue_source()) as path:
                # named by the source's hash: checkouts of different versions on one machine never rebuild over
                # each other's cached build
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
                load(
                    name=f"bread_kernels_native_{digest}",
                    sources=[str(path)],
                    extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *_arch_flags()],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as exc:  # no compiler, no ninja, headers missing, ...
            _state["error"] = RuntimeError(f"the native CPU backend could not be built: {type(exc).__name__}: {exc}")
            raise _state["error"] from exc
        missing = [op for op in ("apply_update_", "all_finite", "addmm_if_", "add_scaled_") if not hasattr(torch.ops.bread_kernels, op)]
        if missing:
            _state["error"] = RuntimeError(f"the native extension loaded but registered no bread_kernels::{missing[0]}")
            raise _state["error"]
        _state["loaded"] = True


class NativeBackend(ChunkedBackend):
    name = "native"
    bytes_per_element = 0  # the chunk buffer only (counted by the base); the epilogue allocates nothing

    def __init__(self):
        load_native()

    def apply_update_(self, param, grad, step, sign, rounding: Rounding, seed, offset=0, ok=None) -> None:
        key1, key2 = rng_keys(seed)
        torch.ops.bread_kernels.apply_update_(
            param, grad.contiguous(), float(step), bool(sign), ROUNDING_CODES[rounding.resolve(param.dtype)],
            key1, key2, int(offset), ok,
        )

    def finite_flag(self, *tensors):
        return torch.ops.bread_kernels.all_finite(list(tensors))

    def addmm_if_(self, weight, mat1, mat2, alpha, ok) -> None:
        torch.ops.bread_kernels.addmm_if_(weight, mat1, mat2, float(alpha), ok)

    def add_scaled_(self, target, other, alpha=1.0, round_term=False) -> None:
        """One pass in C++ for contiguous fp32/bf16/fp16 tensors of one shape; torch's add otherwise."""
        if target.shape == other.shape and target.dtype in _FLOATS and other.dtype in _FLOATS \
                and target.is_contiguous() and other.is_contiguous():
            torch.ops.bread_kernels.add_scaled_(target, other, float(alpha), bool(round_term))
        else:
            super().add_scaled_(target, other, alpha, round_term)
