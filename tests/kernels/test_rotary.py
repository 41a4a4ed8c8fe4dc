"""The Triton rotary kernel (under the interpreter on a CPU) against torch's rotate-half form, which is autograd's
values (tests/functions/test_rotary.py), bit for bit on odd shapes and strides; its errors."""

import pytest
import torch

from bread_kernels.backends.rotary import rotated
from bread_kernels.kernels.rotary import rotary_

from ..conftest import DEVICE, DTYPES

# (B, H, S, D, cos batch): odd sizes, a head dimension whose half is no power of two, more rows than one program
SHAPES = [(3, 5, 7, 10, 1), (2, 1, 9, 6, 2), (1, 3, 33, 64, 1), (2, 2, 5, 2, 2)]


#: (x's, the table's, out's dtype): one dtype; autocast's forward (bf16/fp16 q, fp32 cos, fp32 out) and backward
#: (fp32 g and cos, q's dtype out); an fp32 q with a bf16 cos
MIXES = [(d, d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32, torch.float32),
                                      (torch.float16, torch.float32, torch.float32),
                                      (torch.float32, torch.float32, torch.bfloat16),
                                      (torch.float32, torch.float32, torch.float16),
                                      (torch.float32, torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_kernel_is_torchs_form_bit_for_bit(dtypes, shape, backward):
    dtype, table_dtype, out_dtype = dtypes
    batch, heads, seq, dim, table_batch = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(batch, seq, heads, dim, generator=gen) * 5).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    cos = torch.randn(table_batch, seq, dim, generator=gen).to(device=DEVICE, dtype=table_dtype)
    sin = torch.randn(table_batch, seq, dim, generator=gen).to(device=DEVICE, dtype=table_dtype)
    out = torch.full((batch, heads, seq, dim), float("nan"), device=DEVICE, dtype=out_dtype)  # contiguous: x's is not
    rotary_(out, x, cos, sin, backward)
    assert torch.equal(out, rotated(x, cos, sin, backward, dtype=out_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_non_finite_values_stay_non_finite(dtype):
    """inf·0, inf−inf and a nan input give nan (and inf inf) where torch's ops do: a non-finite gradient must reach
    the finiteness checks of the updates below it."""
    x = torch.tensor([[[[float("inf"), 1.0, float("nan"), -2.0, 0.0, float("inf")]]]], device=DEVICE).to(dtype)
    cos = torch.tensor([[[0.0, 1.0, 1.0, 0.5, 2.0, 1.0]]], device=DEVICE).to(dtype)
    for backward in (False, True):
        out = torch.empty_like(x)
        rotary_(out, x, cos, cos.flip(-1), backward)
        torch.testing.assert_close(out, rotated(x, cos, cos.flip(-1), backward), rtol=0, atol=0, equal_nan=True)
        assert out.isnan().any()


def test_errors_name_what_is_wrong():
    x = torch.randn(2, 3, 4, 6, device=DEVICE)
    cos = torch.randn(1, 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="even D"):
        rotary_(torch.empty(2, 3, 4, 5, device=DEVICE), torch.randn(2, 3, 4, 5, device=DEVICE), cos[..., :5],
                cos[..., :5], False)
    with pytest.raises(ValueError, match=r"\[1 or B, S, D\]"):
        rotary_(torch.empty_like(x), x, cos[:, :3], cos[:, :3], False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rotary_(torch.empty_like(x), x, cos.double(), cos.double(), False)
