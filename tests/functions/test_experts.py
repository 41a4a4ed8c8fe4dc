"""The fused experts against transformers' eager experts under plain autograd, and a float64 hand-written update,
for every Role × dtype × backend; the RNG offsets of the per-expert slices; no [E, ·, ·] gradient under SGD/SIGN."""

import copy
import math

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan
from bread_kernels.functions.experts import experts_gate, experts_layout_problem, fused_experts
from bread_kernels.update import update_dense_

E, H, I, TOKENS, K = 6, 19, 11, 23, 2  # odd sizes; the routing below never picks expert E - 1
EMPTY = E - 1
STEP = 0.05
LOW = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}  # bf16 against float64: a few bf16 ulps of the chain rule


def experts_module(dtype, device, seed=0, act="silu"):
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                         num_experts_per_tok=K, hidden_act=act)
    config._experts_implementation = "eager"
    module = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) / math.sqrt(H))
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) / math.sqrt(I))
    return module.to(device=device, dtype=dtype)


def routing(dtype, device, seed=1, tokens=TOKENS):
    """Top-2 ids over experts 0..E-2 (expert E-1 receives no token), distinct per token, and positive weights."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, E - 1, (tokens,), generator=gen)
    second = (first + torch.randint(1, E - 1, (tokens,), generator=gen)) % (E - 1)
    index = torch.stack([first, second], 1)
    weights = torch.rand(tokens, K, generator=gen) + 0.1
    return index.to(device), weights.to(dtype=dtype, device=device)


def inputs(dtype, device, seed=2, tokens=TOKENS):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).to(dtype=dtype, device=device)
    grad = torch.randn(tokens, H, generator=gen).to(dtype=dtype, device=device)
    return x, grad


def autograd_reference(module, x, index, weights, grad, dtype=None):
    """(y, dx, d routing weights, dW₁, dW₂) of transformers' eager experts under plain autograd (in ``dtype``)."""
    module = copy.deepcopy(module).to(dtype or x.dtype)
    x = x.detach().to(module.down_proj.dtype).requires_grad_(True)
    weights = weights.detach().to(torch.float64 if dtype == torch.float64 else weights.dtype).requires_grad_(True)
    y = module(x, index, weights)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, weights.grad, module.gate_up_proj.grad, module.down_proj.grad


def plan(role, name):
    if role is None:
        return None
    update = OnTheFlyUpdate(lr=STEP / 2, scale=2.0) if role.updates_on_the_fly else None
    return WeightPlan(role, update, name=name)


def run_fused(module, x, index, weights, grad, roles):
    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    plans = (plan(roles[0], "gate_up_proj"), plan(roles[1], "down_proj"))
    for weight, role in zip((module.gate_up_proj, module.down_proj), roles):
        weight.requires_grad_(role is None or role is Role.ACTIVE)
    y = fused_experts(x, index, weights, module.gate_up_proj, module.down_proj, plans, experts_gate(module))
    y.backward(grad)
    return y.detach(), x.grad, weights.grad, plans


def test_the_zoo_experts_modules_are_recognised():
    assert experts_layout_problem(experts_module(torch.float32, "cpu")) is None
    odd = torch.nn.Module()
    odd.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 6, 4))
    odd.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 5))
    odd.act_fn = torch.nn.SiLU()
    assert "are not [E, 2I, H]" in experts_layout_problem(odd)
    odd.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 3))
    odd.is_transposed = True
    assert "is_transposed=True" in experts_layout_problem(odd)


