"""The update epilogue: identical bits on every backend, stochastic rounding unbiased, seeds reproducible."""

import itertools

import pytest
import torch

from bread_kernels.backends import get_backend
from bread_kernels.plan import Rounding
from tests.conftest import DEVICE, backends_for

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
LOW = [torch.bfloat16, torch.float16]


def backend_named(name, monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", name)
    return get_backend(DEVICE)


def bits_of(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


@pytest.mark.parametrize(
    "dtype, sign, rounding",
    list(itertools.product(INT_VIEW, [False, True], [Rounding.NEAREST, Rounding.STOCHASTIC])),
    ids=str,
)
def test_every_backend_produces_the_same_bits(monkeypatch, dtype, sign, rounding):
    gen = torch.Generator().manual_seed(3)
    param = (torch.randn(37, 53, generator=gen) * 4).to(dtype).to(DEVICE)
    grad = (torch.randn(37, 53, generator=gen) * 1e-2).to(DEVICE)
    grad[0, :5] = 0.0  # sign(0) = 0
    results = {}
    for name in backends_for(DEVICE):
        p = param.clone()
        backend_named(name, monkeypatch).apply_update_(p, grad, 0.37, sign, rounding, seed=2**40 + 17, offset=101)
        results[name] = bits_of(p)
    first = next(iter(results.values()))
    for name, bits in results.items():
        assert torch.equal(bits, first), f"{name} differs from {next(iter(results))}"
    assert not torch.equal(first, bits_of(param)), "the update changed nothing"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_bits_do_not_depend_on_chunking_or_strides(backend, dtype):
    """A row chunk with its offset, or a transposed view, draws the bits the whole tensor would."""
    engine = get_backend(DEVICE)
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(37, 53, generator=gen).to(dtype).to(DEVICE)
    grad = (torch.randn(37, 53, generator=gen) * 1e-3).to(DEVICE)
    whole = param.clone()
    engine.apply_update_(whole, grad, 1.0, False, Rounding.STOCHASTIC, seed=5)
    chunked = param.clone()
    for start in range(0, 37, 10):
        stop = min(37, start + 10)
        engine.apply_update_(chunked[start:stop], grad[start:stop].contiguous(), 1.0, False, Rounding.STOCHASTIC,
                             seed=5, offset=start * 53)
    transposed_storage = param.t().contiguous()
    engine.apply_update_(transposed_storage.t(), grad, 1.0, False, Rounding.STOCHASTIC, seed=5)
    assert torch.equal(bits_of(whole), bits_of(chunked))
    assert torch.equal(bits_of(whole), bits_of(transposed_storage.t()))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_keeps_updates_nearest_drops(backend, dtype):
    """w = 1 and an update of 1e-4, below half an ulp: nearest rounding returns 1 every time (the silent failure of
    ``p.add_(g, alpha=-lr)`` in low precision); stochastic rounding's mean over 2¹⁶ elements is 1 − 1e-4 within
    five standard deviations of a Bernoulli mean."""
    engine = get_backend(DEVICE)
    n = 1 << 16
    grad = torch.full((256, n // 256), 1e-4, device=DEVICE)
    nearest = torch.ones(256, n // 256, dtype=dtype, device=DEVICE)
    engine.apply_update_(nearest, grad, 1.0, False, Rounding.NEAREST, seed=0)
    assert torch.all(nearest == 1.0)

    stochastic = torch.ones(256, n // 256, dtype=dtype, device=DEVICE)
    engine.apply_update_(stochastic, grad, 1.0, False, Rounding.STOCHASTIC, seed=0)
    exact = 1.0 - torch.tensor(1e-4, dtype=torch.float32).double().item()
    ulp = 1.0 - torch.tensor(1.0, dtype=dtype).nextafter(torch.tensor(0.0, dtype=dtype)).double().item()
    lower = 1.0 - ulp
    assert set(stochastic.double().unique().tolist()) == {lower, 1.0}  # only the two neighbours
    p = (1.0 - exact) / ulp
    sigma = ulp * (p * (1 - p) / n) ** 0.5
    assert abs(stochastic.double().mean().item() - exact) <= 5 * sigma


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("sign", [False, True], ids=["sgd", "sign"])
def test_stochastic_rounding_is_unbiased_per_element(backend, dtype, sign):
    """Random weights and updates spanning many binades (fp16 subnormals included), each repeated in 256 rows (so
    256 independent counters): the mean over the rows is the exact fp32 result within 5 standard deviations of the
    worst-case Bernoulli (p = ½)."""
    engine = get_backend(DEVICE)
    gen = torch.Generator().manual_seed(9)
    scale = 2.0 ** torch.randint(-22 if dtype == torch.float16 else -30, 4, (997,), generator=gen)
    param = (torch.randn(997, generator=gen) * scale).to(dtype).to(DEVICE)
    grad = (torch.randn(997, generator=gen) * scale * 0.01).to(DEVICE)
    step = 0.3 if not sign else 1e-3
    draws = 256
    rows = param.expand(draws, -1).clone()
    engine.apply_update_(rows, grad.expand(draws, -1).contiguous(), step, sign, Rounding.STOCHASTIC, seed=77)

    exact = (param.float() - step * (torch.sign(grad) if sign else grad)).double()  # the fp32 value being rounded
    lo = exact.to(dtype)
    toward = torch.where(lo.double() <= exact, torch.tensor(float("inf")), torch.tensor(float("-inf"))).to(dtype)
    ulp = (lo.nextafter(toward).double() - lo.double()).abs()
    bound = 5 * ulp * 0.5 / draws**0.5 + 1e-12
    assert ((rows.double().mean(0) - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_same_seed_same_bits_other_seed_other_bits(backend, dtype):
    engine = get_backend(DEVICE)
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(64, 33, generator=gen).to(dtype).to(DEVICE)
    grad = (torch.randn(64, 33, generator=gen) * 1e-3).to(DEVICE)
    out = []
    for seed in (123, 123, 124):
        p = param.clone()
        engine.apply_update_(p, grad, 1.0, False, Rounding.STOCHASTIC, seed=seed)
        out.append(bits_of(p))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


def test_fp32_ignores_stochastic_rounding(backend):
    engine = get_backend(DEVICE)
    param = torch.randn(17, 9, device=DEVICE)
    grad = torch.randn(17, 9, device=DEVICE)
    a, b = param.clone(), param.clone()
    engine.apply_update_(a, grad, 0.1, False, Rounding.STOCHASTIC, seed=1)
    engine.apply_update_(b, grad, 0.1, False, Rounding.NEAREST, seed=2)
    assert torch.equal(a, b)
    assert torch.equal(a, param - grad * 0.1)


def _chunked_backends():
    return [name for name in backends_for(DEVICE) if name != "triton"]  # the CPU backends (BLAS + epilogue)


# how update_weight_ calls them: a linear's check (no ok: g, x and a bias's gradient), a caller's flag alone (the
# experts of a 3-D weight, decided before any slice), both
GATES = {"checked": (True, False), "ok": (False, True), "both": (True, True)}


@pytest.mark.parametrize("dtype", list(INT_VIEW), ids=str)
@pytest.mark.parametrize("gate, bad", [(gate, bad) for gate, (use_checked, use_ok) in GATES.items()
                                       for bad in ("none", *(("g", "x", "also") if use_checked else ()),
                                                   *(("ok",) if use_ok else ()))])
def test_the_gated_writes_check_what_they_are_given_and_return_the_flag(monkeypatch, dtype, gate, bad):
    """``addmm_if_finite_`` (SGD's ``W += α·gᵀx``) and ``apply_update_if_finite_`` (the epilogue of a whole dW) check
    and write in one op on the native backend: the same bits as a plain ``addmm_`` / ``apply_update_`` where every
    checked tensor is finite and ``ok`` holds, the weight untouched otherwise, and the flag they gated on returned,
    on every chunked backend; ``apply_update_if_finite_`` on the Triton backend too (its interpreter: these are CPU
    tensors), whose flag kernel starts from ``ok``."""
    use_checked, use_ok = GATES[gate]
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(13, 7, generator=gen).to(dtype)
    g, x = torch.randn(9, 13, generator=gen).to(dtype), torch.randn(9, 7, generator=gen).to(dtype)
    also = torch.randn(13, generator=gen)
    grad = (g.float().t() @ x.float()).to(dtype)
    if bad in ("g", "x", "also"):
        {"g": g, "x": x, "also": also}[bad][3].fill_(float("nan"))
    checked = (g, x, also) if use_checked else ()
    ok = torch.tensor(bad != "ok") if use_ok else None
    expected_flag = bad == "none"
    for name in _chunked_backends() + (["triton"] if DEVICE == "cpu" else []):
        backend = backend_named(name, monkeypatch)
        if name != "triton" and dtype != torch.float16 and bad not in ("g", "x"):  # the CPU addmm_ path (fp32/bf16)
            w = weight.clone()
            flag = backend.addmm_if_finite_(w, g, x, -0.25, checked, ok)
            assert flag.shape == () and bool(flag) is expected_flag, name
            reference = weight.clone().addmm_(g.t(), x, alpha=-0.25) if expected_flag else weight
            assert torch.equal(bits_of(w), bits_of(reference)), name
        p = weight.clone()
        flag = backend.apply_update_if_finite_(p, grad, 0.25, True, Rounding.NEAREST, seed=7, offset=3,
                                               checked=checked, ok=ok)
        assert flag.shape == () and bool(flag) is expected_flag, name
        reference = weight.clone()
        if expected_flag:
            backend.apply_update_(reference, grad, 0.25, True, Rounding.NEAREST, seed=7, offset=3)
        assert torch.equal(bits_of(p), bits_of(reference)), name


def test_with_nothing_to_gate_on_the_write_is_ungated_as_update_weight_has_always_made_it(monkeypatch):
    """``update_weight_(check=False)`` without ``ok``: every path writes, ungated, and returns no flag."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(13, 7, generator=gen)
    g, x = torch.randn(9, 13, generator=gen), torch.randn(9, 7, generator=gen)
    for name in _chunked_backends():
        backend = backend_named(name, monkeypatch)
        w = weight.clone()
        assert backend.addmm_if_finite_(w, g, x, -0.25) is None
        assert torch.equal(w, weight.clone().addmm_(g.t(), x, alpha=-0.25)), name
        for sign in (False, True):  # SIGN: the one-chunk path of update_weight_
            w, reference = weight.clone(), weight.clone()
            assert backend.update_weight_(w, g, x, 0.25, sign, Rounding.NEAREST, seed=7, check=False) is None
            if sign:
                backend.apply_update_(reference, g.t() @ x, 0.25, True, Rounding.NEAREST, seed=7)
            else:
                reference.addmm_(g.t(), x, alpha=-0.25)
            assert torch.equal(w, reference), (name, sign)


def test_the_native_check_refuses_other_dtypes_with_the_remedy(monkeypatch):
    if "native" not in _chunked_backends():
        pytest.skip("the native backend serves CPU tensors only")
    backend = backend_named("native", monkeypatch)
    g = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16 \\(cast them first\\), got Double"):
        backend.addmm_if_finite_(torch.zeros(3, 2, dtype=torch.float64), g, torch.ones(4, 2, dtype=torch.float64),
                                 1.0, (g,))
