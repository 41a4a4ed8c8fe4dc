"""The Triton RMSNorm kernels (under the interpreter on a CPU) against the torch ops of
:mod:`bread_kernels.functions.rms_norm` (autograd's values, tests/functions/test_rms_norm.py) and float64, on odd
shapes and more rows than the backward has programs; the output from the kernel's ``r`` is torch's bit for bit (what
a kept block's rebuild relies on); non-finite values; errors.

The kernel sums a row's squares in another order than torch's mean: ``r`` agrees to fp32 rounding, and so does
every gradient (``∂L/∂r`` is a row sum too)."""

import pytest
import torch

from bread_kernels.functions.rms_norm import RMSNormFunction, _normalized, _rstd
from bread_kernels.kernels.rms_norm import MAX_COLUMNS, rms_norm_backward, rms_norm_forward

from ..conftest import DEVICE, DTYPES
from . import assert_rarely_differs

SHAPES = [(9, 37), (1, 129), (23, 5), (6, 1030)]  # rows beyond the CPU's 4 backward programs; odd widths

#: (x's dtype, w's dtype): one dtype, and a bf16/fp16 residual stream with an fp32 weight (y is then fp32)
MIXES = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]

#: relative tolerance: a few fp32 ulps, or one ulp of the coarsest dtype a value was rounded to on its way (an fp32
#: y of an fp16 x went through d_x(x_f · r), which r's last bit can move by one fp16 ulp)
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _close(actual, expected, *rounded_through: torch.dtype):
    """Within the tolerance; a bf16/fp16 result is torch's but for the rare element where an fp32 last bit crossed
    a rounding boundary (one ulp, at most 1% of them): a dropped or misplaced rounding changes far more."""
    rtol = max(RTOL[d] for d in (expected.dtype, *rounded_through))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 0.1, equal_nan=True)
    assert_rarely_differs(actual, expected)


def _inputs(shape, x_dtype, w_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + shape[0])
    x = (torch.randn(shape, generator=gen) * 3).to(device=DEVICE, dtype=x_dtype)
    w = (torch.randn(shape[-1], generator=gen) * 0.5 + 1).to(device=DEVICE, dtype=w_dtype)
    g = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=torch.promote_types(x_dtype, w_dtype))
    return x, w, g


def _torch_backward(x, w, g, eps=1e-6):
    """torch's ops (the Function's own path, forced: on a GPU the default backend would run the kernels under
    test): ``(y, ∂L/∂x, ∂L/∂w)``."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BREAD_BACKEND", "torch")
        y = RMSNormFunction.apply(x, None, w, eps)
        grad_x, grad_w = torch.autograd.grad(y, (x, w), g)
    return y.detach(), grad_x, grad_w


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_forward_is_torchs_and_its_output_torchs_from_its_rstd_bit_for_bit(dtypes, shape):
    x, w, _ = _inputs(shape, *dtypes)
    y, rstd = rms_norm_forward(x, w, 1e-6)
    assert y.dtype == torch.promote_types(*dtypes) and rstd.dtype == torch.float32 and rstd.shape == (shape[0],)
    torch.testing.assert_close(rstd, _rstd(x.float(), 1e-6).squeeze(-1), rtol=1e-6, atol=0)
    assert torch.equal(y, _normalized(x, w, rstd[:, None]))  # what a consumer's rebuild computes
    _close(y, _normalized(x, w, _rstd(x.float(), 1e-6)), x.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_backward_is_torchs(dtypes, shape):
    x, w, g = _inputs(shape, *dtypes)
    _, rstd = rms_norm_forward(x, w, 1e-6)
    grad_x, second, grad_w = rms_norm_backward(g, x, w, rstd, True, False, True)
    assert second is None and grad_x.dtype == x.dtype and grad_w.dtype == w.dtype
    _, ref_x, ref_w = _torch_backward(x, w, g)
    _close(grad_x, ref_x, x.dtype)
    _close(grad_w, ref_w, x.dtype)


def test_fp32_split_terms_sum_to_the_gradient_and_each_asked_for_alone():
    x, w, g = _inputs((11, 37), torch.float32, torch.float32)
    _, rstd = rms_norm_forward(x, w, 1e-6)
    first, through, grad_w = rms_norm_backward(g, x, w, rstd, True, True, True)
    assert first.dtype == through.dtype == torch.float32
    _, ref_x, ref_w = _torch_backward(x, w, g)
    _close(first + through, ref_x)
    only_x = rms_norm_backward(g, x, w, rstd, True, False, False)
    only_w = rms_norm_backward(g, x, w, rstd, False, False, True)
    assert only_x[2] is None and only_w[0] is None and only_w[1] is None
    assert torch.equal(only_w[2], grad_w)
    _close(only_x[0], ref_x)


def test_fp32_matches_float64():
    x, w, g = _inputs((13, 67), torch.float32, torch.float32)
    x64, w64, g64 = (t.double().requires_grad_() for t in (x, w, g))
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref_x, ref_w = torch.autograd.grad(y64, (x64, w64), g64)
    y, rstd = rms_norm_forward(x, w, 1e-6)
    grad_x, _, grad_w = rms_norm_backward(g, x, w, rstd, True, False, True)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad_x.double(), ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_non_finite_rows_stay_non_finite(dtype):
    """A row holding inf or nan gives a non-finite output and gradient in that row, and a non-finite ∂L/∂w, as
    torch's ops do; the other rows are unaffected."""
    x, w, g = _inputs((5, 8), dtype, dtype)
    x[1, 3] = float("inf")
    g[3, 2] = float("nan")
    y, rstd = rms_norm_forward(x, w, 1e-6)
    grad_x, _, grad_w = rms_norm_backward(g, x, w, rstd, True, False, True)
    ref_y, ref_x, ref_w = _torch_backward(x, w, g)
    for ours, theirs in ((y, ref_y), (grad_x, ref_x)):
        assert torch.equal(ours.isfinite().all(-1), theirs.isfinite().all(-1))
        _close(ours[[0, 2, 4]], theirs[[0, 2, 4]])
    assert not grad_w.isfinite().all() and not ref_w.isfinite().all()


def test_errors_name_what_is_wrong():
    x, w, g = _inputs((4, 6), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"\[R, K\] with a unit last stride"):
        rms_norm_forward(x.t(), w[:4], 1e-6)
    with pytest.raises(ValueError, match="weight contiguous"):
        rms_norm_forward(x, w[:5], 1e-6)
    with pytest.raises(ValueError, match=f"K <= {MAX_COLUMNS}"):
        rms_norm_forward(torch.zeros(1, MAX_COLUMNS + 1, device=DEVICE), torch.ones(MAX_COLUMNS + 1, device=DEVICE),
                         1e-6)
    _, rstd = rms_norm_forward(x, w, 1e-6)
    with pytest.raises(ValueError, match="rstd"):
        rms_norm_backward(g, x, w, rstd.double(), True, False, True)
