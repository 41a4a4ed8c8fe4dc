"""The fused linear against plain autograd and a float64 hand-written update, for every Role × dtype × backend."""

import math

import pytest
import torch
import torch.nn.functional as F

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan, fused_linear
from tests.conftest import DTYPES

N_OUT, N_IN = 37, 53
TOKEN_SHAPES = {"2d": (87,), "3d": (3, 29)}
STEP = 0.05


def make_inputs(dtype, device, token_shape, bias, transposed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # stored [in, out] like GPT-2's Conv1D, used as a transposed view
        weight = torch.randn(N_IN, N_OUT, generator=gen).to(dtype).to(device).t()
    else:
        weight = torch.randn(N_OUT, N_IN, generator=gen).to(dtype).to(device)
    b = torch.randn(N_OUT, generator=gen).to(dtype).to(device) if bias else None
    x = torch.randn(*token_shape, N_IN, generator=gen).to(dtype).to(device)
    grad_out = torch.randn(*token_shape, N_OUT, generator=gen).to(dtype).to(device)
    return weight, b, x, grad_out


def float64_update(weight, bias, x, grad_out, role, step):
    """The reference: W − step·f(gᵀx) and b − step·f(Σg), all in float64."""
    g = grad_out.double().reshape(-1, N_OUT)
    dw = g.t() @ x.double().reshape(-1, N_IN)
    db = g.sum(0)
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    new_w = weight.double() - step * f(dw)
    new_b = bias.double() - step * f(db) if bias is not None else None
    return new_w, new_b, dw, db


def assert_update_close(actual, expected, grad, role, dtype):
    """fp32: tight.  bf16/fp16: within one ulp of the result (stochastic rounding moves by < 1 ulp) plus the
    rounding of dW to the weight's dtype (the CPU backends' GEMM output, like the reference's .grad)."""
    actual = actual.double()
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        tol = 1e-5 + 1e-5 * expected.abs() + STEP * grad.abs() * 1e-5
    else:
        tol = 1.01 * eps * expected.abs() + STEP * grad.abs() * eps + 1e-6
    ok = (actual - expected).abs() <= tol
    if role is Role.SIGN:  # sign of a dW within rounding error of 0 may legitimately go either way
        ok |= grad.abs() <= 1e-3 * grad.abs().max()
    assert ok.all(), (
        f"{(~ok).sum().item()} of {ok.numel()} elements off; worst |diff|={((actual - expected).abs() - tol).max():.3g}"
        " beyond tolerance"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_on_the_fly_update_matches_float64(backend, device, dtype, shape, bias, role):
    weight, b, x, grad_out = make_inputs(dtype, device, TOKEN_SHAPES[shape], bias)
    x.requires_grad_(True)
    expected_w, expected_b, dw, db = float64_update(weight, b, x, grad_out, role, STEP)
    expected_dx = (grad_out.double() @ weight.double())  # from the weight before the update
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP / 2, scale=2.0), name="w")

    y = fused_linear(x, weight, b, plan)
    torch.testing.assert_close(y, F.linear(x.detach(), weight, b))
    y.backward(grad_out)

    assert_update_close(weight, expected_w, dw, role, dtype)
    if bias:
        assert_update_close(b, expected_b, db, role, dtype)
    assert weight.grad is None and (b is None or b.grad is None)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), expected_dx, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_active_matches_autograd_and_accumulates(backend, device, dtype, shape, bias):
    weight, b, x, grad_out = make_inputs(dtype, device, TOKEN_SHAPES[shape], bias)
    ref_w, ref_b, ref_x = (t.clone().requires_grad_(True) if t is not None else None for t in (weight, b, x))
    weight.requires_grad_(True), x.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    plan = WeightPlan(Role.ACTIVE)
    for _ in range(2):  # the second backward accumulates into .grad, as autograd does
        fused_linear(x, weight, b, plan).backward(grad_out)
        F.linear(ref_x, ref_w, ref_b).backward(grad_out)
    torch.testing.assert_close(weight.grad, ref_w.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)
    if bias:
        torch.testing.assert_close(b.grad, ref_b.grad)
    # and against float64
    _, _, dw, _ = float64_update(weight.detach(), None, x.detach(), grad_out, Role.SGD, 0.0)
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(weight.grad.double(), 2 * dw, rtol=tol, atol=tol * dw.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_frozen_computes_only_dx(backend, device, dtype, bias):
    weight, b, x, grad_out = make_inputs(dtype, device, (3, 29), bias)
    before_w = weight.clone()
    weight.requires_grad_(True)  # even if it requires grad, FROZEN computes no dW
    x.requires_grad_(True)
    fused_linear(x, weight, b, WeightPlan(Role.FROZEN)).backward(grad_out)
    assert weight.grad is None
    assert torch.equal(weight.detach(), before_w)
    ref_x = x.detach().clone().requires_grad_(True)
    F.linear(ref_x, weight.detach(), b).backward(grad_out)
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_non_contiguous_weight_is_updated_in_its_storage(backend, device, dtype, role):
    weight, b, x, grad_out = make_inputs(dtype, device, (87,), True, transposed=True)
    storage = weight.t()  # the [in, out] tensor a Conv1D module owns
    expected_w, _, dw, _ = float64_update(weight, b, x, grad_out, role, STEP)
    fused_linear(x, weight, b, WeightPlan(role, OnTheFlyUpdate(lr=STEP))).backward(grad_out)
    assert_update_close(storage.t(), expected_w, dw, role, dtype)


def test_dx_is_not_computed_when_not_needed(backend, device):
    weight, b, x, grad_out = make_inputs(torch.float32, device, (87,), True)
    expected_w, _, dw, _ = float64_update(weight, b, x, grad_out, Role.SGD, STEP)
    y = fused_linear(x, weight, b, WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP)))
    assert y.requires_grad, "an SGD weight must run its backward even when nothing else requires grad"
    y.backward(grad_out)
    assert x.grad is None
    assert_update_close(weight, expected_w, dw, Role.SGD, torch.float32)


