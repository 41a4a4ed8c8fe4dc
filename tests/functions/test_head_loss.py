"""The fused head+loss against plain autograd: the function on its own (every Role, soft-capping, ignored tokens,
num_items_in_batch, chunks that do not divide the tokens or the vocabulary), and ``patch(model, fused_loss=True)``
against the unpatched Hugging Face model (Llama, GPT-2 with its tied head, Gemma2 with soft-capping, and the other
families the forward accepts); no [tokens, vocab] tensor is ever allocated; bad inputs are refused.

The reference is always transformers / torch themselves: ``F.cross_entropy`` of ``F.linear`` (soft-capped the way
Gemma2's forward does it), or the unpatched model's ``loss`` and ``.grad``; updates are checked against
``W − lr·s·f(γ·dW)`` with the reference's ``dW``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bread_kernels
from bread_kernels import OnTheFlyUpdate, Role, WeightPlan
from bread_kernels.functions.head_loss import fused_head_loss
from tests import model_zoo as models

RTOL, ATOL = 1e-5, 1e-6
TOKENS, HIDDEN, VOCAB = 26, 16, 97
LR, SCALE, GAMMA = 0.1, 0.5, 3.0  # GAMMA: the loss is scaled before the backward (grad_output != 1)
#: bytes for fp32 blocks of 5 token rows (5 does not divide 26) and, in the backward, of 3 vocabulary rows (97);
#: less than dW's, so an on-the-fly head takes the vocabulary tiles
ODD_CHUNKS = 5 * VOCAB * 4
#: bytes for blocks of 16 token rows (two chunks) that hold an fp32 dW and db (97·16 + 97 elements): an on-the-fly
#: head accumulates dW in the forward
DW_FITS = 16 * VOCAB * 4


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    diff = (actual.double() - expected.double()).abs()
    bad = diff > atol + rtol * expected.double().abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements differ, max |diff| {diff.max():.3g} "
                           f"(max |reference| {expected.abs().max():.3g})")


def make(bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    b = torch.randn(VOCAB, generator=gen) if bias else None
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    targets[::4] = -100
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, softcap=None, num_items=None):
    """loss, dh, dW, db of plain autograd (HF's ForCausalLMLoss arithmetic), for the loss scaled by GAMMA."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    z = F.linear(h, w, b)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    loss = F.cross_entropy(z.float(), targets, ignore_index=-100, reduction="sum" if num_items else "mean")
    if num_items:
        loss = loss / num_items
    (GAMMA * loss).backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


CASES = [  # (softcap, bias, num_items_in_batch, chunk_bytes)
    (None, False, None, None),
    (None, True, None, ODD_CHUNKS),
    (3.0, False, None, ODD_CHUNKS),
    (3.0, True, 40, 1),  # one token / one vocabulary row per block
    (None, False, torch.tensor(31), ODD_CHUNKS),
    (3.0, True, 40, DW_FITS),
]
CASE_IDS = ["plain", "bias-odd-chunks", "softcap", "softcap-bias-num-items-rows-of-one", "num-items-tensor",
            "softcap-bias-num-items-dw-fits"]


@pytest.mark.parametrize("softcap, bias, num_items, chunk_bytes", CASES, ids=CASE_IDS)
def test_active_and_frozen_match_autograd(softcap, bias, num_items, chunk_bytes):
    hidden, weight, b, targets = make(bias)
    loss_ref, dh_ref, dw_ref, db_ref = reference(hidden, weight, b, targets, softcap, num_items)
    for plan in (None, WeightPlan(Role.ACTIVE, name="head")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        bb = b.clone().requires_grad_() if b is not None else None
        loss = fused_head_loss(h, w, bb, targets, plan, num_items_in_batch=num_items, softcap=softcap,
                               chunk_bytes=chunk_bytes)
        close(loss, loss_ref, "loss")
        (GAMMA * loss).backward()
        close(h.grad, dh_ref, "dh")
        close(w.grad, dw_ref, "dW")
        if b is not None:
            close(bb.grad, db_ref, "db")
    h = hidden.clone().requires_grad_()
    loss = fused_head_loss(h, weight, b, targets, WeightPlan(Role.FROZEN), num_items_in_batch=num_items,
                           softcap=softcap, chunk_bytes=chunk_bytes)
    (GAMMA * loss).backward()
    close(h.grad, dh_ref, "dh (frozen head)")


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=["sgd", "sign"])
@pytest.mark.parametrize("softcap, bias, num_items, chunk_bytes", CASES, ids=CASE_IDS)
def test_on_the_fly_update_matches_autograd(role, softcap, bias, num_items, chunk_bytes):
    hidden, weight, b, targets = make(bias)
    loss_ref, dh_ref, dw_ref, db_ref = reference(hidden, weight, b, targets, softcap, num_items)
    lr = [1.0]
    plan = WeightPlan(role, OnTheFlyUpdate(lr=lambda: lr[0], scale=SCALE), name="lm_head")
    h, w = hidden.clone().requires_grad_(), weight.clone()
    bb = b.clone() if b is not None else None
    loss = fused_head_loss(h, w, bb, targets, plan, num_items_in_batch=num_items, softcap=softcap,
                           chunk_bytes=chunk_bytes)
    assert torch.equal(w, weight), "the head was updated in the forward; the update belongs in the backward"
    lr[0] = LR  # the lr is read when the backward runs
    (GAMMA * loss).backward()
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    close(loss, loss_ref, "loss")
    close(h.grad, dh_ref, "dh (from W before its update)")
    expected_w = weight - LR * SCALE * f(dw_ref)
    keep = dw_ref.abs() > 1e-6 * dw_ref.abs().max() if role is Role.SIGN else torch.ones_like(w, dtype=torch.bool)
    close(w[keep], expected_w[keep], "W after the on-the-fly update")
    if b is not None:
        close(bb, b - LR * SCALE * f(db_ref), "b after the on-the-fly update")
    assert w.grad is None and plan.skipped_updates == 0


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=["sgd", "sign"])
def test_on_the_fly_update_through_every_backend(backend, device, role):
    hidden, weight, b, targets = (t.to(device) for t in make(True, seed=1))
    _, _, dw_ref, db_ref = reference(hidden, weight, b, targets, 3.0)
    w, bb = weight.clone(), b.clone()
    loss = fused_head_loss(hidden, w, bb, targets, WeightPlan(role, OnTheFlyUpdate(lr=LR, scale=SCALE)),
                           softcap=3.0, chunk_bytes=ODD_CHUNKS)
    (GAMMA * loss).backward()  # hidden needs no grad: the backward still runs for the update
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    keep = dw_ref.abs() > 1e-6 * dw_ref.abs().max() if role is Role.SIGN else torch.ones_like(w, dtype=torch.bool)
    close(w[keep], (weight - LR * SCALE * f(dw_ref))[keep], f"W ({backend})")
    close(bb, b - LR * SCALE * f(db_ref), f"b ({backend})")


