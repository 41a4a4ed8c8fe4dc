"""Liger-Kernel's fused linear cross-entropy behind the Triton backend (CUDA tensors on a GPU host, CPU tensors
under ``TRITON_INTERPRET=1`` elsewhere): the
installed liger-kernel is one this library drives (its internal chunk loop's version and keywords: this fails
loudly when they change), the fused head+loss it serves matches plain autograd for a frozen, an active and a
dW-in-forward on-the-fly head, its blocks of logits keep to the budget, and where it cannot serve the fused loss
says so once and runs its own loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bread_kernels import OnTheFlyUpdate, Role, WeightPlan
from bread_kernels.backends import liger
from bread_kernels.functions.head_loss import fused_head_loss
from tests.conftest import DEVICE

TOKENS, HIDDEN, VOCAB = 29, 16, 97
GAMMA, LR, SCALE = 3.0, 0.1, 0.5


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "triton")


def _serve_counted(monkeypatch, forward) -> list:
    """``forward`` in place of Liger's chunk loop, each call's keywords recorded in the returned list."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(liger, "_forward", lambda: (counted, None))
    return calls


@pytest.fixture
def liger_calls(monkeypatch):
    """Counts the calls into Liger's chunk loop (so a test knows Liger, not the torch loop, served)."""
    forward, reason = liger._forward()
    assert reason is None, reason
    return _serve_counted(monkeypatch, forward)


def test_installed_liger_is_the_tested_one():
    """The test extra pins liger-kernel; if its internal loop changes (keywords, return values) this fails."""
    assert liger.unavailable_reason() is None
    forward, _ = liger._forward()
    h, w = torch.randn(5, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE)
    out = forward(h, w, torch.tensor([1, -1, 3, 10, 0], device=DEVICE), ignore_index=-1, reduction="sum", accum_dtype=torch.float32,
                  compute_gradients=True, weight_requires_grad=True, chunk_mem_const=1)
    assert isinstance(out, tuple) and len(out) == liger._RETURNS


def make(bias: bool, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype=dtype, device=DEVICE)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype=dtype, device=DEVICE)
    b = torch.randn(VOCAB, generator=gen).to(dtype=dtype, device=DEVICE) if bias else None
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    targets[::4] = -100
    return hidden, weight, b, targets.to(DEVICE)


def reference(hidden, weight, bias, targets, softcap=None, num_items=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    z = F.linear(h, w, b)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    loss = F.cross_entropy(z.float(), targets, reduction="sum" if num_items else "mean")
    loss = loss / num_items if num_items else loss
    (GAMMA * loss).backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def close(actual, expected, what, rtol=1e-5, atol=1e-6):
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} differ, max |diff| {diff.max():.3g}"


#: Liger's soft-capping calls libdevice's tanh, which Triton 3.9's interpreter cannot run: on a GPU only
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "Liger's soft-capping (libdevice tanh) does not run under TRITON_INTERPRET; the fused loss's own soft-capping "
    "is tested in tests/functions/test_head_loss.py, and the backend's soft-capping glue with Liger's loop in plain "
    "autograd in test_soft_capping_reaches_liger_and_its_results_serve_every_role"))
PLAIN = pytest.param(None, False, None, id="plain")
SOFTCAP_BIAS = pytest.param(3.0, True, None, id="softcap-bias", marks=GPU_ONLY)
BIAS_NUM_ITEMS = pytest.param(None, True, 40, id="bias-num-items")
SOFTCAP_NUM_ITEMS = pytest.param(3.0, False, torch.tensor(23), id="softcap-num-items-tensor", marks=GPU_ONLY)
BIAS_NUM_ITEMS_TENSOR = pytest.param(None, True, torch.tensor(23), id="bias-num-items-tensor")