def test_lr_is_read_at_backward_time(backend, device):
    weight, _, x, grad_out = make_inputs(torch.float32, device, (87,), False)
    lr = {"value": 1.0}
    expected_w, _, dw, _ = float64_update(weight, None, x, grad_out, Role.SGD, STEP)
    y = fused_linear(x, weight, None, WeightPlan(Role.SGD, OnTheFlyUpdate(lr=lambda: lr["value"])))
    lr["value"] = STEP  # a scheduler stepped between forward and backward
    y.backward(grad_out)
    assert_update_close(weight, expected_w, dw, Role.SGD, torch.float32)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_weight_used_twice_gets_the_update_of_its_summed_gradient(backend, device, role):
    """Invariant 2 (sign of the *sum*), and invariant 1: both uses' dX come from the weight before the update."""
    weight, b, x, grad_out = make_inputs(torch.float32, device, (87,), True)
    x2 = torch.randn(87, N_IN, device=device)
    x.requires_grad_(True), x2.requires_grad_(True)
    ref_w, ref_b = weight.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref_x, ref_x2 = x.detach().clone().requires_grad_(True), x2.detach().clone().requires_grad_(True)

    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP))
    loss = (fused_linear(x, weight, b, plan) * grad_out).sum() + fused_linear(x2, weight, b, plan).square().sum()
    ref_loss = (F.linear(ref_x, ref_w, ref_b) * grad_out).sum() + F.linear(ref_x2, ref_w, ref_b).square().sum()
    loss.backward()
    ref_loss.backward()

    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(x2.grad, ref_x2.grad)
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    expected_w = ref_w.detach().double() - STEP * f(ref_w.grad.double())
    expected_b = ref_b.detach().double() - STEP * f(ref_b.grad.double())
    assert_update_close(weight, expected_w, ref_w.grad.double(), role, torch.float32)
    assert_update_close(b, expected_b, ref_b.grad.double(), role, torch.float32)