def test_bf16_active_within_stated_tolerance():
    """bf16 head: the logits GEMM and the soft-capping in bf16, the loss in fp32 (HF's order); dW accumulated in fp32
    over the chunks, so it differs from autograd's single bf16 GEMM by the rounding of g and of each chunk's dW: a
    few bf16 ulps (rtol 2e-2 of the largest element)."""
    hidden, weight, _, targets = make(False)
    hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    loss_ref, dh_ref, dw_ref, _ = reference(hidden, weight, None, targets, 3.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_head_loss(h, w, None, targets, softcap=3.0, chunk_bytes=ODD_CHUNKS)
    (GAMMA * loss).backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    close(loss, loss_ref, "loss", rtol=1e-3)
    close(h.grad, dh_ref, "dh", rtol=0, atol=2e-2 * dh_ref.abs().max().item())
    close(w.grad, dw_ref, "dW", rtol=0, atol=2e-2 * dw_ref.abs().max().item())


def test_chunk_budget_from_the_environment(monkeypatch):
    hidden, weight, _, targets = make(False)
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(3 * VOCAB * 4))
    close(fused_head_loss(hidden, weight, None, targets), reference(hidden, weight, None, targets)[0], "loss")
    for bad in ("lots", "0", "-4096"):  # named as the variable set, not as the chunk_bytes argument left out
        monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", bad)
        with pytest.raises(ValueError, match=f"BREAD_LOSS_CHUNK_BYTES must be a positive number .*got '{bad}'"):
            fused_head_loss(hidden, weight, None, targets)


@pytest.mark.parametrize("chunk_bytes", [ODD_CHUNKS, DW_FITS], ids=["tiles", "dw-fits"])
def test_non_finite_gradient_skips_the_whole_update(chunk_bytes):
    hidden, weight, b, targets = make(True)
    hidden[3, 2] = float("inf")
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head")
    w, bb = weight.clone(), b.clone()
    with pytest.warns(RuntimeWarning, match="skipped the on-the-fly SGD update of lm_head"):
        fused_head_loss(hidden.requires_grad_(), w, bb, targets, plan, chunk_bytes=chunk_bytes).backward()
    assert torch.equal(w, weight) and torch.equal(bb, b) and plan.skipped_updates == 1


class _GemmCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=["sgd", "sign"])
def test_on_the_fly_head_gemms_follow_the_memory_budget(role):
    """Where dW fits the budget, an on-the-fly head runs the reference's three GEMMs per chunk of tokens (logits, dh,
    dW) and its backward recomputes nothing; where it does not, the backward recomputes each vocabulary tile's
    logits (one more GEMM per tile) and builds that tile's dW."""
    hidden, weight, _, targets = make(False)
    counts = {}
    for name, budget in (("fits", DW_FITS), ("tiles", ODD_CHUNKS)):
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR), name="lm_head")
        with _GemmCount() as forward:
            loss = fused_head_loss(hidden.requires_grad_(), weight.clone(), None, targets, plan, chunk_bytes=budget)
        with _GemmCount() as backward:
            loss.backward()
        counts[name] = forward.calls, backward.calls
    assert counts["fits"] == (2 * 2 + 2, 0), counts  # 2 chunks of 16 and 10 tokens: logits + dh each, dW each
    chunks, tiles = -(-TOKENS // 5), -(-VOCAB // (ODD_CHUNKS // (TOKENS * 4)))
    # the tiles' dW GEMMs may run inside the backend's fused update op, which the dispatch mode sees as one op
    assert counts["tiles"][0] == 2 * chunks and counts["tiles"][1] >= tiles, counts


@pytest.mark.parametrize("num_items", [None, 0], ids=["mean", "num-items-0"])
@pytest.mark.parametrize("chunk_bytes", [None, ODD_CHUNKS, DW_FITS], ids=["default", "tiles", "dw-fits"])
@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD, Role.SIGN], ids=["active", "sgd", "sign"])
def test_all_tokens_ignored_gives_nan_loss_and_zero_gradients_like_cross_entropy(role, chunk_bytes, num_items):
    """A batch with no scored token (a response cut away by max_length, a micro-batch of prompts): the loss is nan,
    as ``F.cross_entropy``'s mean (or a sum over 0 items) is, but every gradient is autograd's exact 0 — not
    0·(1/0) = nan, which an optimizer would write into the weights — and an on-the-fly head takes its (null) step."""
    hidden, weight, b, targets = make(True)
    targets = torch.full_like(targets, -100)
    loss_ref, dh_ref, dw_ref, db_ref = reference(hidden, weight, b, targets, num_items=num_items)
    assert torch.isnan(loss_ref) and not dh_ref.any() and not dw_ref.any() and not db_ref.any()
    update = OnTheFlyUpdate(lr=LR, scale=SCALE) if role.updates_on_the_fly else None
    plan = WeightPlan(role, update, name="lm_head")
    h = hidden.clone().requires_grad_()
    w, bb = weight.clone().requires_grad_(role is Role.ACTIVE), b.clone().requires_grad_(role is Role.ACTIVE)
    loss = fused_head_loss(h, w, bb, targets, plan, num_items_in_batch=num_items, chunk_bytes=chunk_bytes)
    assert torch.isnan(loss)
    (GAMMA * loss).backward()
    assert torch.equal(h.grad, dh_ref)
    if role is Role.ACTIVE:
        assert torch.equal(w.grad, dw_ref) and torch.equal(bb.grad, db_ref)
    else:
        assert torch.equal(w, weight) and torch.equal(bb, b) and plan.skipped_updates == 0


def test_second_backward_is_refused():
    hidden, weight, _, targets = make(False)
    loss = fused_head_loss(hidden.requires_grad_(), weight, None, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="the backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("change, error, match", [
    (dict(targets=torch.full((TOKENS,), VOCAB)), ValueError, "target 97 is outside the vocabulary"),
    (dict(targets=torch.zeros(TOKENS + 1, dtype=torch.long)), ValueError, r"targets must be \[tokens\]"),
    (dict(targets=torch.zeros(TOKENS)), TypeError, "targets must be an int64 tensor"),
    (dict(hidden=torch.randn(TOKENS, HIDDEN + 1)), ValueError, r"hidden must be \[tokens, 16\]"),
    (dict(hidden=torch.randn(TOKENS, HIDDEN, dtype=torch.float64)), TypeError, "hidden has dtype torch.float64"),
    (dict(hidden=torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)), TypeError, "hidden is torch.bfloat16 but"),
    (dict(bias=torch.zeros(VOCAB - 1)), ValueError, "bias has shape"),
    (dict(softcap=-1.0), ValueError, "softcap must be a positive finite number"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite number"),  # was nan logits
    (dict(chunk_bytes=0), ValueError, "chunk_bytes must be a positive number"),
    (dict(hidden_sized="yes"), TypeError, "hidden_sized must be True or False"),
    (dict(hidden_sized=True, room_bytes="1MiB"), TypeError, "room_bytes must be a number of bytes"),
    (dict(dw_bytes=-1), ValueError, "dw_bytes must be None or a number of bytes >= 0"),
    (dict(dw_bytes=2.5e6), ValueError, "dw_bytes must be None or a number of bytes >= 0"),
    (dict(num_items_in_batch=torch.tensor([1, 2])), ValueError, "num_items_in_batch must be a number or a one"),
    (dict(plan="sgd"), TypeError, "plan must be a bread_kernels.WeightPlan"),
    (dict(plan=WeightPlan(Role.LORA)), NotImplementedError, "a LoRA head is not supported"),
    (dict(plan=WeightPlan(Role.ACTIVE, name="lm_head")), ValueError, "has role ACTIVE but requires_grad=False"),
])
def test_bad_inputs_are_refused(change, error, match):
    hidden, weight, _, targets = make(False)
    args = dict(hidden=hidden, weight=weight, bias=None, targets=targets, plan=None)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("softcap", "chunk_bytes", "num_items_in_batch", "hidden_sized", "room_bytes",
                                       "dw_bytes") if k in args}
    with pytest.raises(error, match=match):
        fused_head_loss(args["hidden"], args["weight"], args["bias"], args["targets"], args["plan"], **kwargs)


