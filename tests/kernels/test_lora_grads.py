"""The Triton LoRA-gradient kernel (under the interpreter on CPU) and the GEMM path against float64."""

import pytest
import torch

from bread_kernels.backends.lora_gemm import lora_grads_gemm
from tests.conftest import DEVICE

triton_kernel = pytest.importorskip("bread_kernels.kernels.lora_grads")


def float64_reference(g, x, a, b, s):
    g, x, a, b = g.double(), x.double(), a.double(), b.double()
    u = x @ a.t()
    v = g @ b
    return v, s * v.t() @ x, s * g.t() @ u


@pytest.mark.parametrize("impl", ["triton", "gemm"])
@pytest.mark.parametrize("shape", [(37, 45, 29, 1), (19, 70, 33, 8), (50, 21, 40, 64)], ids=str)
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "A", "B"])
def test_v_da_db_match_float64(impl, shape, need):
    m, n, k, r = shape
    gen = torch.Generator().manual_seed(m + r)
    g, x = torch.randn(m, n, generator=gen).to(DEVICE), torch.randn(m, k, generator=gen).to(DEVICE)
    a, b = torch.randn(r, k, generator=gen).to(DEVICE), torch.randn(n, r, generator=gen).to(DEVICE)
    u = x @ a.t()
    fn = triton_kernel.lora_grads if impl == "triton" else lora_grads_gemm
    v, da, db = fn(g, x, u, b, 0.75, *need)
    v_ref, da_ref, db_ref = float64_reference(g, x, a, b, 0.75)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-5)
    assert (da is None) != need[0] and (db is None) != need[1]
    if need[0]:
        torch.testing.assert_close(da.double(), da_ref, rtol=1e-5, atol=1e-4)
    if need[1]:
        torch.testing.assert_close(db.double(), db_ref, rtol=1e-5, atol=1e-4)


def test_bf16_inputs_accumulate_in_fp32():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(33, 40, generator=gen).bfloat16().to(DEVICE)
    x = torch.randn(33, 24, generator=gen).bfloat16().to(DEVICE)
    a, b = torch.randn(8, 24, generator=gen).to(DEVICE), torch.randn(40, 8, generator=gen).to(DEVICE)
    u = x.float() @ a.t()
    v, da, db = triton_kernel.lora_grads(g, x, u, b, 2.0, True, True)
    v_ref, da_ref, db_ref = float64_reference(g, x, a, b, 2.0)
    for got, want in ((v, v_ref), (da, da_ref), (db, db_ref)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_rank_above_the_kernel_maximum_is_refused():
    g, x = torch.randn(4, 5).to(DEVICE), torch.randn(4, 3).to(DEVICE)
    r = triton_kernel.MAX_RANK + 1
    with pytest.raises(ValueError, match="above the kernel's maximum"):
        triton_kernel.lora_grads(g, x, torch.randn(4, r).to(DEVICE), torch.randn(5, r).to(DEVICE), 1.0, True, True)


def test_deterministic_algorithms_take_the_gemms_not_the_atomic_kernel(monkeypatch):
    """The kernel sums its programs' partial dA, dB with atomics (run-to-run last bits on a GPU): under
    ``torch.use_deterministic_algorithms(True)`` the triton backend computes them with the GEMMs instead, even with
    ``BREAD_LORA_KERNEL=triton``."""
    from bread_kernels.backends import get_backend

    monkeypatch.setenv("BREAD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BREAD_LORA_KERNEL", "triton")
    backend = get_backend(DEVICE)
    calls = []
    kernel = backend._lora.lora_grads
    monkeypatch.setattr(backend._lora, "lora_grads", lambda *args: calls.append(1) or kernel(*args))
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(19, 70, generator=gen).to(DEVICE), torch.randn(19, 33, generator=gen).to(DEVICE)
    a, b = torch.randn(8, 33, generator=gen).to(DEVICE), torch.randn(70, 8, generator=gen).to(DEVICE)
    u = x @ a.t()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = backend.lora_grads(g, x, u, b, 0.75, True, True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert calls == []
    for a_, b_ in zip(got, lora_grads_gemm(g, x, u, b, 0.75, True, True)):
        assert torch.equal(a_, b_)
    backend.lora_grads(g, x, u, b, 0.75, True, True)
    assert calls == [1]  # the kernel otherwise