def test_dropped_graph_does_not_leave_a_pending_use(backend, device):
    weight, _, x, grad_out = make_inputs(torch.float32, device, (87,), False)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP))
    fused_linear(x, weight, None, plan)  # graph built and dropped without backward (an eval pass)
    with torch.no_grad():
        fused_linear(x, weight, None, plan)
    expected_w, _, dw, _ = float64_update(weight, None, x, grad_out, Role.SGD, STEP)
    fused_linear(x, weight, None, plan).backward(grad_out)
    assert_update_close(weight, expected_w, dw, Role.SGD, torch.float32)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_gradient_skips_the_update_and_reports(backend, device, role, bad):
    weight, b, x, grad_out = make_inputs(torch.float32, device, (87,), True)
    before_w, before_b = weight.clone(), b.clone()
    grad_out[5, 3] = bad
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP), name="layers.0.mlp")
    x.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="layers.0.mlp.*not finite"):
        fused_linear(x, weight, b, plan).backward(grad_out)
    assert torch.equal(weight, before_w) and torch.equal(b, before_b)
    assert plan.skipped_updates == 1


def _overflowing_inputs(device, dtype, row, scale):
    """Finite g and x whose dW overflows ``dtype`` at [row, 7] alone (87 tokens · scale²)."""
    weight, b, x, grad_out = make_inputs(dtype, device, (87,), False)
    x[:, 7], grad_out[:, row] = scale, scale
    return weight, x, grad_out


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN, "SGD-nearest"], ids=lambda r: getattr(r, "name", r))
@pytest.mark.parametrize("chunks", ["one-chunk", "chunks"])
def test_an_fp16_dw_that_overflows_from_finite_operands_never_reaches_the_weight(backend, device, role, chunks,
                                                                                monkeypatch):
    """g and x finite, dW = gᵀx past fp16's 65,504 in one element (a loss-scaled fp16 backward).  The CPU backends
    round dW to fp16, as autograd's .grad is: it is inf there, so the update is skipped and reported as a
    non-finite gradient — the whole weight, also where the overflowing row is in the last of several chunks (the
    earlier ones are not written first).  Before, the weight became -inf.  The Triton kernel keeps dW as an fp32
    sum and applies it."""
    if chunks == "chunks":  # at most 9 of the 37 rows per chunk (fewer where the backend counts temporaries)
        monkeypatch.setenv("BREAD_CHUNK_BYTES", str(9 * N_IN * 2))
    weight, x, grad_out = _overflowing_inputs(device, torch.float16, row=N_OUT - 1, scale=60.0)
    before = weight.clone()
    rounding = Rounding.NEAREST if role == "SGD-nearest" else Rounding.AUTO
    role = Role.SGD if role == "SGD-nearest" else role  # nearest: not BLAS's addmm_, which would apply it
    expected, _, dw, _ = float64_update(weight, None, x, grad_out, role, STEP)
    assert dw.abs().max() > 65504 and torch.isinf(dw.to(torch.float16)).sum() == 1
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP, rounding=rounding), name="layers.0.mlp")
    if backend == "triton":
        fused_linear(x.requires_grad_(True), weight, None, plan).backward(grad_out)
        assert plan.skipped_updates == 0
        assert_update_close(weight, expected, dw, role, torch.float16)
        return
    with pytest.warns(RuntimeWarning, match="layers.0.mlp.*not finite"):
        fused_linear(x.requires_grad_(True), weight, None, plan).backward(grad_out)
    assert torch.equal(weight, before)
    assert plan.skipped_updates == 1


@pytest.mark.parametrize("chunks", ["one-chunk", "chunks"])
def test_an_fp32_dw_past_its_range_skips_the_sign_update(backend, device, chunks, monkeypatch):
    """The same in fp32 (finite operands of 10²⁰): one chunk checks its dW, several chunks the bound
    M·max|g|·max|x| before the first write.  The Triton kernel's fp32 sum is inf there too; sign(±inf) is a
    finite step, so the weight stays finite."""
    if chunks == "chunks":
        monkeypatch.setenv("BREAD_CHUNK_BYTES", str(9 * N_IN * 4))
    weight, x, grad_out = _overflowing_inputs(device, torch.float32, row=N_OUT - 1, scale=1e20)
    before = weight.clone()
    plan = WeightPlan(Role.SIGN, OnTheFlyUpdate(lr=STEP), name="layers.0.mlp")
    if backend == "triton":
        fused_linear(x.requires_grad_(True), weight, None, plan).backward(grad_out)
        assert torch.isfinite(weight).all()
        return
    with pytest.warns(RuntimeWarning, match="layers.0.mlp.*not finite"):
        fused_linear(x.requires_grad_(True), weight, None, plan).backward(grad_out)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_same_seed_same_bits_and_steps_draw_fresh_bits(backend, device, dtype):
    weight, b, x, grad_out = make_inputs(dtype, device, (87,), True)
    results = []
    for _ in range(2):
        w, bb = weight.clone(), b.clone()
        plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=1e-3, rounding=Rounding.STOCHASTIC, seed=11))
        fused_linear(x, w, bb, plan).backward(grad_out)
        first = w.clone()
        fused_linear(x, w, bb, plan).backward(grad_out)
        results.append((first, w.clone(), bb.clone()))
    for a, c in zip(results[0], results[1]):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))
    # the second step drew other bits: it is not the first step's rounding applied twice
    step1 = results[0][0].double() - weight.double()
    step2 = results[0][1].double() - results[0][0].double()
    assert not torch.equal(step1, step2)