def test_sharded_update_target_is_refused():
    hidden, weight, _, targets = make(False)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head", target=object())
    with pytest.raises(NotImplementedError, match="which the fused loss does not drive"):
        fused_head_loss(hidden, weight, None, targets, plan)


# ----------------------------------------------------------------------------------------------------------------
# patch(model, fused_loss=True) against the unpatched model (no optimizer: the head takes plain autograd's path)

FAMILIES = {
    "llama": lambda: models.llama(layers=2),
    "gpt2": models.gpt2,  # tied wte / lm_head: one summed gradient
    "gemma2": lambda: models.gemma2(layers=2),  # final-logit soft-capping
    **{name: (lambda name=name: models.causal_lm(name)) for name in ("mistral", "qwen2", "qwen3", "gemma")},
}


def grads_match(reference_model, model, what):
    params = dict(model.named_parameters())
    for name, p in reference_model.named_parameters():
        assert (p.grad is None) == (params[name].grad is None), f"{what}: {name} has a .grad in one model only"
        if p.grad is not None:
            close(params[name].grad, p.grad, f"{what}: {name}.grad")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_unpatched(family):
    original = FAMILIES[family]()
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    for loss_of in (models.loss_of, models.masked_loss_of):
        original.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        expected = loss_of(original, ids)
        (GAMMA * expected).backward()
        out = model(input_ids=ids, labels=ids) if loss_of is models.loss_of else None
        if out is not None:
            assert out.logits is None, "with labels the fused loss returns no logits"
            model.zero_grad(set_to_none=True)
        loss = loss_of(model, ids)
        close(loss, expected, f"{family} {loss_of.__name__}: loss")
        (GAMMA * loss).backward()
        grads_match(original, model, f"{family} {loss_of.__name__}")


def test_softcapping_is_applied():
    """Gemma2's cap bends this tiny model's logits: without it the loss would differ (so the test above sees it)."""
    ids = models.batch(0)
    capped = bread_kernels.patch(models.gemma2(layers=2), fused_loss=True)
    uncapped = models.gemma2(layers=2, softcap=None)
    assert abs(models.loss_of(capped, ids).item() - models.loss_of(uncapped, ids).item()) > 1e-3


def test_without_labels_or_without_grad_the_forward_is_unchanged():
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    close(model(input_ids=ids).logits, original(input_ids=ids).logits, "logits without labels")
    with torch.no_grad():
        out, ref = model(input_ids=ids, labels=ids), original(input_ids=ids, labels=ids)
    close(out.logits, ref.logits, "logits under no_grad")
    close(out.loss, ref.loss, "loss under no_grad")


@pytest.mark.parametrize("helper", ["transformers", "before_slice_logits_to_keep"])
def test_shift_labels_logits_to_keep_and_tuples(helper, monkeypatch):
    if helper != "transformers":  # transformers <= 5.17 slices in each family's forward (the GPU image's 5.17 did)
        import transformers.modeling_utils

        monkeypatch.delattr(transformers.modeling_utils, "slice_logits_to_keep", raising=False)
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    shift = ids.roll(-3, dims=1)
    shift[:, :4] = -100
    close(model(input_ids=ids, labels=ids, shift_labels=shift).loss,
          original(input_ids=ids, labels=ids, shift_labels=shift).loss, "loss with shift_labels")
    keep = 5  # the last 5 positions, labels of their length
    close(model(input_ids=ids, labels=ids[:, -keep:], logits_to_keep=keep).loss,
          original(input_ids=ids, labels=ids[:, -keep:], logits_to_keep=keep).loss, "loss with logits_to_keep")
    positions = torch.tensor([0, 3, 7])  # a 1-D tensor: these positions of every sample
    close(model(input_ids=ids, labels=ids[:, positions], logits_to_keep=positions).loss,
          original(input_ids=ids, labels=ids[:, positions], logits_to_keep=positions).loss, "loss, logits_to_keep tensor")
    with pytest.raises(ValueError, match="the labels give 26 targets"):
        model(input_ids=ids, labels=ids, logits_to_keep=keep)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    close(as_tuple[0], original(input_ids=ids, labels=ids).loss, "loss (return_dict=False)")


@pytest.mark.parametrize("count", ["numpy-int64", "numpy-float32"])
def test_num_items_in_batch_as_a_numpy_number_is_what_the_unpatched_model_divides_by(count):
    """A count of scored tokens from numpy (``np.sum(labels != -100)`` in a custom loop, an int64 or a float32): the
    unpatched model divides its summed loss by it, and the fused loss refused it ("must be a number or a tensor"),
    so a loop that trained unpatched failed once patched."""
    np = pytest.importorskip("numpy")
    ids = models.batch(0)
    labels = ids.masked_fill(ids % 7 == 0, -100)
    value = {"numpy-int64": np.int64, "numpy-float32": np.float32}[count](int((labels[:, 1:] != -100).sum()) + 3)
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=value)
    expected = original(input_ids=ids, labels=labels, num_items_in_batch=value)
    assert out.logits is None, "the fused loss ran"
    close(out.loss, expected.loss, f"loss, num_items_in_batch {count}")
    out.loss.backward()
    expected.loss.backward()
    grads_match(original, model, f"num_items_in_batch {count}")


def test_a_tuple_output_keeps_each_item_at_the_unpatched_models_index():
    """``return_dict=False`` with the fused loss: the tuple dropped the logits (None), so every later item moved up one
    place — ``outputs[1]``, the unpatched model's logits, was the KV cache or the hidden states, and ``outputs[2]``
    was out of range or the next item (a reviewer's find).  The logits' place is kept, as None."""
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    for extra in ({}, {"use_cache": False, "output_hidden_states": True}):
        got = model(input_ids=ids, labels=ids, return_dict=False, **extra)
        expected = original(input_ids=ids, labels=ids, return_dict=False, **extra)
        assert len(got) == len(expected) and got[1] is None and isinstance(expected[1], torch.Tensor), extra
        close(got[0], expected[0], f"loss {extra}")
        for index, (item, reference) in enumerate(zip(got[2:], expected[2:]), start=2):
            assert type(item) is type(reference), (extra, index, type(item), type(reference))
            if isinstance(reference, tuple):
                for a, b in zip(item, reference):
                    close(a, b, f"hidden states at index {index} {extra}")


