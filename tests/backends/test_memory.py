"""The SGD and SIGN roles' extra memory is bounded by the chunk budget: a dW larger than the budget is never
allocated whole, one within it is one GEMM; SGD with nearest rounding needs no buffer at all.

Measured with the profiler's allocation events (torch allocations; BLAS-internal packing buffers are not torch
allocations and are bounded by BLAS's block sizes, not by dW).  The input does not require grad, so dX is not
part of what is measured; ``slack`` is what any backward of this layer allocates for activation-sized temporaries
(a copy of g, BLAS's packed inputs), which scales with tokens, not with the weight.
"""

import pytest
import torch

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan, fused_linear
from bread_kernels.bench.memory import trace_allocations
from tests.conftest import DEVICE, backends_for

N_OUT, N_IN, TOKENS = 1024, 384, 8


def backward_trace(dtype, role, rounding=Rounding.AUTO):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(N_OUT, N_IN, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(TOKENS, N_IN, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(TOKENS, N_OUT, generator=gen).to(dtype).to(DEVICE)
    plan = WeightPlan(role, OnTheFlyUpdate(lr=1e-3, rounding=rounding))
    fused_linear(x, weight, None, plan).backward(g)  # warm-up: cuBLAS's workspace and the autotuner are not dW's
    y = fused_linear(x, weight, None, plan)
    trace = trace_allocations(lambda: y.backward(g), DEVICE)
    dw_bytes = weight.numel() * weight.element_size()
    # activation-sized temporaries, plus BLAS's packed copy of x (oneDNN pads the token dimension to 64)
    slack = 2 * (g.numel() + x.numel()) * g.element_size() + 64 * N_IN * x.element_size()
    return trace, dw_bytes, slack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_a_dw_larger_than_the_budget_is_never_allocated_whole(backend, dtype, role, monkeypatch):
    dw_bytes = N_OUT * N_IN * dtype.itemsize
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(dw_bytes // 4))
    trace, dw_bytes, slack = backward_trace(dtype, role)
    if trace.largest_bytes >= 0:  # known on CPU only
        assert trace.largest_bytes <= dw_bytes // 4, f"an allocation of {trace.largest_bytes} B (dW is {dw_bytes} B)"
    assert trace.peak_bytes <= dw_bytes // 4 + slack, f"peak {trace.peak_bytes} B (dW is {dw_bytes} B)"


def test_sgd_with_nearest_rounding_allocates_nothing_weight_sized(backend):
    trace, dw_bytes, slack = backward_trace(torch.float32, Role.SGD)
    assert trace.peak_bytes <= slack, f"peak {trace.peak_bytes} B; SGD in fp32 should need no chunk at all"


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the native CPU backend's ops (the Triton kernel is one launch)")
def test_a_dw_within_the_budget_is_one_gemm(monkeypatch):
    """The default budget holds this layer's dW: one GEMM into one buffer, as autograd's, and one epilogue, which
    checks the dW's finiteness itself (no op of its own for the flag)."""
    monkeypatch.setenv("BREAD_BACKEND", "native")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(N_OUT, N_IN, generator=gen)
    x, g = torch.randn(TOKENS, N_IN, generator=gen), torch.randn(TOKENS, N_OUT, generator=gen)
    y = fused_linear(x, weight, None, WeightPlan(Role.SIGN, OnTheFlyUpdate(lr=1e-3)))
    with torch.profiler.profile() as prof:
        y.backward(g)
    names = [e.name for e in prof.events()]
    assert names.count("aten::mm") == 1 and names.count("bread_kernels::apply_update_if_finite_") == 1, names
    assert "bread_kernels::all_finite" not in names and "bread_kernels::apply_update_" not in names, names


@pytest.mark.parametrize("chunk_bytes", [16 << 10, 64 << 10])
def test_extra_memory_follows_the_configured_chunk(monkeypatch, chunk_bytes):
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(chunk_bytes))
    for name in [b for b in backends_for(DEVICE) if b != "triton"]:  # the chunked (BLAS + epilogue) backends
        monkeypatch.setenv("BREAD_BACKEND", name)
        trace, _, slack = backward_trace(torch.bfloat16, Role.SIGN)
        assert trace.peak_bytes <= chunk_bytes + slack, f"{name}: peak {trace.peak_bytes} B for a {chunk_bytes} B chunk"


@pytest.mark.parametrize("value", ["0", "1e8"])
def test_bad_chunk_size_is_refused(monkeypatch, value):
    monkeypatch.setenv("BREAD_CHUNK_BYTES", value)
    monkeypatch.setenv("BREAD_BACKEND", "torch")  # a chunked backend that serves every device
    with pytest.raises(ValueError, match="BREAD_CHUNK_BYTES must be a positive"):  # 1e8: was int()'s bare message
        backward_trace(torch.float32, Role.SIGN)


@pytest.mark.skipif(DEVICE != "cpu", reason="the torch backend's epilogue in torch ops (the GPU kernels are in place)")
@pytest.mark.parametrize("shape", [(1024, 384), (1024 * 384,)], ids=["2d", "1d"])
def test_a_whole_gradients_update_on_the_torch_backend_takes_a_chunks_temporaries(shape, monkeypatch):
    """A gradient that exists whole (the fused head's dW accumulated in its forward, a hooked parameter's ``.grad``)
    is written by the torch backend's fp32 epilogue, ~48 bytes of temporaries per element: over row slices (a 1-D
    parameter's element ranges) within the chunk budget, not the whole tensor at once, and to the same values as in
    one slice, stochastic rounding's random bits included.  Control: with a budget that holds it, one slice peaks at
    the whole tensor's temporaries."""
    from bread_kernels.backends import get_backend

    monkeypatch.setenv("BREAD_BACKEND", "torch")
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen).to(torch.bfloat16)
    grad = torch.randn(shape, generator=gen)

    def update(budget):
        monkeypatch.setenv("BREAD_CHUNK_BYTES", str(budget))
        param = start.clone()
        backend = get_backend(param.device)
        trace = trace_allocations(lambda: backend.apply_update_if_finite_(
            param, grad, 1e-2, False, Rounding.STOCHASTIC, seed=7, checked=(grad,)))
        return param, trace.peak_bytes

    whole_temporaries = start.numel() * 48
    chunked, chunked_peak = update(whole_temporaries // 8)
    whole, whole_peak = update(2 * whole_temporaries)
    assert torch.equal(chunked, whole)
    assert not torch.equal(whole, start)
    assert chunked_peak <= whole_temporaries // 8 + 1024, f"peak {chunked_peak} B"
    assert whole_peak > whole_temporaries // 2, f"peak {whole_peak} B"