# -- bad input: clear errors before anything runs -------------------------------------------------------------------

def _weight(dtype=torch.float32):
    return torch.randn(N_OUT, N_IN, dtype=dtype)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(5, N_IN + 1), _weight(), None), ValueError, "in_features=53"),
        (lambda: (torch.randint(0, 3, (5, N_IN)), _weight(), None), TypeError, "int64.*float32, bfloat16"),
        (lambda: (torch.randn(5, N_IN), _weight().to(torch.int32), None), TypeError, "weight has dtype torch.int32"),
        (lambda: (torch.randn(5, N_IN), _weight(), torch.randn(N_OUT + 2)), ValueError, "bias has shape"),
        (lambda: (torch.randn(5, N_IN), _weight(torch.bfloat16), None), TypeError, "cast them to one dtype"),
        (lambda: (torch.randn(5, N_IN), _weight(), torch.randn(N_OUT, device="meta")), ValueError, "bias is on meta"),
        (lambda: (torch.randn(5, N_IN, device="meta"), _weight(), None), ValueError, "weight is on cpu"),
    ],
    ids=["shape", "int-input", "int-weight", "bias-shape", "dtype-mix", "bias-device", "weight-device"],
)
def test_bad_input_is_refused_with_a_clear_error(make, error, match):
    x, w, b = make()
    with pytest.raises(error, match=match):
        fused_linear(x, w, b, WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1)))


def test_on_the_fly_role_without_lr_is_refused():
    with pytest.raises(ValueError, match="needs an lr"):
        WeightPlan(Role.SIGN)
    plan = WeightPlan(Role.FROZEN)
    plan.role = Role.SGD  # changed after construction: caught when the linear runs
    with pytest.raises(ValueError, match="needs an lr"):
        fused_linear(torch.randn(3, N_IN), _weight(), None, plan)


def test_active_weight_without_requires_grad_is_refused():
    with pytest.raises(ValueError, match="requires_grad=False"):
        fused_linear(torch.randn(3, N_IN), _weight(), None, WeightPlan(Role.ACTIVE))


@pytest.mark.parametrize("role", [Role.FROZEN, Role.ACTIVE], ids=lambda r: r.name)
def test_roles_autograd_computes_run_its_linear_with_little_python(role):
    """Where autograd's own linear is the role's (a frozen weight, an active one), ``fused_linear`` hands the call to
    it after a handful of Python calls — no input checks, no ``torch.compiler.disable`` wrapper: on a GPU a small
    model's step is host-bound and a recomputed block runs every linear twice.  The values and the gradients are
    autograd's; a bad input still fails, with autograd's own error (as the unpatched layer's)."""
    import sys

    weight, b, x, grad_out = make_inputs(torch.float32, "cpu", (3, 29), bias=True)
    x.requires_grad_(True)
    weight.requires_grad_(role is Role.ACTIVE)
    plan = WeightPlan(role)
    calls = []

    def count(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_name)

    sys.setprofile(count)
    try:
        y = fused_linear(x, weight, b, plan)
    finally:
        sys.setprofile(None)
    assert len(calls) <= 7 and "check_linear_inputs" not in calls, calls
    expected = F.linear(x, weight, b)
    assert type(y.grad_fn) is type(expected.grad_fn) and torch.equal(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad_out), torch.autograd.grad(expected, x, grad_out),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        fused_linear(torch.randn(3, N_IN + 1), weight, None, plan)
    # what autograd's linear would take with another meaning, or fail on obscurely, still gets the fused path's errors
    with pytest.raises(ValueError, match="weight must be 2-D"):
        fused_linear(x, weight[0], None, plan)
    with pytest.raises(TypeError, match="bias must be a tensor"):
        fused_linear(x, weight, 1.0, plan)