def _check_frozen_and_active(calls, softcap, bias, num_items):
    hidden, weight, b, targets = make(bias)
    loss_ref, dh_ref, dw_ref, db_ref = reference(hidden, weight, b, targets, softcap, num_items)
    for plan in (None, WeightPlan(Role.ACTIVE, name="head")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        bb = b.clone().requires_grad_() if b is not None else None
        loss = fused_head_loss(h, w, bb, targets, plan, num_items_in_batch=num_items, softcap=softcap)
        close(loss, loss_ref, "loss")
        (GAMMA * loss).backward()
        close(h.grad, dh_ref, "dh")
        close(w.grad, dw_ref, "dW")
        if b is not None:
            close(bb.grad, db_ref, "db")
    h = hidden.clone().requires_grad_()
    loss = fused_head_loss(h, weight, b, targets, WeightPlan(Role.FROZEN), num_items_in_batch=num_items,
                           softcap=softcap)
    (GAMMA * loss).backward()
    close(h.grad, dh_ref, "dh (frozen head)")
    assert len(calls) == 3
    assert [c["weight_requires_grad"] for c in calls] == [True, True, False]  # a frozen head builds no dW


def _check_on_the_fly(calls, role, softcap, bias, num_items):
    """A head whose dW fits the budget: Liger builds dW in the forward, the backward hands γ/n·dW to the update."""
    hidden, weight, b, targets = make(bias, seed=1)
    _, dh_ref, dw_ref, db_ref = reference(hidden, weight, b, targets, softcap, num_items)
    lr = [1.0]
    plan = WeightPlan(role, OnTheFlyUpdate(lr=lambda: lr[0], scale=SCALE), name="lm_head")
    h, w = hidden.clone().requires_grad_(), weight.clone()
    bb = b.clone() if b is not None else None
    loss = fused_head_loss(h, w, bb, targets, plan, num_items_in_batch=num_items, softcap=softcap)
    assert torch.equal(w, weight)
    lr[0] = LR
    (GAMMA * loss).backward()
    assert len(calls) == 1
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    keep = dw_ref.abs() > 1e-6 * dw_ref.abs().max() if role is Role.SIGN else torch.ones_like(w, dtype=torch.bool)
    close(h.grad, dh_ref, "dh (from W before its update)")
    close(w[keep], (weight - LR * SCALE * f(dw_ref))[keep], "W after the update")
    if b is not None:
        close(bb, b - LR * SCALE * f(db_ref), "b after the update")


@pytest.mark.parametrize("softcap, bias, num_items", [PLAIN, SOFTCAP_BIAS, BIAS_NUM_ITEMS, SOFTCAP_NUM_ITEMS])
def test_frozen_and_active_head_through_liger(triton_backend, liger_calls, softcap, bias, num_items):
    _check_frozen_and_active(liger_calls, softcap, bias, num_items)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=["sgd", "sign"])
@pytest.mark.parametrize("softcap, bias, num_items", [SOFTCAP_BIAS, BIAS_NUM_ITEMS, BIAS_NUM_ITEMS_TENSOR])
def test_on_the_fly_head_takes_liger_dw(triton_backend, liger_calls, role, softcap, bias, num_items):
    _check_on_the_fly(liger_calls, role, softcap, bias, num_items)


def _liger_loop_in_torch(hidden, weight, targets, *, ce_weight, bias, ignore_index, reduction, softcap, accum_dtype,
                         compute_gradients, weight_requires_grad, chunk_mem_const):
    """Liger's chunk loop's contract (the summed loss and its gradients, 7 values) in plain autograd: stands in for
    the kernel where Triton's interpreter cannot run it (soft-capping's libdevice tanh)."""
    assert ce_weight is None and reduction == "sum" and accum_dtype == torch.float32 and chunk_mem_const >= 1
    with torch.enable_grad():  # called inside the fused loss's autograd.Function
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        b = bias.detach().requires_grad_() if bias is not None else None
        z = F.linear(h, w, b)
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        loss = F.cross_entropy(z.float(), targets, ignore_index=ignore_index, reduction="sum")
        if not compute_gradients:
            return loss.detach(), None, None, None, None, None, None
        dh, dw, *db = torch.autograd.grad(loss, [h, w, *([b] if b is not None else [])])
    return (loss.detach(), None, None, None, dh, dw if weight_requires_grad else None,
            db[0] if b is not None else None)


@pytest.fixture
def liger_loop_in_torch(monkeypatch):
    return _serve_counted(monkeypatch, _liger_loop_in_torch)


@pytest.mark.parametrize("softcap, bias, num_items", [(3.0, True, None), (3.0, False, torch.tensor(23))],
                         ids=["softcap-bias", "softcap-num-items-tensor"])
def test_soft_capping_reaches_liger_and_its_results_serve_every_role(triton_backend, liger_loop_in_torch, softcap,
                                                                     bias, num_items):
    """The soft-capping cases the interpreter cannot run through Liger's kernel (GPU_ONLY above), on the CPU: with
    Liger's loop in plain autograd, the backend's glue — the soft-capping and the bias handed to Liger, its summed
    results scaled by γ/n, dW taken for the active and the on-the-fly heads — gives autograd's loss, gradients and
    updates."""
    _check_frozen_and_active(liger_loop_in_torch, softcap, bias, num_items)
    assert all(c["softcap"] == softcap and (c["bias"] is not None) == bias for c in liger_loop_in_torch)
    for role in (Role.SGD, Role.SIGN):
        liger_loop_in_torch.clear()
        _check_on_the_fly(liger_loop_in_torch, role, softcap, bias, num_items)
        assert liger_loop_in_torch[0]["softcap"] == softcap


@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD], ids=["active", "sgd"])
def test_an_all_ignored_batch_through_liger_gives_zero_gradients(triton_backend, liger_calls, role):
    """No scored token: Liger's sums and their gradients are 0, and so are the fused loss's (not 0·(1/0) = nan, which
    an optimizer would write into the weights); the loss is nan, as F.cross_entropy's mean is."""
    hidden, weight, _, targets = make(False)
    targets = torch.full_like(targets, -100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(role is Role.ACTIVE)
    plan = WeightPlan(role, OnTheFlyUpdate(lr=LR) if role.updates_on_the_fly else None)
    loss = fused_head_loss(h, w, None, targets, plan)
    (GAMMA * loss).backward()
    assert liger_calls and torch.isnan(loss)
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w)) if role is Role.ACTIVE else torch.equal(w, weight)


