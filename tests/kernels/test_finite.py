"""The Triton finiteness flag (under the interpreter on CPU) against a float64 check, and what the Triton backend's
update launches around its kernel."""

import pytest
import torch

from bread_kernels.plan import Rounding
from tests.aten_ops import AtenOps
from tests.conftest import DEVICE

finite = pytest.importorskip("bread_kernels.kernels.finite")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(*tensors, ok=None):
    """Finite in float64 (a bf16/fp16/fp32 value widens exactly), and'ed with ok."""
    every = all(bool(torch.isfinite(t.double()).all()) for t in tensors)
    return every and (ok is None or bool(ok))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 53), (2049,), (3, 1, 7), (0, 5)], ids=str)
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_the_flag_is_the_finiteness_of_every_tensor_anded_with_ok(dtype, shape, bad):
    gen = torch.Generator().manual_seed(len(shape))
    first = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    second = (torch.randn(19, 6, generator=gen) * 1e3).to(dtype).to(DEVICE)
    third = torch.randn(11, generator=gen).to(DEVICE)  # fp32 beside a low-precision pair: a bias's gradient
    for position in (0, -1):  # the first and the last block of a tensor
        a = first.clone()
        if bad is not None and a.numel():
            a.view(-1)[position] = float(bad)
        oks = (None, torch.tensor(True, device=DEVICE), torch.tensor(False, device=DEVICE))
        # one ok per way of passing the tensors, rotating with the position, so each ok meets each position (the
        # interpreter is slow: 10 launches a case, not 30; ok is and-ed in the same way whatever the tensors)
        for i, tensors in enumerate(((a,), (a, second), (second, a), (second, a, third), (third, second, a))):
            ok = oks[(i + position) % 3]
            flag = finite.finite_flag(*tensors, ok=ok)
            assert flag.dtype == torch.bool and flag.shape == () and flag.device.type == torch.device(DEVICE).type
            assert bool(flag) is reference(*tensors, ok=ok), (tensors[0].shape, bad, position, ok)


def test_the_largest_finite_values_are_finite_and_ok_is_not_written():
    values = [torch.full((9,), 65504.0, dtype=torch.float16), torch.full((9,), 3.3895e38, dtype=torch.bfloat16),
              torch.full((9,), torch.finfo(torch.float32).max), torch.full((9,), -torch.finfo(torch.float32).max)]
    assert bool(finite.finite_flag(*(v.to(DEVICE) for v in values)))
    ok = torch.tensor(True, device=DEVICE)
    assert not bool(finite.finite_flag(torch.tensor([float("nan")], device=DEVICE), ok=ok))
    assert bool(ok)  # the caller's flag is read, never cleared


def test_bad_input_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="at least one tensor"):
        finite.finite_flag()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        finite.finite_flag(torch.ones(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="one-element bool tensor"):
        finite.finite_flag(torch.ones(3, device=DEVICE), ok=torch.ones(2, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("bias", [False, True])
def test_the_triton_update_decides_its_flag_without_torch_reductions(monkeypatch, bias):
    """The Triton backend's update gates on the flag's kernel: no ``aminmax``/``isfinite``/``all``/``stack`` (the
    torch form's five to nine launches); the weight is written exactly where g, x and the bias's gradient are
    finite."""
    from bread_kernels.backends import get_backend

    monkeypatch.setenv("BREAD_BACKEND", "triton")
    backend = get_backend(DEVICE)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(13, 7, generator=gen).to(DEVICE)
    g, x = torch.randn(9, 13, generator=gen).to(DEVICE), torch.randn(9, 7, generator=gen).to(DEVICE)
    also = (g.sum(0),) if bias else ()
    w = weight.clone()
    with AtenOps() as ops:
        ok = backend.update_weight_(w, g, x, 0.5, False, Rounding.NEAREST, seed=3, also=also)
    assert bool(ok) and not {"aminmax", "isfinite", "all", "stack"} & set(ops.names), ops.names
    torch.testing.assert_close(w, weight - 0.5 * (g.t() @ x), rtol=1e-5, atol=1e-5)
    g_bad = g.clone()
    g_bad[4, 2] = float("inf")
    w = weight.clone()
    ok = backend.update_weight_(w, g_bad, x, 0.5, False, Rounding.NEAREST, seed=3, also=also)
    assert not bool(ok) and torch.equal(w, weight)
    if bias:
        w = weight.clone()
        ok = backend.update_weight_(w, g, x, 0.5, False, Rounding.NEAREST, seed=3,
                                    also=(torch.full((13,), float("nan"), device=DEVICE),))
        assert not bool(ok) and torch.equal(w, weight)