def test_unpatch_and_repatch_restore_the_forward():
    model = models.llama(layers=2)
    bread_kernels.patch(model, fused_loss=True)
    assert "forward" in model.__dict__
    bread_kernels.patch(model, fused_loss=False)
    assert "forward" not in model.__dict__ and model(input_ids=models.batch(0), labels=models.batch(0)).logits \
        is not None
    bread_kernels.patch(model, fused_loss=True)
    bread_kernels.unpatch(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_bread_fused_loss")


def test_peft_model_gets_the_fused_loss_inside():
    original = models.with_lora(models.llama(layers=2))
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    expected = models.masked_loss_of(original, ids)
    expected.backward()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    loss = models.masked_loss_of(model, ids)
    close(loss, expected, "peft llama: loss")
    loss.backward()
    grads_match(original, model, "peft llama")


def test_unsupported_models_are_refused():
    bert = models.bert()
    with pytest.raises(ValueError, match=r"fused_loss=True needs a causal LM .* patch\(model, fused_loss=False\)"):
        bread_kernels.patch(bert, fused_loss=True)
    assert not hasattr(bert, "_bread_patch"), "a refused patch must leave the model untouched"
    model = bread_kernels.patch(models.llama(layers=2), fused_loss=True)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="custom loss_function"):
        model(input_ids=models.batch(0), labels=models.batch(0))
    with pytest.raises(TypeError, match="fused_loss must be None \\(where it can\\), True or False"):
        bread_kernels.patch(models.llama(layers=2), fused_loss="yes")


def test_a_causal_lm_inside_a_composite_model_is_refused_and_left_unfused_by_default():
    """A vision-encoder-decoder's GPT-2 decoder is a causal LM of a supported family, but the composite model's
    forward calls it without labels and computes the loss from its logits.  ``patch(model, fused_loss=True)``
    installed the fused forward on the decoder and returned, and every step then ran the unfused head and loss
    (the whole logits) that the user had required away; now it is refused, naming the remedy, and the default
    installs nothing there: the loss and the gradients are the unpatched model's."""
    original = models.vit_gpt2()
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel at 'decoder' is a part of VisionEncoderDecoderModel .*"
                                         r"encoder.*patch\(model, fused_loss=False\)"):
        bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    model = bread_kernels.patch(copy.deepcopy(original))
    assert not any("_bread_fused_loss" in m.__dict__ for m in model.modules())
    pixels, ids = torch.randn(models.BATCH, 3, 16, 16), models.batch(0)
    out, expected = model(pixel_values=pixels, labels=ids), original(pixel_values=pixels, labels=ids)
    close(out.loss, expected.loss, "vision-encoder-decoder: loss")
    out.loss.backward()
    expected.loss.backward()
    grads_match(original, model, "vision-encoder-decoder")


def test_by_default_the_fused_loss_is_used_where_it_can_be():
    """``patch(model)``: a supported causal LM gets the fused loss (logits None, the loss and gradients the
    unpatched model's); a model it cannot match keeps its own head and loss, without an error — at patch time (not a
    causal LM of a supported family) and at each forward (a custom loss_function, a head plan it cannot carry out)."""
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original))
    ids = models.batch(0)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    close(out.loss, original(input_ids=ids, labels=ids).loss, "loss (default patch)")
    bert = bread_kernels.patch(models.bert())  # not a causal LM: nothing installed, nothing raised
    assert not any("_bread_fused_loss" in m.__dict__ for m in bert.modules())

    own = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()  # noqa: E731
    custom, reference = bread_kernels.patch(copy.deepcopy(original)), copy.deepcopy(original)
    custom.loss_function = reference.loss_function = own
    out = custom(input_ids=ids, labels=ids)
    assert out.logits is not None, "a custom loss_function: the model's own forward"
    close(out.loss, reference(input_ids=ids, labels=ids).loss, "custom loss (default patch)")

    plan = WeightPlan(Role.LORA, name="lm_head")  # a role the fused loss refuses
    model.lm_head._bread_weight_plan = plan
    assert model(input_ids=ids, labels=ids).logits is not None, "a head plan it cannot carry out: the own forward"
    bread_kernels.patch(model, fused_loss=True)
    with pytest.raises(ValueError, match="role LORA.*patch\\(model, fused_loss=False\\)"):
        model(input_ids=ids, labels=ids)


def test_a_causal_lm_class_whose_forward_was_replaced_keeps_that_forward(monkeypatch):
    """A causal-LM class whose forward a library or the user replaced (Liger-Kernel's ``apply_liger_kernel_to_llama``,
    a z-loss added around transformers' forward, here with ``functools.wraps``): the fused loss took its place and
    computed transformers' cross-entropy, the z-loss silently dropped.  By default that forward runs (the loss and the
    gradients the unpatched model's); ``fused_loss=True`` refuses it naming the remedy, at ``patch`` and at a forward
    after the class's forward was replaced."""
    import functools

    import transformers

    real = transformers.LlamaForCausalLM.forward

    @functools.wraps(real)
    def with_z_loss(self, *args, labels=None, **kwargs):
        out = real(self, *args, labels=labels, **kwargs)
        if labels is not None:
            out.loss = out.loss + 0.1 * torch.logsumexp(out.logits.float(), -1).square().mean()
        return out

    original = models.llama(layers=2)
    required = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    ids = models.batch(0)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", with_z_loss)
    with pytest.raises(ValueError, match=r"forward of LlamaForCausalLM is not transformers' own.*with_z_loss.*"
                                         r"fused_loss=False"):
        required(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match=r"not transformers' own.*fused_loss=False"):
        bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    model = bread_kernels.patch(copy.deepcopy(original))
    out, expected = model(input_ids=ids, labels=ids), original(input_ids=ids, labels=ids)
    assert out.logits is not None, "a replaced forward: that forward runs, with its logits"
    close(out.loss, expected.loss, "loss of the replaced forward (default patch)")
    out.loss.backward()
    expected.loss.backward()
    grads_match(original, model, "the replaced forward")


@pytest.mark.parametrize("how", ["fp16-autocast", "fp16-model"])
def test_a_head_computed_in_float16_keeps_the_models_own_loss(how):
    """fp16 (``Trainer(fp16=True)``'s autocast, or an fp16 head): a loss scaler's factor would reach the fused loss's
    gradients only after they were computed in fp16, which loses small ones (and overflows at a scale of 65,520 or
    more), so by default the model's own head and loss run — the scaled gradient is the unpatched model's — and
    ``fused_loss=True`` refuses naming the remedy."""
    original = models.llama(layers=2)
    if how == "fp16-model":
        original = original.half()
    context = (lambda: torch.autocast("cpu", dtype=torch.float16)) if how == "fp16-autocast" else contextlib.nullcontext
    ids = models.batch(0)
    results = []
    for model in (copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))):
        with context():
            out = model(input_ids=ids, labels=ids)
        (out.loss * 2.0 ** 16).backward()
        assert out.logits is not None
        results.append(model.model.embed_tokens.weight.grad)
    assert results[0].isfinite().all() and results[1].isfinite().all()
    close(results[1].float(), results[0].float(), "the embedding's scaled gradient", rtol=1e-2, atol=1e-2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    with context(), pytest.raises(ValueError, match="float16.*fused_loss=False"):
        model(input_ids=ids, labels=ids)


def test_the_fused_forward_keeps_the_models_signature():
    """Trainer keeps only the batch columns the forward's signature names: it must be the model's own."""
    import inspect

    model = bread_kernels.patch(models.llama(layers=2))
    assert "forward" in model.__dict__
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))


