"""The native backend's LoRA adapter gradients from a bf16/fp16 g and x̃ read as they are
(``bread_kernels::rank_products``), against a float64 reference on odd shapes, and the fp32 copies they avoid."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bread_kernels.backends import get_backend
from bread_kernels.backends.lora_gemm import lora_grads_gemm


def operands(m, n, k, rank, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    u = torch.randn(m, rank, generator=gen)
    lora_b = torch.randn(n, rank, generator=gen) * 0.1
    return g, x, u, lora_b


def float64_reference(g, x, u, lora_b, scaling):
    g, x, u, lora_b = (t.double() for t in (g, x, u, lora_b))
    v = g @ lora_b
    return v, scaling * v.t() @ x, scaling * g.t() @ u


def native(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "native")
    backend = get_backend("cpu")
    assert backend.name == "native"
    return backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 5, 16])
@pytest.mark.parametrize("m", [37, 1301])  # 1301 rows: two chunks of row sums on two threads
def test_adapter_gradients_match_float64(monkeypatch, dtype, rank, m):
    backend = native(monkeypatch)
    g, x, u, lora_b = operands(m, 53, 29, rank, dtype)
    v, grad_a, grad_b = backend.lora_grads(g, x, u, lora_b, 0.75, True, True)
    want = float64_reference(g, x, u, lora_b, 0.75)
    for got, expected, what in zip((v, grad_a, grad_b), want, ("v", "dA", "dB")):
        assert got.dtype == torch.float32 and got.shape == expected.shape, what
        # fp32 sums of exact products: within fp32 rounding of the sum's magnitude
        tolerance = 2e-6 * (expected.abs().amax() + 1) * max(1, m // 37)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=float(tolerance), msg=what)


def test_results_are_deterministic_and_each_part_is_optional(monkeypatch):
    backend = native(monkeypatch)
    g, x, u, lora_b = operands(1301, 53, 29, 8, torch.bfloat16)
    first = backend.lora_grads(g, x, u, lora_b, 2.0, True, True)
    again = backend.lora_grads(g, x, u, lora_b, 2.0, True, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    v, grad_a, grad_b = backend.lora_grads(g, x, u, lora_b, 2.0, False, False)
    assert torch.equal(v, first[0]) and grad_a is None and grad_b is None
    v, grad_a, grad_b = backend.lora_grads(g, x, u, lora_b, 2.0, True, False)
    assert torch.equal(grad_a, first[1]) and grad_b is None


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """BLAS's fp32 GEMM gives the same sums at 1 and 2 threads on a CPU; so do the rank-r products (threads split
    q's columns, not its sums over the rows)."""
    backend = native(monkeypatch)
    g, x, u, lora_b = operands(1301, 203, 29, 8, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.lora_grads(g, x, u, lora_b, 2.0, True, True)
        torch.set_num_threads(2)
        two = backend.lora_grads(g, x, u, lora_b, 2.0, True, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


class _Casts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_bf16_g_and_x_are_read_without_fp32_copies_up_to_the_rank_limit(monkeypatch):
    """BLAS would need fp32 copies of g [M, N] and x̃ [M, K]; the native products read them as they are.  Above
    ``max_rank_products`` the GEMMs (and their copies) serve, with the same results to fp32 rounding."""
    backend = native(monkeypatch)
    limit = backend.max_rank_products
    for rank, copies in ((limit, []), (limit + 1, [(37, 53), (37, 29)])):
        g, x, u, lora_b = operands(37, 53, 29, rank, torch.bfloat16)
        with torch.no_grad():  # as in a backward (one that builds a graph casts x̃: BLAS differentiates)
            assert backend.lora_input_dtype(torch.bfloat16, torch.float32, rank) == \
                (torch.bfloat16 if rank <= limit else torch.float32)
        assert backend.lora_input_dtype(torch.bfloat16, torch.float32, rank) == torch.float32
        with _Casts() as casts:
            got = backend.lora_grads(g, x, u, lora_b, 0.5, True, True)
        assert [s for s in casts.shapes if len(s) == 2 and s[0] == 37] == copies, rank
        want = lora_grads_gemm(g, x, u, lora_b, 0.5, True, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fp32_adapters_on_fp32_inputs_keep_blas(monkeypatch):
    backend = native(monkeypatch)
    assert backend.lora_input_dtype(torch.float32, torch.float32, 8) == torch.float32
    assert backend.lora_input_dtype(torch.bfloat16, torch.bfloat16, 8) == torch.bfloat16  # autocast's adapters


def test_bad_operands_are_refused(monkeypatch):
    native(monkeypatch)
    products = torch.ops.bread_kernels.rank_products
    a = torch.zeros(4, 6, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bt must be"):
        products(a, torch.zeros(2, 5), None)
    with pytest.raises(RuntimeError, match="w must be"):
        products(a, None, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="give bt, w or both"):
        products(a, None, None)
