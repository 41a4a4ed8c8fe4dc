"""The fused embedding against nn.Embedding's autograd and a float64 row-sparse update, for every Role × dtype ×
backend; the on-the-fly roles never allocate a vocab-sized buffer."""

import pytest
import torch
import torch.nn.functional as F

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan
from bread_kernels.bench.memory import trace_allocations
from bread_kernels.functions import fused_embedding
from tests.conftest import DTYPES

VOCAB, HIDDEN = 61, 19
STEP = 0.05


def make_inputs(dtype, device, padding_idx, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(dtype).to(device)
    ids = torch.randint(0, VOCAB // 3, (3, 29), generator=gen)  # few distinct ids: many repeats
    ids[0, :4] = padding_idx if padding_idx is not None else 5
    grad_out = torch.randn(3, 29, HIDDEN, generator=gen).to(dtype).to(device)
    return weight, ids.to(device), grad_out


def float64_dense_grad(ids, grad_out, padding_idx):
    dw = torch.zeros(VOCAB, HIDDEN, dtype=torch.float64, device=grad_out.device)
    dw.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, HIDDEN).double())
    if padding_idx is not None:
        dw[padding_idx] = 0
    return dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding_idx", [None, 2], ids=["nopad", "pad"])
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_on_the_fly_update_matches_float64(backend, device, dtype, padding_idx, role):
    weight, ids, grad_out = make_inputs(dtype, device, padding_idx)
    dw = float64_dense_grad(ids, grad_out, padding_idx)
    touched = dw.abs().sum(1) > 0
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    expected = weight.double() - STEP * f(dw)  # rows without a gradient: sign(0) = 0, unchanged
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP, rounding=Rounding.NEAREST), name="emb")

    y = fused_embedding(ids, weight, plan, padding_idx)
    torch.testing.assert_close(y, F.embedding(ids, weight, padding_idx))
    y.backward(grad_out)

    assert weight.grad is None
    if dtype == torch.float32:
        torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the fp32 result to the weight's dtype: within half an ulp, plus fp32 summation
        eps = torch.finfo(dtype).eps
        assert ((weight.double() - expected).abs() <= 0.51 * eps * expected.abs() + 1e-6).all()
    assert torch.equal(weight[~touched].cpu(), make_inputs(dtype, device, padding_idx)[0][~touched].cpu()), (
        "rows that no token (or only the padding id) used must not change")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_active_role_gives_nn_embedding_gradient(backend, device, dtype):
    """dW like nn.Embedding's (padding row zero), accumulating into .grad; checked against float64 (torch's own
    low-precision embedding backward accumulates in the weight's dtype, so it is not the reference here)."""
    weight, ids, grad_out = make_inputs(dtype, device, padding_idx=2)
    reference = weight.clone().requires_grad_(True)
    F.embedding(ids, reference, 2).backward(grad_out)
    weight.requires_grad_(True)
    fused_embedding(ids, weight, WeightPlan(Role.ACTIVE), 2).backward(grad_out)
    assert weight.grad.dtype == reference.grad.dtype and weight.grad.shape == reference.grad.shape
    fused_embedding(ids, weight, WeightPlan(Role.ACTIVE), 2).backward(grad_out)  # accumulates like autograd
    expected = 2 * float64_dense_grad(ids, grad_out, 2)
    if dtype == torch.float32:
        torch.testing.assert_close(weight.grad.double(), expected, rtol=1e-6, atol=1e-6)
    else:  # each backward's rows rounded once to the dtype, then the two summed in the dtype: ≤ 1.5 ulp
        eps = torch.finfo(dtype).eps
        assert ((weight.grad.double() - expected).abs() <= 1.5 * eps * expected.abs() + 1e-6).all()


@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_int32_ids_train_as_int64_ids_do(device, role):
    """int32 token ids, which nn.Embedding takes: the same gradient or update as int64 ids (the backward's rows
    reach ``index_copy_``, which takes int64 indices only)."""
    weights = []
    for dtype in (torch.int64, torch.int32):
        weight, ids, grad_out = make_inputs(torch.float32, device, padding_idx=2)
        weight.requires_grad_(role is Role.ACTIVE)
        plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP) if role.updates_on_the_fly else None)
        fused_embedding(ids.to(dtype), weight, plan, 2).backward(grad_out)
        weights.append(weight.grad if role is Role.ACTIVE else weight.detach())
    assert torch.equal(weights[1], weights[0])
    if role.updates_on_the_fly:
        assert not torch.equal(weights[1], make_inputs(torch.float32, device, padding_idx=2)[0])


def test_frozen_role_leaves_the_weight_alone(backend, device):
    weight, ids, grad_out = make_inputs(torch.float32, device, None)
    before = weight.clone()
    y = fused_embedding(ids, weight, WeightPlan(Role.FROZEN))
    assert not y.requires_grad and torch.equal(weight, before)


def test_non_finite_gradient_skips_the_update(backend, device):
    weight, ids, grad_out = make_inputs(torch.float32, device, None)
    before = weight.clone()
    grad_out[1, 3, 0] = float("nan")
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP), name="emb")
    with pytest.warns(RuntimeWarning, match="skipped the on-the-fly SGD update of emb"):
        fused_embedding(ids, weight, plan).backward(grad_out)
    assert torch.equal(weight, before) and plan.skipped_updates == 1


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_no_vocab_sized_buffer(backend, device, role):
    """The update's memory scales with the tokens (distinct rows), not with the vocabulary."""
    vocab, hidden, tokens = 8192, 64, 40
    weight = torch.randn(vocab, hidden).to(device)
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    g = torch.randn(tokens, hidden).to(device)
    y = fused_embedding(ids, weight, WeightPlan(role, OnTheFlyUpdate(lr=1e-3)))
    trace = trace_allocations(lambda: y.backward(g), device)
    table_bytes = vocab * hidden * 4
    assert trace.peak_bytes <= 8 * tokens * hidden * 4 + 16 * tokens * 8, (
        f"peak {trace.peak_bytes} B for {tokens} tokens (the table is {table_bytes} B)")


def test_bad_inputs_are_refused(device):
    weight, ids, _ = make_inputs(torch.float32, device, None)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP))
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        fused_embedding(ids.float(), weight, plan)
    with pytest.raises(TypeError, match="2-D float32/bfloat16/float16"):
        fused_embedding(ids, weight.double(), plan)