def test_bad_lr_is_refused_at_backward_and_weight_is_untouched():
    w = _weight()
    before = w.clone()
    y = fused_linear(torch.randn(3, N_IN), w, None, WeightPlan(Role.SGD, OnTheFlyUpdate(lr=lambda: float("nan"))))
    with pytest.raises(ValueError, match="lr·scale must be finite"):
        y.sum().backward()
    assert torch.equal(w, before)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.name)
def test_only_roles_that_need_dw_save_the_input(role):
    """dX needs only W: a FROZEN (or LORA base) weight's linear must not keep its input alive, like nn.Linear with a
    frozen weight."""
    weight, b, x, _ = make_inputs(torch.float32, "cpu", (3, 29), bias=True)
    x.requires_grad_(True)
    weight.requires_grad_(role is Role.ACTIVE)
    update = OnTheFlyUpdate(lr=STEP) if role.updates_on_the_fly else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_linear(x, weight, b, WeightPlan(role, update))
    keeps_x = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)  # x or a view
    assert keeps_x == (role in (Role.ACTIVE, Role.SGD, Role.SIGN))


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_recompute_defers_the_output_and_fills_it_when_apply_returns(device, shape):
    """Inside a recompute the forward returns a placeholder and ``fused_linear`` computes it before returning, bit
    for bit the forward's output; the recompute does not register a second use of an on-the-fly weight."""
    from bread_kernels.functions.recompute import Recomputing

    weight, b, x, _ = make_inputs(torch.float32, device, TOKEN_SHAPES[shape], True)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1), name="w")
    computed = []

    class Counting(torch.autograd.Function):  # sees the output the fused function hands back
        @staticmethod
        def forward(ctx, y):
            computed.append(y.untyped_storage().nbytes())
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    with Recomputing():
        y = Counting.apply(fused_linear(x, weight.clone().requires_grad_(), b, plan))
    assert computed == [y.numel() * y.element_size()]  # a real output, not the one-element placeholder
    assert torch.equal(y, F.linear(x, weight, b))
    # the recomputed graph (still alive in ``y``) holds no use: the real use's backward applies the update
    w = weight.clone().requires_grad_()
    g = torch.randn(*TOKEN_SHAPES[shape], N_OUT, device=device)
    fused_linear(x, w, None, plan).backward(g)
    expected = weight.double() - 0.1 * g.reshape(-1, N_OUT).double().t() @ x.reshape(-1, N_IN).double()
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-5)
    del y



@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN, Role.FROZEN], ids=lambda r: r.name)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_output_may_be_modified_in_place(backend, device, role, shape):
    """A model may add into a layer's output in place, as into ``nn.Linear``'s (Falcon's ``mlp_output +=
    attention_output``): the fused output is no view made inside the Function, which autograd would refuse, and the
    backward is plain autograd's through ``F.linear`` and the add, with the update of the role."""
    weight, b, x, grad_out = make_inputs(torch.float32, device, TOKEN_SHAPES[shape], True)
    residual = torch.randn(*TOKEN_SHAPES[shape], N_OUT, generator=torch.Generator().manual_seed(9)).to(device)
    expected_w, expected_b, dw, db = float64_update(weight, b, x, grad_out, role, STEP)
    ref_x = x.clone().requires_grad_(True)
    expected_y = F.linear(ref_x, weight.clone(), b.clone())
    expected_y += residual
    expected_y.backward(grad_out)
    x.requires_grad_(True)
    if role is Role.FROZEN:
        weight.requires_grad_(True)  # the Function serves a frozen weight that requires grad
        expected_w, expected_b = weight.detach().double(), b.double()
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP) if role.updates_on_the_fly else None, name="w")

    y = fused_linear(x, weight, b, plan)
    y += residual
    torch.testing.assert_close(y, expected_y)
    y.backward(grad_out)

    torch.testing.assert_close(x.grad, ref_x.grad)
    assert_update_close(weight.detach(), expected_w, dw, role, torch.float32)
    assert_update_close(b, expected_b, db, role, torch.float32)