# ----------------------------------------------------------------------------------------------------------------
# memory: no [tokens, vocab] tensor


class _Shapes(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("role", [None, Role.SGD, Role.SIGN], ids=["autograd", "sgd", "sign"])
def test_no_tokens_by_vocab_tensor_is_allocated(monkeypatch, role):
    """Batch 16 × 8 (128 tokens), vocabulary 97: every other tensor of the step (attention 16·4·8·8, the MLP's
    128·88, dW 97·64) is smaller than the 128·97 logits, so the largest tensor of a forward + backward tells."""
    ids = models.batch(0, shape=(16, 8))
    tokens_by_vocab = ids.numel() * models.VOCAB
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(tokens_by_vocab * 4 // 4))  # 4 chunks and 4 tiles
    original = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    if role is not None:
        model._bread_patch.apply_plans({"lm_head": WeightPlan(role, OnTheFlyUpdate(lr=LR), name="lm_head")})
        model.lm_head.weight.requires_grad_(False)
    for net, fused in ((original, False), (model, True)):
        with _Shapes() as shapes:
            models.masked_loss_of(net, ids).backward()
        if fused:
            assert shapes.largest[0] < tokens_by_vocab, f"a [tokens, vocab]-sized tensor: {shapes.largest[1]}"
        else:  # the check sees the reference's logits
            assert shapes.largest[0] >= tokens_by_vocab, shapes.largest


def test_without_grad_nothing_is_updated_or_kept():
    """Under no_grad (an evaluation of a model whose head has an on-the-fly plan) the loss is computed and the head
    is left alone: no gradient work, no pending use of the plan."""
    hidden, weight, _, targets = make(False)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head")
    w = weight.clone()
    with torch.no_grad():
        loss = fused_head_loss(hidden, w, None, targets, plan, chunk_bytes=ODD_CHUNKS)
    close(loss, reference(hidden, weight, None, targets)[0], "loss under no_grad")
    assert not loss.requires_grad and torch.equal(w, weight) and not list(plan._uses)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=["sgd", "sign"])
def test_with_the_default_budget_dw_may_take_what_the_unfused_loss_would_hold(role, monkeypatch):
    """With the default budget (here made one odd block of logits, smaller than dW), an on-the-fly head's fp32 dW is
    accumulated in the forward as long as it fits in what the model's own head and loss would hold beyond a block
    (T·V·12 bytes at its backward's peak): the reference's three GEMMs per chunk, nothing
    recomputed in the backward, the same update, and a peak no higher than the unfused loss's.  The same budget
    given explicitly bounds dW too (the vocabulary tiles)."""
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.functions import head_loss

    monkeypatch.setattr(head_loss, "DEFAULT_LOSS_CHUNK_BYTES", ODD_CHUNKS)
    monkeypatch.delenv("BREAD_LOSS_CHUNK_BYTES", raising=False)
    hidden, weight, _, targets = make(False)
    assert ODD_CHUNKS < 4 * weight.numel() <= head_loss.unfused_loss_bytes(TOKENS, weight) - ODD_CHUNKS

    def step(**kwargs):
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR), name="lm_head")
        w, h = weight.clone(), hidden.clone().requires_grad_()
        with _GemmCount() as forward:
            loss = fused_head_loss(h, w, None, targets, plan, **kwargs)
        with _GemmCount() as backward:
            loss.backward()
        return w, (forward.calls, backward.calls)

    default, counts = step()
    chunks = -(-TOKENS // 5)
    assert counts == (3 * chunks, 0), counts
    few = 6  # fewer tokens: dW is more than their loss would hold beyond a block, so the tiles serve
    assert 4 * weight.numel() > head_loss.unfused_loss_bytes(few, weight) - ODD_CHUNKS
    with _GemmCount() as backward:
        fused_head_loss(hidden[:few].clone().requires_grad_(), weight.clone(), None, targets[:few],
                        WeightPlan(role, OnTheFlyUpdate(lr=LR), name="lm_head")).backward()
    assert backward.calls > 0
    tiled, tile_counts = step(chunk_bytes=ODD_CHUNKS)
    assert tile_counts[1] > 0, tile_counts
    close(default, tiled, "the head's update, accumulated dW against the tiles")

    def fused():
        fused_head_loss(hidden.clone().requires_grad_(), weight.clone(), None, targets,
                        WeightPlan(role, OnTheFlyUpdate(lr=LR), name="lm_head")).backward()

    def unfused():  # the model's own head and loss, with autograd's dW the reference's hook would take
        w = weight.clone().requires_grad_()
        F.cross_entropy(F.linear(hidden.clone().requires_grad_(), w).float(), targets).backward()

    assert trace_allocations(fused).peak_bytes <= trace_allocations(unfused).peak_bytes


@pytest.mark.parametrize("tokens", [90, 110, 140, 200])
def test_a_bf16_heads_forward_dw_path_holds_no_more_than_the_unfused_loss(tokens, monkeypatch):
    """With the default budget (here a 64 KiB block of logits) a bf16 on-the-fly head accumulates its dW in the
    forward only where the fp32 dW *and* each chunk's bf16 [V, H] product fit in what the unfused loss would hold
    beyond a block: the fused loss then peaks no higher than the model's own head and loss with autograd's dW (the
    reference's hook takes), give or take the hidden states' size.  Counting the fp32 dW alone, 90 tokens peaked
    1.36x the unfused loss."""
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.functions import head_loss

    monkeypatch.setattr(head_loss, "DEFAULT_LOSS_CHUNK_BYTES", 64 << 10)
    monkeypatch.delenv("BREAD_LOSS_CHUNK_BYTES", raising=False)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(2048, 256, generator=gen) * 0.02).bfloat16()
    hidden = torch.randn(tokens, 256, generator=gen).bfloat16()
    targets = torch.randint(0, 2048, (tokens,), generator=gen)

    def fused():
        fused_head_loss(hidden.clone().requires_grad_(), weight.clone(), None, targets,
                        WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head")).backward()

    def unfused():
        w = weight.clone().requires_grad_()
        F.cross_entropy(F.linear(hidden.clone().requires_grad_(), w).float(), targets).backward()

    fused()
    unfused()
    hidden_bytes = hidden.numel() * hidden.element_size()  # dh and the per-token values: the hidden states' size
    assert trace_allocations(fused).peak_bytes <= trace_allocations(unfused).peak_bytes + hidden_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_loss_bytes_is_the_peak_of_transformers_own_loss(dtype):
    """``unfused_loss_bytes`` (what the fused loss frees for kept activations) against the allocator: the peak of a
    head and transformers' ``ForCausalLMLoss`` over forward and backward, beyond their inputs, is at least the bound
    and within the head's own small tensors of it (an overestimate would let kept blocks push the step's peak above
    the reference's)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.functions import head_loss

    tokens, hidden_size, vocab = 97, 24, 301
    weight = torch.randn(vocab, hidden_size, dtype=dtype)
    hidden = torch.randn(1, tokens, hidden_size, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step():
        ForCausalLMLoss(F.linear(hidden, weight), labels, vocab).backward()

    step()
    peak = trace_allocations(step).peak_bytes
    bound = head_loss.unfused_loss_bytes(tokens, weight)
    assert bound <= peak <= bound + 4 * tokens * (hidden_size + 16), (peak, bound)


def test_a_bf16_on_the_fly_head_accumulates_dw_without_an_fp32_copy_of_each_chunks_product(monkeypatch):
    """The forward accumulates a bf16 head's dW in fp32 chunk by chunk; on a CPU ``fp32 += bf16`` first casts the
    whole [V, H] product to fp32, which the accumulation in row slices avoids: the forward's peak stays under the
    fp32 dW, one bf16 product and a fraction of its fp32 cast (the logits blocks here are a few rows)."""
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.functions import head_loss

    monkeypatch.delenv("BREAD_LOSS_CHUNK_BYTES", raising=False)
    vocab, hidden_size, tokens = 4001, 64, 96
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(torch.bfloat16)
    weight = torch.randn(vocab, hidden_size, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR), name="lm_head")
    dw_bytes = head_loss.forward_dw_bytes(tokens, weight, None, plan)
    assert dw_bytes == (4 + 2) * weight.numel()
    hidden.requires_grad_()
    peak = trace_allocations(lambda: fused_head_loss(hidden, weight, None, targets, plan, hidden_sized=True,
                                                     dw_bytes=dw_bytes)).peak_bytes
    assert peak < dw_bytes + 4 * weight.numel() // 2


@pytest.mark.parametrize("tokens, hidden_size, vocab, dtype, softcap", [
    (26, 16, 97, torch.float32, None), (61, 64, 1001, torch.bfloat16, None), (244, 64, 1001, torch.float32, 3.0),
    (7, 32, 97, torch.float32, None)])
def test_hidden_sized_blocks_counts_the_blocks_the_bounded_loss_runs(monkeypatch, tokens, hidden_size, vocab, dtype,
                                                                     softcap):
    """The count a caller weighs an on-the-fly head's dW path by is the number of logits blocks the loss really
    computes with ``hidden_sized=True`` (counted at ``_logits``), not an estimate such as ⌈V/H⌉ (17 against 16 at
    vocabulary 1001, hidden 64); ``hidden_sized_block_bytes`` is the largest block's rows × V × the bytes per logit
    (at least one row: 7 tokens × 32 hidden hold fewer elements than one row of 97)."""
    from bread_kernels.functions import head_loss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    calls = []
    original = head_loss._logits
    monkeypatch.setattr(head_loss, "_logits", lambda h, *a: calls.append(h.shape[0]) or original(h, *a))
    with torch.no_grad():
        fused_head_loss(hidden, weight, None, targets, softcap=softcap, hidden_sized=True)
    assert len(calls) == head_loss.hidden_sized_blocks(tokens, weight, softcap)
    per_logit = 4 + (4 if softcap is not None else 0) + (4 if dtype != torch.float32 else 0)
    assert head_loss.hidden_sized_block_bytes(tokens, weight, softcap) == max(calls) * vocab * per_logit


def test_a_heads_dw_path_beside_kept_blocks_runs_few_blocks_of_logits(monkeypatch):
    """``dw_bytes_beside_hidden_sized``: 0 for a head with no dW in the forward (frozen); for an on-the-fly head and
    an Adam-trained one (ACTIVE, or no plan and a weight that requires grad: its dW is always accumulated in the
    forward, beside whatever is kept), the fp32 dW and each chunk's bf16 product; None (keep nothing beside the
    loss) only where the dW alone holds more than the unfused loss would.  With such a dW the bounded loss runs at
    most ``MAX_DW_BLOCKS_BESIDE_KEPT`` blocks of logits — larger than the hidden states' size where those are more
    (vocabulary 1001, hidden 64: 17) — counted as the loss runs them (at ``_logits``), with the same loss as the
    hidden-sized blocks; unless the chunk budget takes more blocks than that, as the unbounded loss then runs."""
    from bread_kernels.functions import head_loss

    sgd = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=LR))
    few = torch.zeros(8 * 64, 64, dtype=torch.bfloat16)  # V/H = 8
    assert head_loss.hidden_sized_blocks(1024, few) <= head_loss.MAX_DW_BLOCKS_BESIDE_KEPT
    assert head_loss.dw_bytes_beside_hidden_sized(1024, few, None, sgd) == (4 + 2) * few.numel()
    assert head_loss.dw_bytes_beside_hidden_sized(1024, few, None, WeightPlan(Role.FROZEN)) == 0
    assert head_loss.dw_bytes_beside_hidden_sized(1024, few, None, None) == 0
    active = WeightPlan(Role.ACTIVE)
    assert head_loss.dw_bytes_beside_hidden_sized(1024, few, None, active) == (4 + 2) * few.numel()
    assert head_loss.dw_bytes_beside_hidden_sized(1024, few.requires_grad_(), None, None) == (4 + 2) * few.numel()
    many = torch.zeros(1001, 64, dtype=torch.bfloat16)
    assert head_loss.hidden_sized_blocks(244, many) == 17
    assert head_loss.dw_bytes_beside_hidden_sized(244, many, None, sgd) == (4 + 2) * many.numel()
    assert head_loss.dw_bytes_beside_hidden_sized(244, many, None, active) == (4 + 2) * many.numel()
    assert head_loss.dw_bytes_beside_hidden_sized(4, many, None, sgd) is None  # dW > 4 tokens' unfused loss

    gen = torch.Generator().manual_seed(0)
    tokens = 244
    hidden = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(1001, 64, generator=gen) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, 1001, (tokens,), generator=gen)
    calls = []
    original = head_loss._logits
    monkeypatch.setattr(head_loss, "_logits", lambda h, *a: calls.append(h.shape[0]) or original(h, *a))

    def loss_and_blocks(plan, dw_bytes):
        calls.clear()
        w = weight.clone().requires_grad_(plan.role is Role.ACTIVE)
        loss = fused_head_loss(hidden, w, None, targets, plan, hidden_sized=True, dw_bytes=dw_bytes)
        return loss, list(calls)

    held = head_loss.dw_bytes_beside_hidden_sized(tokens, weight, None, sgd)
    per_logit = 4 + 4  # fp32 logits, the bf16 GEMM's output and the gradient's cast
    for plan in (sgd, active):
        loss, blocks = loss_and_blocks(plan, held)
        assert len(blocks) == head_loss.hidden_sized_blocks(tokens, weight, dw_in_forward=True) \
            == head_loss.MAX_DW_BLOCKS_BESIDE_KEPT
        assert head_loss.hidden_sized_block_bytes(tokens, weight, dw_in_forward=True) == max(blocks) * 1001 * per_logit
        frozen_loss, frozen_blocks = loss_and_blocks(WeightPlan(Role.FROZEN), None)
        assert len(frozen_blocks) == 17  # no dW in the forward: the hidden states' size
        close(loss, frozen_loss, "loss over 8 blocks against 17", rtol=1e-6)
    # a chunk budget smaller than 8 blocks: its blocks, as many as the unbounded loss runs
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(20 * 1001 * per_logit))
    assert head_loss.hidden_sized_blocks(tokens, weight, dw_in_forward=True) == -(-tokens // 20) == 13
    assert len(loss_and_blocks(sgd, held)[1]) == 13


@pytest.mark.parametrize("backend_name", ["native", "torch"])
def test_an_fp16_head_tile_whose_dw_overflows_skips_every_tile(backend_name, monkeypatch):
    """The vocabulary tiles (dW does not fit the budget) of an fp16 SGD head under a loss scale: finite h, logsumexp
    and γ, but one tile's dW (rows of target 50, h[:, 0] = 100) past 65,504.  Every tile is checked before the first
    writes, so no row of W moves and one skip is reported; before, the tiles before it were written (52 of 64 rows
    changed, reported as skipped) or, earlier still, W became -inf."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 16, generator=gen) * 0.02).half()
    before = weight.clone()
    hidden = torch.randn(32, 16, generator=gen).half()
    hidden[:, 0] = 100.0
    targets = torch.full((32,), 50)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=1e-3, loss_scale=4096.0), name="lm_head")
    loss = fused_head_loss(hidden.requires_grad_(True), weight, None, targets, plan, chunk_bytes=2048, dw_bytes=0)
    with pytest.warns(RuntimeWarning, match="lm_head.*not finite"):
        (loss * 4096).backward()
    assert torch.equal(weight, before) and plan.skipped_updates == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("role", [Role.FROZEN, Role.ACTIVE, Role.SGD], ids=lambda r: r.name)
