"""The Triton SwiGLU kernels (under the interpreter on a CPU) against torch's ops, which are autograd's values
(tests/functions/test_swiglu.py), and against float64, on odd shapes; non-finite values; their errors.

Under the interpreter ``exp`` is numpy's, which can differ from torch's in fp32's last bit, so fp32 compares within
a few ulps; every other rounding is torch's (the kernel rounds where torch's ops do)."""

import pytest
import torch
import torch.nn.functional as F

from bread_kernels.kernels.swiglu import silu_mul_backward, silu_mul_forward

from ..conftest import DEVICE, DTYPES
from . import assert_rarely_differs

SHAPES = [(7, 37), (3, 5, 129), (1, 1), (2, 1029)]  # odd widths; more elements than one program (1,024)

#: relative tolerance per dtype: a few fp32 ulps (numpy's exp; silu_backward's ``1 + a·(1 − σ)`` cancels near
#: a ≈ −1.28, which the absolute tolerance covers), else one ulp of the dtype (a last fp32 bit that crosses a
#: rounding boundary)
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=gen) * 4).to(device=DEVICE, dtype=dtype)  # both sides of silu's bend
    u = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    return a, u, g


def _close(actual, expected, dtype):
    """Within the tolerance; a bf16/fp16 result is torch's but for the rare element where an fp32 last bit crossed
    a rounding boundary (one ulp, at most 1% of them): a dropped or misplaced rounding changes far more."""
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * 0.1, equal_nan=True)
    assert_rarely_differs(actual, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_and_backward_are_torchs_ops(dtype, shape):
    a, u, g = _inputs(shape, dtype)
    h = silu_mul_forward(a, u)
    assert h.dtype == dtype and h.shape == a.shape
    _close(h, F.silu(a) * u, dtype)
    grad_a, grad_u = silu_mul_backward(g, a, u, True, True)
    _close(grad_a, torch.ops.aten.silu_backward((g * u).to(dtype), a), dtype)
    _close(grad_u, F.silu(a) * g, dtype)


@pytest.mark.parametrize("need_a, need_u", [(True, False), (False, True), (False, False)])
def test_only_the_gradients_asked_for(need_a, need_u):
    a, u, g = _inputs((5, 33), torch.float32)
    grad_a, grad_u = silu_mul_backward(g, a, u, need_a, need_u)
    assert (grad_a is not None) == need_a and (grad_u is not None) == need_u
    both = silu_mul_backward(g, a, u, True, True)
    for got, full in zip((grad_a, grad_u), both):
        if got is not None:
            assert torch.equal(got, full)


def test_fp32_matches_float64():
    a, u, g = _inputs((9, 131), torch.float32)
    a64, u64, g64 = a.double(), u.double(), g.double()
    sigmoid = torch.sigmoid(a64)
    torch.testing.assert_close(silu_mul_forward(a, u).double(), a64 * sigmoid * u64, rtol=2e-6, atol=1e-7)
    grad_a, grad_u = silu_mul_backward(g, a, u, True, True)
    torch.testing.assert_close(grad_a.double(), g64 * u64 * sigmoid * (1 + a64 * (1 - sigmoid)), rtol=2e-6,
                               atol=1e-7)
    torch.testing.assert_close(grad_u.double(), g64 * a64 * sigmoid, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_non_finite_values_stay_non_finite_as_in_torch(dtype):
    """inf and nan in a, u or g give what torch's ops give (a non-finite gradient must reach the update's checks)."""
    values = [float("inf"), -float("inf"), float("nan"), 1.0, -2.0, 0.0]
    a = torch.tensor([values, [1.0] * 6], device=DEVICE).to(dtype)
    u = torch.tensor([[1.0] * 6, values], device=DEVICE).to(dtype)
    g = torch.tensor([values[::-1], values], device=DEVICE).to(dtype)
    h = silu_mul_forward(a, u)
    _close(h, F.silu(a) * u, dtype)  # nan where torch's is (equal_nan), inf where it is (an inf is not close to 1)
    grad_a, grad_u = silu_mul_backward(g, a, u, True, True)
    _close(grad_a, torch.ops.aten.silu_backward((g * u).to(dtype), a), dtype)
    _close(grad_u, F.silu(a) * g, dtype)
    assert not (h.isfinite().all() or grad_a.isfinite().all() or grad_u.isfinite().all())


def test_errors_name_what_is_wrong():
    a, u, g = _inputs((4, 6), torch.float32)
    with pytest.raises(ValueError, match="one shape and one dtype"):
        silu_mul_forward(a, u[:, :5])
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul_forward(a.t(), u.t())
    with pytest.raises(ValueError, match="one shape and one dtype"):
        silu_mul_backward(g.to(torch.bfloat16), a, u, True, True)