@pytest.fixture
def single_thread():
    """Bit-for-bit comparisons on one CPU thread: with several, BLAS and the vectorised activations may round a
    slice of a buffer (this function's slots) differently from a fresh tensor of the same values (transformers'),
    by an ulp — the maths is the same, the memory layout is not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("roles", [(Role.ACTIVE, Role.ACTIVE), (None, Role.ACTIVE), (Role.ACTIVE, Role.FROZEN)],
                         ids=["active", "none-active", "active-frozen"])
def test_forward_and_gradients_match_autograd(device, dtype, roles, single_thread):
    """ACTIVE (and no plan) return autograd's dense gradient, zero for the expert without a token; FROZEN none.
    fp32: bit for bit (the same ops) on one thread; bf16: against float64 autograd at a bf16 tolerance."""
    module = experts_module(dtype, device)
    index, weights = routing(dtype, device)
    x, grad = inputs(dtype, device)
    y, dx, dr, *_ = run_fused(module, x, index, weights, grad, roles)
    ref = autograd_reference(module, x, index, weights, grad, dtype=None if dtype == torch.float32 else torch.float64)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else LOW[dtype]
    for what, actual, expected in (("y", y, ref[0]), ("dx", dx, ref[1]), ("d routing", dr, ref[2])):
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")
    for weight, role, expected in zip((module.gate_up_proj, module.down_proj), roles, ref[3:]):
        if role is Role.FROZEN:
            assert weight.grad is None
            continue
        torch.testing.assert_close(weight.grad.double(), expected.double(), **tol)
        assert torch.count_nonzero(weight.grad[EMPTY]) == 0


def float64_updated(module, x, index, weights, grad, roles):
    """W − step·f(dW) in float64, with dW from autograd in the weights' dtype (fp32: in float64) — the gradient the
    reference's hook reads; the expert without a token keeps its value.  Also dx and the routing weights' gradient
    from float64 autograd."""
    _, dx, dr, d1, d2 = autograd_reference(module, x, index, weights, grad, dtype=torch.float64)
    if x.dtype != torch.float32:
        _, _, _, d1, d2 = autograd_reference(module, x, index, weights, grad)
        d1, d2 = d1.double(), d2.double()
    expected = []
    for weight, role, dw in zip((module.gate_up_proj, module.down_proj), roles, (d1, d2)):
        f = torch.sign if role is Role.SIGN else (lambda t: t)
        w = weight.detach().double()
        expected.append((w - STEP * f(dw), dw) if role.updates_on_the_fly else (w, dw))
    return expected, dx, dr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("roles", [(Role.SGD, Role.SIGN), (Role.SIGN, Role.SGD), (Role.FROZEN, Role.SGD)],
                         ids=["sgd-sign", "sign-sgd", "frozen-sgd"])
def test_on_the_fly_roles_update_each_routed_expert(backend, device, dtype, roles):
    module = experts_module(dtype, device)
    index, weights = routing(dtype, device)
    x, grad = inputs(dtype, device)
    before = [module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()]
    expected, ref_dx, ref_dr = float64_updated(module, x, index, weights, grad, roles)
    _, dx, dr, plans = run_fused(module, x, index, weights, grad, roles)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else LOW[dtype]
    torch.testing.assert_close(dx.double(), ref_dx, **tol)  # from the weights before the update
    torch.testing.assert_close(dr.double(), ref_dr, **tol)
    eps = torch.finfo(dtype).eps
    for weight, old, role, (new, dw) in zip((module.gate_up_proj, module.down_proj), before, roles, expected):
        assert weight.grad is None
        assert torch.equal(weight.detach()[EMPTY], old[EMPTY]), "the expert without a token was written"
        actual = weight.detach().double()
        if dtype == torch.float32:
            bound = 1e-5 + 1e-5 * new.abs() + STEP * dw.abs() * 1e-5
        else:  # one ulp of the result (stochastic rounding) plus the rounding of dW to bf16 (the CPU GEMM)
            bound = 1.01 * eps * new.abs() + STEP * dw.abs() * eps + 1e-6
        ok = (actual - new).abs() <= bound
        if role is Role.SIGN:  # a dW within rounding of 0 may take either sign
            ok |= dw.abs() <= 1e-3 * dw.abs().max()
        assert ok.all(), f"{role.name}: {(~ok).sum().item()} of {ok.numel()} elements off"
    assert all(p is None or p.skipped_updates == 0 for p in plans)


def test_stochastic_rounding_draws_the_bits_of_the_whole_parameter(backend, device):
    """bf16 SGD with stochastic rounding: the per-expert updates equal, bit for bit, ``update_dense_`` of the whole
    [E, N, K] gradient with the same seed — every element draws the bits of its index in the whole parameter
    (offset e·N·K), and the expert without a token stays as it is.  Small integer operands make every dW exact in
    bf16 and fp32, so the backends' GEMMs agree exactly."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(E, 2 * I, H, generator=gen).to(torch.bfloat16).to(device)
    dense = weight.clone()
    contributions, grad = {}, torch.zeros(E, 2 * I, H, dtype=torch.float64)
    for e in range(E - 1):
        g = torch.randint(-2, 3, (3 + e, 2 * I), generator=gen).to(torch.bfloat16)
        x = torch.randint(-2, 3, (3 + e, H), generator=gen).to(torch.bfloat16)
        contributions[e] = [(g.to(device), x.to(device))]
        grad[e] = g.double().t() @ x.double()
    from bread_kernels.update import update_experts_

    fused_plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.013, rounding=Rounding.STOCHASTIC, seed=7), name="w")
    dense_plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.013, rounding=Rounding.STOCHASTIC, seed=7), name="w")
    assert update_experts_(fused_plan, Role.SGD, weight, contributions)
    assert update_dense_(dense_plan, dense, grad.float().to(device))
    assert torch.equal(weight, dense)
    assert fused_plan.update.draws == dense_plan.update.draws == 1


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_a_weight_used_twice_gets_one_update_for_its_summed_gradient(role):
    module = experts_module(torch.float32, "cpu")
    index, weights = routing(torch.float32, "cpu")
    x, grad = inputs(torch.float32, "cpu")
    x2, grad2 = inputs(torch.float32, "cpu", seed=4)
    ref = copy.deepcopy(module)
    (ref(x, index, weights) + ref(x2, index.flip(1), weights)).backward(grad)
    plans = (plan(role, "gate_up_proj"), plan(role, "down_proj"))
    for w in (module.gate_up_proj, module.down_proj):
        w.requires_grad_(False)
    args = (module.gate_up_proj, module.down_proj, plans, experts_gate(module))
    y = fused_experts(x.requires_grad_(), index, weights, *args) + \
        fused_experts(x2.requires_grad_(), index.flip(1), weights, *args)
    y.backward(grad)
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    for weight, ref_weight in zip((module.gate_up_proj, module.down_proj), (ref.gate_up_proj, ref.down_proj)):
        torch.testing.assert_close(weight, ref_weight.detach() - STEP * f(ref_weight.grad), rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_skips_the_whole_parameter():
    module = experts_module(torch.float32, "cpu")
    index, weights = routing(torch.float32, "cpu")
    x, grad = inputs(torch.float32, "cpu")
    grad[3, 4] = float("nan")
    before = module.down_proj.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped the on-the-fly SGD update of down_proj"):
        _, _, _, plans = run_fused(module, x, index, weights, grad, (Role.FROZEN, Role.SGD))
    assert torch.equal(module.down_proj.detach(), before)
    assert plans[1].skipped_updates == 1 and plans[1].update.draws == 1  # a skipped update consumes its seed


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("rounding", [Rounding.NEAREST, Rounding.STOCHASTIC], ids=lambda r: r.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_expert_sized_gradient_exists_under_sgd_and_sign(dtype, rounding):
    """During the backward no aten op returns a tensor of an expert weight's [E, ·, ·] shape under SGD/SIGN (under
    ACTIVE it does: the detector sees the dense gradient)."""
    module = experts_module(dtype, "cpu")
    index, weights = routing(dtype, "cpu")
    x, grad = inputs(dtype, "cpu")
    full = {tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape)}
    for roles, expect_full in (((Role.SGD, Role.SIGN), False), ((Role.SIGN, Role.SGD), False),
                               ((Role.ACTIVE, Role.ACTIVE), True)):
        plans = tuple(WeightPlan(r, OnTheFlyUpdate(lr=STEP, rounding=rounding) if r.updates_on_the_fly else None)
                      for r in roles)
        for w, r in zip((module.gate_up_proj, module.down_proj), roles):
            w.requires_grad_(r is Role.ACTIVE)
            w.grad = None
        xr = x.clone().requires_grad_(True)
        y = fused_experts(xr, index, weights, module.gate_up_proj, module.down_proj, plans, experts_gate(module))
        with _Shapes() as recorder:
            y.backward(grad)
        assert (bool(full & set(recorder.shapes))) is expect_full, (roles, full & set(recorder.shapes))


def test_tokens_routed_to_no_expert_and_an_empty_batch():
    """Every expert empty but one, and zero tokens: the output and gradients are autograd's."""
    module = experts_module(torch.float32, "cpu")
    x, grad = inputs(torch.float32, "cpu", tokens=1)
    index, weights = torch.tensor([[2, 4]]), torch.tensor([[0.7, 0.3]])
    y, dx, dr, _ = run_fused(module, x, index, weights, grad, (Role.ACTIVE, Role.ACTIVE))
    ref = autograd_reference(module, x, index, weights, grad)
    for actual, expected in zip((y, dx, dr), ref[:3]):
        torch.testing.assert_close(actual, expected)
    empty = fused_experts(torch.zeros(0, H, requires_grad=True), torch.zeros(0, K, dtype=torch.long),
                          torch.zeros(0, K), module.gate_up_proj, module.down_proj, (None, None), experts_gate(module))
    empty.sum().backward()
    assert empty.shape == (0, H)


def test_inputs_are_checked_with_clear_errors():
    module = experts_module(torch.float32, "cpu")
    index, weights = routing(torch.float32, "cpu")
    x, _ = inputs(torch.float32, "cpu")
    args = (module.gate_up_proj, module.down_proj)
    gate = experts_gate(module)
    with pytest.raises(ValueError, match=r"hidden_states must be \[tokens, hidden\]"):
        fused_experts(x[None], index, weights, *args, (None, None), gate)
    with pytest.raises(ValueError, match="top_k_weights .* must have top_k_index's shape"):
        fused_experts(x, index, weights[:, :1], *args, (None, None), gate)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        fused_experts(x.double().float().half(), index, weights, *args, (None, None), gate)
    with pytest.raises(ValueError, match="LoRA on expert weights is not supported"):
        fused_experts(x, index, weights, *args, (WeightPlan(Role.LORA), None), gate)
    module.down_proj.requires_grad_(False)
    with pytest.raises(ValueError, match="role ACTIVE but requires_grad=False"):
        fused_experts(x, index, weights, *args, (None, WeightPlan(Role.ACTIVE, name="down")), gate)


@pytest.mark.parametrize("chunks", ["one-chunk", "chunks"])
def test_an_fp16_expert_dw_that_overflows_skips_every_expert(chunks, monkeypatch):
    """Finite operands whose fp16 dW overflows for the last expert written (expert 2 of 0 and 2): the CPU backends
    decide before writing any expert, so expert 0 is not written either (one skip for the whole parameter)."""
    from bread_kernels.update import update_experts_

    if chunks == "chunks":
        monkeypatch.setenv("BREAD_CHUNK_BYTES", str(3 * 8 * 2))  # 3 of the 5 rows per chunk
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 8, generator=gen).to(torch.float16)
    before = weight.clone()
    g0, x0 = torch.randn(11, 5, generator=gen).half(), torch.randn(11, 8, generator=gen).half()
    g2, x2 = torch.full((40, 5), 60.0).half(), torch.full((40, 8), 60.0).half()  # 40 · 3600 > 65,504
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP), name="experts.down_proj")
    with pytest.warns(RuntimeWarning, match="experts.down_proj.*not finite"):
        update_experts_(plan, Role.SGD, weight, {0: [(g0, x0)], 2: [(g2, x2)]})
    assert torch.equal(weight, before)
    assert plan.skipped_updates == 1
    weight_ok = before.clone()
    update_experts_(plan, Role.SGD, weight_ok, {0: [(g0, x0)]})  # expert 0 alone is applied
    assert not torch.equal(weight_ok[0], before[0]) and torch.equal(weight_ok[1:], before[1:])