def test_the_loss_holds_one_block_of_logits_at_a_time(monkeypatch, role, dtype):
    """Over several blocks of logits (and, for an on-the-fly head whose dW is not held, several vocabulary tiles in
    the backward) the loss's peak is one block's bytes and what it holds besides — never two blocks, which a block
    still referenced while the next is allocated would take.  Allocator statistics of forward + backward against
    ``rows × V × bytes per logit``."""
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.functions import head_loss

    monkeypatch.delenv("BREAD_LOSS_CHUNK_BYTES", raising=False)
    tokens, hidden_size, vocab = 244, 32, 1001
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    per_logit = head_loss._bytes_per_logit(dtype, None)
    rows = 61  # four blocks of logits; an on-the-fly head's vocabulary tiles of 250 rows of W (as many bytes)
    block = rows * max(vocab, tokens) * per_logit
    plan = WeightPlan(role, OnTheFlyUpdate(lr=LR) if role is Role.SGD else None, name="lm_head")
    if role is Role.ACTIVE:
        weight.requires_grad_()
    held = 4 * weight.numel() + weight.numel() * dtype.itemsize if role is Role.ACTIVE else 0  # dW, fp32 and cast

    def step():
        fused_head_loss(hidden, weight, None, targets, plan, chunk_bytes=rows * vocab * per_logit,
                        dw_bytes=0).backward()
        hidden.grad = weight.grad = None

    step()
    peak = trace_allocations(step).peak_bytes
    besides = 3 * tokens * hidden_size * 4 + 16 * tokens  # dh (and its cast), the row statistics
    assert peak <= block + held + besides + gemm_workspace(step), (peak, block)


