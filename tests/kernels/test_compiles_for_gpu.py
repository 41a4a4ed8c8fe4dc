"""The element-wise Triton kernels and the weight update's kernels (the variants its warm-ups compile) compile for a
GPU (sm_90 and sm_80: an H100, an A100) with Triton's own compiler and its bundled ``ptxas``, on a machine without
one: the interpreter runs a kernel as Python and accepts constructs the compiler refuses (an import inside a kernel,
``.to`` on an integer argument that Triton specialises into a constant).  Their values are tested under the
interpreter (the other files here) and on a GPU by ``bench/gpu_session.sh``.

The test session runs Triton's interpreter (``tests/conftest.py``), under which ``triton.jit`` gives no compilable
kernel, so the compiles run in a subprocess without it."""

import os
import subprocess
import sys

import pytest

_COMPILE = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bread_kernels.kernels import rms_norm, rotary, swiglu, wgrad_update

import sys

def compile(kernel, signature, constexprs, aligned=()):
    """``aligned``: the arguments Triton specialises as multiples of 16 (an address, an integer)."""
    names = list(getattr(kernel, "arg_names", []))
    if names and sorted(names) != sorted([*signature, *constexprs]):  # this test's list is stale: fail, not skip
        print(f"{kernel.__name__} takes {names}, the test gives {[*signature, *constexprs]}", file=sys.stderr)
        sys.exit(1)
    try:
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    except (TypeError, KeyError, AttributeError) as exc:  # another Triton's ahead-of-time API: not our kernels
        print(f"UNSUPPORTED ASTSource: {type(exc).__name__}: {exc}")
        sys.exit(3)
    for arch in (90, 80):  # an H100, an A100
        try:
            triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
        except FileNotFoundError as exc:  # no ptxas in this Triton's install
            print(f"UNSUPPORTED ptxas: {exc}")
            sys.exit(3)
    print("compiled", kernel.__name__, sorted(constexprs.items()))

ints = lambda *names: dict.fromkeys(names, "i32")
for dtype in ("fp32", "bf16", "fp16"):
    p = "*" + dtype
    compile(swiglu._silu_mul_forward_kernel, {"a_ptr": p, "u_ptr": p, "h_ptr": p, "n": "i32"},
            {"PRECISE": True, "BLOCK": 1024})
    for need_a, need_u in ((True, True), (True, False), (False, True)):
        compile(swiglu._silu_mul_backward_kernel,
                {"g_ptr": p, "a_ptr": p, "u_ptr": p, "da_ptr": p, "du_ptr": p, "n": "i32"},
                {"NEED_A": need_a, "NEED_U": need_u, "PRECISE": True, "BLOCK": 1024})
    compile(rms_norm._rms_norm_forward_kernel,
            {"x_ptr": p, "w_ptr": "*fp32", "y_ptr": "*fp32", "rstd_ptr": "*fp32", **ints("rows", "cols"),
             "cols_f": "fp32", **ints("x_stride", "y_stride"), "eps": "fp32"},
            {"PRECISE": True, "ROWS": 2, "BLOCK": 2048})
    for need_x, split, need_w in ((True, dtype == "fp32", True), (False, False, True), (True, False, False)):
        compile(rms_norm._rms_norm_backward_kernel,
                {"g_ptr": p, "x_ptr": p, "w_ptr": p, "rstd_ptr": "*fp32", "dx_ptr": "*fp32" if split else p,
                 "dx_again_ptr": "*fp32", "dw_ptr": "*fp32", **ints("rows", "cols"), "cols_f": "fp32",
                 **ints("rows_per_program", "g_stride", "x_stride", "dx_stride")},
                {"NEED_X": need_x, "SPLIT": split, "NEED_W": need_w, "BLOCK": 2048})
    # the weight update's GEMM, as its autotuner launches it (UPCAST: the interpreter's form only): any integers; and
    # the variant of a one-token expert's or a one-row head tile's part (M, N and the unit strides are 1, which
    # Triton compiles as constants), with the other arguments multiples of 16 (what the warm-ups compile ahead)
    code = wgrad_update._DTYPE_CODE[{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]]
    flags = {"SIGN": dtype != "fp32", "STOCHASTIC": dtype != "fp32", "DTYPE_CODE": code,
             "IEEE_FP32": dtype == "fp32", "UPCAST": False, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64}
    data = {"offset": "i64", "step": "fp32", "key1": "i64", "key2": "i64", "store": "i32"}
    pointers = {"g_ptr": p, "x_ptr": p, "w_ptr": p, "ok_ptr": "*u8"}
    sizes = ("M", "N", "K", "stride_gm", "stride_gn", "stride_xm", "stride_xk", "stride_wn", "stride_wk")
    compile(wgrad_update._wgrad_update_kernel, {**pointers, **ints(*sizes), **data}, flags)
    ones = dict.fromkeys(("M", "N", "stride_gm", "stride_gn", "stride_xk", "stride_wk"), 1)
    compile(wgrad_update._wgrad_update_kernel, {**pointers, **ints("K", "stride_xm", "stride_wn"), **data},
            {**flags, **ones}, aligned=(*pointers, "K", "stride_xm", "stride_wn"))
    # the bare epilogue of a bias (one row, unit stride): any length, and a one-row tile's (the length and the row
    # stride 1)
    epilogue = {"SIGN": dtype != "fp32", "STOCHASTIC": dtype != "fp32", "DTYPE_CODE": code, "EXACT_MUL": True,
                "BLOCK_R": 16, "BLOCK_C": 64}
    pointers = {"p_ptr": p, "grad_ptr": "*fp32", "ok_ptr": "*u8"}
    data = {"offset": "i64", "step": "fp32", "key1": "i64", "key2": "i64", "store": "i32"}
    compile(wgrad_update._apply_update_kernel, {**pointers, **ints("C", "stride_pr"), **data},
            {**epilogue, "R": 1, "stride_pc": 1}, aligned=("grad_ptr", "ok_ptr"))
    compile(wgrad_update._apply_update_kernel, {**pointers, **data},
            {**epilogue, "R": 1, "C": 1, "stride_pr": 1, "stride_pc": 1})
compile(rotary._rotary_kernel,
        {"x_ptr": "*bf16", "out_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
         **ints("rows", "heads", "seq", "half", "x_stride_b", "x_stride_h", "x_stride_s", "out_stride_b",
                "out_stride_h", "out_stride_s", "table_stride_b")},
        {"BACKWARD": True, "ROWS": 16, "HALF": 64})
'''


def test_the_element_wise_kernels_compile_for_an_h100_and_an_a100():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton {triton.__version__} has no ahead-of-time CUDA compile here ({exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 3:  # the environment, not a kernel: another ahead-of-time API, no ptxas
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-4000:]
    # per dtype: 4 SwiGLU, 4 RMSNorm, 2 of the weight update's GEMM and 2 of its bare epilogue; the rotary one
    assert done.stdout.count("compiled") == 3 * 12 + 1