def test_tiled_on_the_fly_head_runs_its_own_loop(triton_backend, liger_calls):
    """Where dW does not fit, the vocabulary tiles need the per-token logsumexp: this library's loop serves."""
    hidden, weight, _, targets = make(False)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head")
    w = weight.clone()
    fused_head_loss(hidden.requires_grad_(), w, None, targets, plan, chunk_bytes=5 * VOCAB * 4).backward()
    assert liger_calls == [] and not torch.equal(w, weight)


def test_bf16_through_liger(triton_backend, liger_calls):
    """bf16: Liger's kernel normalises the bf16 logits in fp32 and writes g in bf16; dW accumulated in fp32 over the
    chunks: a few bf16 ulps from autograd's (rtol 2e-2 of the largest element)."""
    hidden, weight, _, targets = make(False, torch.bfloat16)
    loss_ref, dh_ref, dw_ref, _ = reference(hidden, weight, None, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_head_loss(h, w, None, targets, chunk_bytes=9 * VOCAB * 8)
    (GAMMA * loss).backward()
    assert len(liger_calls) == 1 and w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    close(loss, loss_ref, "loss", rtol=1e-2)
    close(h.grad, dh_ref, "dh", rtol=0, atol=2e-2 * dh_ref.abs().max().item())
    close(w.grad, dw_ref, "dW", rtol=0, atol=2e-2 * dw_ref.abs().max().item())


class _LogitsRows(TorchDispatchMode):
    """The most rows of any [rows, VOCAB] tensor allocated (views of W, such as Wᵀ [H, V], are not)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == VOCAB:
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("max_rows", [4, 9, TOKENS])
def test_liger_blocks_keep_to_the_budget(triton_backend, max_rows):
    hidden, weight, _, targets = make(False)
    targets = torch.where(targets < 0, -1, targets)
    with _LogitsRows() as seen:
        loss, *_ = liger.linear_cross_entropy(hidden, weight, None, targets, None, max_rows, True, False)
    smallest = liger.liger_chunk_rows(TOKENS, HIDDEN, VOCAB, 1)
    assert seen.rows <= max(max_rows, smallest)
    assert seen.rows < TOKENS or max_rows == TOKENS
    close(loss, F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1, reduction="sum"), "summed loss")


def test_target_outside_the_vocabulary_fails():
    hidden, weight, _, targets = make(False)
    targets = torch.where(targets < 0, -1, targets)
    targets[2] = VOCAB
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        liger.linear_cross_entropy(hidden, weight, None, targets, None, TOKENS, True, True)


def test_untested_liger_version_falls_back_to_the_own_loop(triton_backend, monkeypatch):
    import importlib.metadata

    liger._forward.cache_clear()
    monkeypatch.setattr(liger, "_warned", [])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.10")
    try:
        assert "0.5.10 is installed" in liger._forward()[1]
        hidden, weight, _, targets = make(False)
        h = hidden.clone().requires_grad_()
        with pytest.warns(RuntimeWarning, match="its own torch loop"):
            loss = fused_head_loss(h, weight, None, targets)
        loss_ref, dh_ref, _, _ = reference(hidden, weight, None, targets)
        (GAMMA * loss).backward()
        close(loss, loss_ref, "loss")
        close(h.grad, dh_ref, "dh")
    finally:
        liger._forward.cache_clear()
    with pytest.raises(RuntimeError, match="cannot serve"):
        monkeypatch.setattr(liger, "_forward", lambda: (None, "not installed"))
        liger.linear_cross_entropy(hidden, weight, None, torch.zeros(TOKENS, dtype=torch.long, device=DEVICE), None, 4,
                                   True, True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_model_through_liger_matches_unpatched(triton_backend, liger_calls, family):
    """``patch(model)`` on the Triton backend: the causal LM's loss runs through Liger, its loss and every gradient
    equal the unpatched model's (GPT-2: a tied head, one summed gradient)."""
    import copy

    import bread_kernels
    from tests import model_zoo as models

    original = (models.llama(layers=2) if family == "llama" else models.gpt2()).to(DEVICE)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0).to(DEVICE)
    for loss_of in (models.loss_of, models.masked_loss_of):
        original.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        expected = loss_of(original, ids)
        (GAMMA * expected).backward()
        loss = loss_of(model, ids)
        close(loss, expected, f"{family} {loss_of.__name__}: loss")
        (GAMMA * loss).backward()
        params = dict(model.named_parameters())
        for name, p in original.named_parameters():
            close(params[name].grad, p.grad, f"{family} {loss_of.__name__}: {name}.grad")
    assert len(liger_calls) == 2