_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.addmm.out,
          torch.ops.aten.addmm_.default}


class _RecordGemms(TorchDispatchMode):
    """Each GEMM a step calls, with copies of its operands of the same shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            def copied(value):
                if not isinstance(value, torch.Tensor):
                    return value
                return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype).copy_(value)
            self.calls.append((func, [copied(a) for a in args], {k: copied(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def gemm_workspace(step) -> int:
    """The most bytes one GEMM of ``step`` allocates beyond its result: the BLAS's own packing buffers (oneDNN's bf16
    GEMM on a CPU with AVX-512-BF16 packs its operands; others pack nothing), measured by replaying each of the
    step's GEMMs alone on copies of its operands."""
    from bread_kernels.bench.memory import trace_allocations

    with _RecordGemms() as record:
        step()
    workspace = 0
    for func, args, kwargs in record.calls:
        results = []
        peak = trace_allocations(lambda: results.append(func(*args, **kwargs))).peak_bytes
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        result = results[0]
        new = 0 if any(result.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in operands) \
            else result.untyped_storage().nbytes()
        workspace = max(workspace, peak - new)
    return workspace


@pytest.mark.parametrize("role", [Role.FROZEN, Role.SGD], ids=lambda r: r.name)
def test_a_block_of_logits_costs_few_ops_beyond_its_gemms(role):
    """The loop's work per target token (the one-hot column, its scale, the scored rows' loss) is made once for all
    tokens, so each further block of logits adds only its own passes: ≤ 30 aten ops (26 for an SGD head's dW path,
    43 when each block made its own), counted over the forward of 8 blocks against 1.  Beside kept blocks a head
    whose dW is built in the forward runs 8 blocks (``MAX_DW_BLOCKS_BESIDE_KEPT``)."""
    from tests.aten_ops import AtenOps

    gen = torch.Generator().manual_seed(0)
    tokens = 64
    hidden = torch.randn(tokens, HIDDEN, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen)
    counts = []
    for rows in (tokens, tokens // 8):
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR) if role.updates_on_the_fly else None)
        with AtenOps() as ops:
            loss = fused_head_loss(hidden, weight.clone(), None, targets, plan, chunk_bytes=rows * VOCAB * 4,
                                   dw_bytes=1 << 30)
        counts.append(len(ops.names))
        close(loss, F.cross_entropy(F.linear(hidden, weight).double(), targets).float(), "loss")
    assert (counts[1] - counts[0]) / 7 <= 30, counts


# ----------------------------------------------------------------------------------------------------------------
# vision-language models: the loss on the merged image and text hidden states

VLMS = {  # name: (builder, inputs of a step with or without images)
    "qwen2_vl": (models.qwen2_vl, lambda model, step, images: models.qwen2_vl_inputs(step, images)),
    "qwen2_5_vl": (models.qwen2_5_vl, lambda model, step, images: models.qwen2_vl_inputs(step, images)),
    "qwen3_vl": (models.qwen3_vl, lambda model, step, images: models.qwen2_vl_inputs(step, images)),
    "glm4v": (models.glm4v, lambda model, step, images: models.qwen2_vl_inputs(step, images)),
    "mllama": (models.mllama, lambda model, step, images: models.mllama_inputs(step, images)),
    **{name: (build, models.llava_style_inputs) for name, build in (
        ("llava", models.llava), ("llava_next", models.llava_next), ("mistral3", models.mistral3),
        ("gemma3", models.gemma3), ("paligemma", models.paligemma),  # paligemma: soft-capped (Gemma2's text)
        ("llava_onevision", models.llava_onevision), ("idefics3", models.idefics3), ("smolvlm", models.smolvlm),
        ("internvl", models.internvl), ("aya_vision", models.aya_vision),  # aya_vision: scaled logits, tied head
        ("vipllava", models.vipllava), ("llava_next_video", models.llava_next_video), ("idefics2", models.idefics2),
        ("cohere2_vision", models.cohere2_vision))},
}


@pytest.mark.parametrize("images", [True, False], ids=["images", "text-only"])
@pytest.mark.parametrize("family", list(VLMS))
def test_vision_language_model_matches_unpatched(family, images):
    """``patch(model, fused_loss=True)`` on a vision-language model: the loss (ignored labels, the image tokens
    among them; with and without ``num_items_in_batch``) and every gradient — the vision tower's and projector's
    included — are the unpatched model's, and no logits are returned."""
    build, inputs_of = VLMS[family]
    original = build()
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    inputs = inputs_of(original, 0, images)
    labels = models.vlm_labels(inputs["input_ids"])
    scored = int((labels[:, 1:] != -100).sum())
    for extra in ({}, {"num_items_in_batch": torch.tensor(scored + 3)}):
        original.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        expected = original(**inputs, labels=labels, **extra).loss
        (GAMMA * expected).backward()
        out = model(**inputs, labels=labels, **extra)
        assert out.logits is None, "with labels the fused loss returns no logits"
        close(out.loss, expected, f"{family} {extra}: loss")
        (GAMMA * out.loss).backward()
        params = dict(model.named_parameters())
        for name, p in original.named_parameters():  # fp32 sums in another order: rounding relative to the largest
            assert (p.grad is None) == (params[name].grad is None), f"{family}: {name} has a .grad in one model only"
            if p.grad is not None:  # (Gemma3's projector: gradients up to ~1e4 from the embedding's √H scaling)
                close(params[name].grad, p.grad, f"{family} images={images} {extra}: {name}.grad",
                      atol=ATOL + RTOL * float(p.grad.abs().max()))


@pytest.mark.parametrize("family", ["qwen2_vl", "glm4v", "llava_onevision", "idefics3", "smolvlm", "internvl",
                                    "aya_vision", "vipllava", "llava_next_video", "idefics2", "cohere2_vision"])
def test_vision_language_model_outputs_as_the_causal_lms(family):
    """Without labels or without grad its own forward (the logits); ``return_dict=False`` keeps the logits' place,
    as None, and the unpatched model's other items (its image outputs among them)."""
    build, inputs_of = VLMS[family]
    original = build()
    model = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    inputs = inputs_of(original, 0, True)
    labels = models.vlm_labels(inputs["input_ids"])
    close(model(**inputs).logits, original(**inputs).logits, "logits without labels")
    with torch.no_grad():
        out, ref = model(**inputs, labels=labels), original(**inputs, labels=labels)
    close(out.logits, ref.logits, "logits under no_grad")
    got = model(**inputs, labels=labels, return_dict=False, use_cache=False)
    expected = original(**inputs, labels=labels, return_dict=False, use_cache=False)
    assert len(got) == len(expected) and got[1] is None and isinstance(expected[1], torch.Tensor)
    close(got[0], expected[0], "loss (return_dict=False)")
    assert [type(item) for item in got[2:]] == [type(item) for item in expected[2:]]


def test_paligemma_softcapping_is_read_from_the_text_config():
    """PaliGemma 2's cap sits in ``config.text_config``: without it this tiny model's loss would differ, so the
    parity above sees that the fused loss applies it."""
    capped, uncapped = models.paligemma(), models.paligemma(softcap=None)
    inputs = models.llava_style_inputs(capped, 0)
    labels = models.vlm_labels(inputs["input_ids"])
    patched = bread_kernels.patch(copy.deepcopy(capped), fused_loss=True)
    assert abs(patched(**inputs, labels=labels).loss.item() - uncapped(**inputs, labels=labels).loss.item()) > 1e-3


def test_aya_vision_logit_scale_is_applied():
    """AyaVision's forward scales the logits by its text config's ``logit_scale``: this tiny model's loss differs
    without it, so the parity above sees that the fused loss applies it (and no other scale)."""
    scaled, unscaled = models.aya_vision(), models.aya_vision(logit_scale=1.0)
    inputs = models.llava_style_inputs(scaled, 0)
    labels = models.vlm_labels(inputs["input_ids"])
    patched = bread_kernels.patch(copy.deepcopy(scaled), fused_loss=True)
    assert abs(patched(**inputs, labels=labels).loss.item() - unscaled(**inputs, labels=labels).loss.item()) > 1e-3


def test_a_logit_scaled_head_with_a_bias_keeps_its_own_loss():
    """A head with a bias under a logit scale, ``s·(h·Wᵀ + b)``, is not the fused loss's ``(s·h)·Wᵀ + b``: refused
    under ``fused_loss=True``, naming why; by default the model's own forward (its logits, its loss)."""
    original = models.aya_vision()
    original.config.tie_word_embeddings = False
    head = original.lm_head
    original.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        original.lm_head.weight.copy_(head.weight)
        original.lm_head.bias.uniform_(-0.5, 0.5)
    _refused_and_left_its_own_loss(original, r"has a bias, which its logit scale.*fused_loss=False",
                                   "aya_vision with a biased head")


def _refused_and_left_its_own_loss(original, refusal: str, what: str) -> None:
    """``original`` (a Llava-style vision-language model) patched with ``fused_loss=True`` refuses a step with
    labels (``refusal``: the message's pattern); patched by default, it runs its own forward: its logits and loss."""
    inputs = models.llava_style_inputs(original, 0)
    labels = models.vlm_labels(inputs["input_ids"])
    required = bread_kernels.patch(copy.deepcopy(original), fused_loss=True)
    with pytest.raises(ValueError, match=refusal):
        required(**inputs, labels=labels)
    default = bread_kernels.patch(copy.deepcopy(original))
    out, expected = default(**inputs, labels=labels), original(**inputs, labels=labels)
    assert out.logits is not None
    close(out.loss, expected.loss, f"{what}: its own loss")


def test_vision_language_models_the_fused_loss_cannot_match_are_refused():
    """A soft-capping the family's forward is not known to apply (Gemma3's text config setting one) is refused
    under ``fused_loss=True`` and runs the model's own forward by default; a class outside the families (a
    subclass with a forward of its own) is refused at patch time and left unfused by default."""
    _refused_and_left_its_own_loss(models.gemma3(softcap=0.2), r"sets final_logit_softcapping.*fused_loss=False",
                                   "gemma3 with a soft-capping")

    import transformers

    class OwnLlava(transformers.LlavaForConditionalGeneration):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    own = OwnLlava(models.llava().config)
    with pytest.raises(ValueError, match=r"OwnLlava has none.*fused_loss=False"):
        bread_kernels.patch(own, fused_loss=True)
    assert not any("_bread_fused_loss" in m.__dict__ for m in bread_kernels.patch(own).modules())
