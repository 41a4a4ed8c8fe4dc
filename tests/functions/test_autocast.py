"""Every fused function under ``torch.autocast`` (HF Trainer's ``bf16=True`` / ``fp16=True``) against the unpatched
torch / peft / transformers module run under the same autocast on cloned inputs, for every Role.

The reference is always the library itself under autocast and plain autograd: ``F.linear``, peft's ``lora.Linear``,
transformers' eager ``Qwen3MoeExperts``, HF's ``F.linear`` head + ``ForCausalLMLoss``'s fp32 cross-entropy,
``nn.Embedding``.  For SGD/SIGN the reference takes autograd's ``.grad`` (the low-precision GEMM's result cast to the
parameter's dtype by autocast's cast) and applies the hand-written update ``W.add_(W.grad, alpha=-lr·s)`` /
``W.add_(W.grad.sign(), alpha=-lr·s)`` to the parameter in its own dtype.

Tolerances (``D`` = the autocast dtype, ``eps`` its machine epsilon: 2⁻⁷ for bf16, 2⁻¹⁰ for fp16):

* outputs: the fused functions call the same kernels on the same ``D`` operands, so the linear's output is compared
  bit for bit; LoRA, experts and the loss sum their terms in another order or with one rounding fewer, so they are
  compared at a few ``eps`` of the tensor's scale;
* gradients: each is one ``D`` GEMM (fp32 accumulation inside, one rounding to ``D``).  Ours and autograd's may
  order the fp32 sums differently (``gᵀx`` against ``(xᵀg)ᵀ``, row chunks of dW, fused and unfused LoRA terms),
  which moves a ``D`` result by about an ulp: ``eps`` relative to the element plus a small fraction of the tensor's
  scale for elements that cancel;
* SGD updates: ``lr·s·|ΔdW|`` with ``|ΔdW|`` the gradient tolerance above, plus the rounding of the update to the
  weight's dtype: one ulp of the update's operands, ``eps_W · max(|W before|, |W after|)`` (not of a result that
  cancelled to near 0; for a bf16 weight this also covers the default stochastic rounding, which moves it by less
  than one ulp, and the reference's ``add_``, which rounds ``alpha = -lr·s`` itself to bf16);
* SIGN updates: that rounding term alone, where the sign is decided, i.e. where ``|dW|`` is not within the gradient
  tolerance of 0 (a dW that rounds to the other sign is a legitimate difference of summation order): elements with
  ``|dW| < 1e-2 · max|dW|`` are left out.  Shapes are odd (37 × 53 with 87 tokens), and inputs are O(1), so the
  gradients are O(1..10) and far from bf16's underflow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bread_kernels import OnTheFlyUpdate, Role, WeightPlan, fused_linear
from bread_kernels.functions.embedding import fused_embedding
from bread_kernels.functions.experts import experts_gate, fused_experts
from bread_kernels.functions.head_loss import fused_head_loss
from bread_kernels.functions.lora import fused_lora_linear

N_OUT, N_IN, TOKENS = 37, 53, (3, 29)
LR, SCALE = 0.025, 2.0  # lr·s = 0.05: updates of O(0.1..1), far above an fp32 ulp of the O(1) weights
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def eps(dtype):
    return torch.finfo(dtype).eps


def close(actual, expected, what, rtol, scale_tol=0.0, mask=None):
    """``|actual - expected| <= rtol·|expected| + scale_tol·max|expected|`` elementwise (where ``mask``)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = (actual - expected).abs()
    bad = diff > rtol * expected.abs() + scale_tol * expected.abs().max() + 1e-30
    if mask is not None:
        bad &= mask
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max |diff| {diff.max():.3g} "
                           f"(max |reference| {expected.abs().max():.3g})")


def grad_close(actual, expected, what, dtype):
    close(actual, expected, what, rtol=eps(dtype), scale_tol=eps(dtype) / 4)


def updated_close(actual, expected, before, role, what, compute, weight_dtype, grad_scale_tol=None):
    """The update of a weight, ``expected`` = ``before - lr·s·f(expected.grad)`` by the reference: see the module
    docstring for the terms (``grad_scale_tol``: the gradient's tolerance relative to its scale, default eps/4)."""
    grad_scale_tol = eps(compute) / 4 if grad_scale_tol is None else grad_scale_tol
    g = expected.grad.detach().double()
    actual, expected, before = (t.detach().double() for t in (actual, expected, before))
    tol = eps(weight_dtype) * torch.maximum(before.abs(), expected.abs())
    if role is Role.SIGN:
        decided = g.abs() >= 1e-2 * g.abs().max()
    else:
        decided = torch.ones_like(g, dtype=torch.bool)
        tol = tol + LR * SCALE * (eps(compute) * g.abs() + grad_scale_tol * g.abs().max())
    diff = (actual - expected).abs()
    bad = (diff > tol) & decided
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max |diff| {diff[bad].max():.3g}"


def hand_update_(param, role) -> torch.Tensor:
    """BlockOptimizers' hook: ``p -= lr·s·f(p.grad)`` on the parameter in its own dtype; returns p before it."""
    before = param.detach().clone()
    with torch.no_grad():
        param.add_(param.grad.sign() if role is Role.SIGN else param.grad, alpha=-LR * SCALE)
    return before


def role_close(p, ref, role, name, weight_dtype, rtol, scale_tol):
    """What ``role`` leaves on weight ``p`` after the backward, against the unpatched ``ref``: ACTIVE a ``.grad`` in
    the weight's dtype within (rtol, scale_tol) of the reference's; SGD/SIGN no ``.grad`` and the reference's
    gradient applied by hand; otherwise nothing."""
    if role is Role.ACTIVE:
        assert p.grad.dtype == weight_dtype
        close(p.grad, ref.grad, name, rtol=rtol, scale_tol=scale_tol)
    elif role.updates_on_the_fly:
        assert p.grad is None
        before = hand_update_(ref, role)
        updated_close(p, ref, before, role, name, BF16, weight_dtype)
    else:
        assert p.grad is None and torch.equal(p, ref.detach())


def plan_for(role, name="w"):
    return WeightPlan(role, OnTheFlyUpdate(lr=LR, scale=SCALE) if role.updates_on_the_fly else None, name=name)


# -- fused_linear -----------------------------------------------------------------------------------------------

def linear_inputs(weight_dtype, x_dtype, compute, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N_OUT, N_IN, generator=gen).to(weight_dtype)
    bias = torch.randn(N_OUT, generator=gen).to(weight_dtype)
    x = torch.randn(*TOKENS, N_IN, generator=gen).to(x_dtype)
    grad = torch.randn(*TOKENS, N_OUT, generator=gen).to(compute)  # ∂L/∂y arrives in the output's dtype
    return weight, bias, x, grad


def run_linear_pair(role, weight_dtype, x_dtype, compute, backward_inside=False, transposed=False):
    """(fused: y, x.grad, weight, bias) and (reference: the same from F.linear under autocast) after one backward."""
    weight, bias, x, grad = linear_inputs(weight_dtype, x_dtype, compute)
    if transposed:  # GPT-2's Conv1D: an [in, out] parameter used through a transposed view
        weight = weight.t().contiguous().t()
    ref_w, ref_b, ref_x = (t.clone().requires_grad_(True) for t in (weight, bias, x))
    trains = role is not Role.FROZEN
    weight.requires_grad_(role is Role.ACTIVE)
    bias.requires_grad_(role is Role.ACTIVE)
    ref_w.requires_grad_(trains), ref_b.requires_grad_(trains)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=compute):
        y = fused_linear(x, weight, bias, plan_for(role))
        y_ref = F.linear(ref_x, ref_w, ref_b)
        if backward_inside:
            y.backward(grad)
            y_ref.backward(grad)
    if not backward_inside:
        y.backward(grad)
        y_ref.backward(grad)
    return (y, x.grad, weight, bias), (y_ref, ref_x.grad, ref_w, ref_b)


# (weight dtype, input dtype, autocast dtype): an fp32 model after an fp32 norm, a bf16 input from an earlier
# autocast GEMM, a bf16 model, and one fp16 autocast
COMBOS = [(FP32, FP32, BF16), (FP32, BF16, BF16), (BF16, FP32, BF16), (FP32, FP32, FP16)]
COMBO_IDS = ["fp32w-fp32x-bf16", "fp32w-bf16x-bf16", "bf16w-fp32x-bf16", "fp32w-fp32x-fp16"]


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("role", [Role.ACTIVE, Role.FROZEN], ids=lambda r: r.name)
def test_linear_active_and_frozen_match_f_linear(combo, role):
    weight_dtype, x_dtype, compute = combo
    (y, dx, w, b), (y_ref, dx_ref, ref_w, ref_b) = run_linear_pair(role, weight_dtype, x_dtype, compute)
    assert y.dtype == y_ref.dtype == compute
    assert torch.equal(y, y_ref)  # the same GEMM on the same operands
    assert dx.dtype == x_dtype
    assert torch.equal(dx, dx_ref)  # g · W_d: the same GEMM, cast to x's dtype
    if role is Role.ACTIVE:
        assert w.grad.dtype == weight_dtype and b.grad.dtype == weight_dtype
        grad_close(w.grad, ref_w.grad, "dW", compute)
        grad_close(b.grad, ref_b.grad, "db", compute)
    else:
        assert w.grad is None and b.grad is None
        assert torch.equal(w, ref_w.detach())


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_linear_on_the_fly_matches_autograd_and_hand_update(backend, combo, role):
    weight_dtype, x_dtype, compute = combo
    (y, dx, w, b), (y_ref, dx_ref, ref_w, ref_b) = run_linear_pair(role, weight_dtype, x_dtype, compute)
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)  # from W before its update (invariant 1)
    before = [hand_update_(p, role) for p in (ref_w, ref_b)]
    assert w.dtype == weight_dtype and w.grad is None
    updated_close(w, ref_w, before[0], role, "W", compute, weight_dtype)
    updated_close(b, ref_b, before[1], role, "b", compute, weight_dtype)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_linear_on_the_fly_in_row_chunks(monkeypatch, role):
    """A chunk budget of ~5 rows of the bf16 dW (37 rows: 8 chunks) on a transposed fp32 weight (Conv1D's)."""
    from bread_kernels.backends import get_backend

    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(5 * (N_IN * 2 + 87 * 2)))
    assert get_backend(torch.device("cpu")).chunk_rows(torch.empty(N_OUT, N_IN), 87, BF16) == 5
    (_, dx, w, b), (_, dx_ref, ref_w, ref_b) = run_linear_pair(role, FP32, FP32, BF16, transposed=True)
    assert torch.equal(dx, dx_ref)
    before = [hand_update_(p, role) for p in (ref_w, ref_b)]
    updated_close(w, ref_w, before[0], role, "W", BF16, FP32)
    updated_close(b, ref_b, before[1], role, "b", BF16, FP32)


@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD], ids=lambda r: r.name)
def test_linear_backward_inside_the_autocast_region_is_the_same(role):
    """``loss.backward()`` inside ``with autocast`` (a hand-written loop) changes nothing: the backward computes in
    the dtypes its forward recorded."""
    outside = run_linear_pair(role, FP32, FP32, BF16)[0]
    inside = run_linear_pair(role, FP32, FP32, BF16, backward_inside=True)[0]
    for a, c in zip(outside[1:], inside[1:]):
        assert torch.equal(a, c)
    if role is Role.ACTIVE:
        assert torch.equal(outside[2].grad, inside[2].grad)


def saved_by(run):
    """The tensors ``run()`` saves for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        run()
    return saved


@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD], ids=lambda r: r.name)
def test_linear_saves_the_bf16_input_and_the_weight_itself(role):
    """What autograd saves under autocast (x's bf16 cast), and no low-precision copy of W: the parameter itself."""
    weight, bias, x, _ = linear_inputs(FP32, FP32, BF16)
    weight.requires_grad_(role is Role.ACTIVE)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        saved = saved_by(lambda: fused_linear(x, weight, bias, plan_for(role)))
    assert any(t is weight for t in saved)
    assert [t.dtype for t in saved if t is not weight and t is not bias] == [BF16]  # x_d, [M, K]
    assert [tuple(t.shape) for t in saved if t.dtype == BF16] == [(*TOKENS, N_IN)]


# -- fused LoRA -------------------------------------------------------------------------------------------------

def lora_layer(base_dtype, adapter_dtype, dropout, seed=0):
    import peft

    torch.manual_seed(seed)
    host = nn.Module()
    host.proj = nn.Linear(N_IN, N_OUT)
    config = peft.LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=["proj"])
    layer = peft.inject_adapter_in_model(config, host).proj
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer.to(base_dtype)
    layer.lora_A.to(adapter_dtype)
    layer.lora_B.to(adapter_dtype)
    return layer.train()


LORA_DTYPES = {"fp32": (FP32, FP32), "bf16-base-fp32-adapters": (BF16, FP32)}  # the latter: peft's default


@pytest.mark.parametrize("dtypes", LORA_DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("role", [Role.LORA, Role.ACTIVE, Role.SGD, Role.SIGN, Role.FROZEN], ids=lambda r: r.name)
def test_lora_matches_peft_under_autocast(dtypes, dropout, role):
    """peft's forward under autocast and its autograd (every parameter trainable but a FROZEN base's, and no adapter
    for FROZEN: BREAD-partial's layers below the active block) against the fused LoRA function."""
    base_dtype, adapter_dtype = LORA_DTYPES[dtypes]
    layer = lora_layer(base_dtype, adapter_dtype, dropout)
    reference = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*TOKENS, N_IN, generator=gen)
    grad = torch.randn(*TOKENS, N_OUT, generator=gen).to(BF16)
    train_adapters = role is not Role.FROZEN
    base_trains = role not in (Role.LORA, Role.FROZEN)
    for name, p in reference.named_parameters():
        p.requires_grad_(base_trains if name.startswith("base_layer") else train_adapters)
    ref_x = x.clone().requires_grad_(True)
    torch.manual_seed(11)  # the dropout mask
    with torch.autocast("cpu", dtype=BF16):
        y_ref = reference(ref_x)
    y_ref.backward(grad)

    base = layer.base_layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for p in (a, b):
        p.requires_grad_(train_adapters)
    for p in base.parameters():
        p.requires_grad_(role is Role.ACTIVE)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(11)
    with torch.autocast("cpu", dtype=BF16):
        drop = layer.lora_dropout["default"]
        x_lora = None if isinstance(drop, nn.Identity) else drop(x.to(a.dtype))  # as patch's forward
        y = fused_lora_linear(x, x_lora, base.weight, base.bias, a, b, layer.scaling["default"], plan_for(role))
    y.backward(grad)

    assert y.dtype == y_ref.dtype == BF16
    with torch.autocast("cpu", dtype=BF16):  # the adapters' GEMM runs in bf16 too: u = x̃_d A_dᵀ is saved in bf16
        saved = saved_by(lambda: fused_lora_linear(x, x_lora, base.weight, base.bias, a, b, 1.0, plan_for(role)))
    assert [t.dtype for t in saved if t.shape[-1] == 8 and t is not b] == [BF16]
    # peft rounds u·Bᵀ, then ·s, then the sum to bf16; the fused output adds s·u·Bᵀ into the base GEMM's result
    # with one rounding: a few bf16 ulps of the output's scale
    close(y, y_ref, "y", rtol=eps(BF16), scale_tol=2 * eps(BF16))
    # dX = g W_d + s·v A_d: two bf16 GEMMs (and peft's bf16 g·s) summed in another order
    assert x.grad.dtype == FP32
    close(x.grad, ref_x.grad, "dX", rtol=2 * eps(BF16), scale_tol=2 * eps(BF16))
    refs = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        ref = refs[name]
        if name.startswith("lora_"):
            if not train_adapters:
                assert p.grad is None
                continue
            assert p.grad.dtype == adapter_dtype
            # dB = s·gᵀu (peft: (g·s)ᵀu), dA = s·vᵀx̃: bf16 GEMMs whose inputs were rounded at other points
            close(p.grad, ref.grad, name, rtol=2 * eps(BF16), scale_tol=2 * eps(BF16))
        else:  # grad_close's tolerance
            role_close(p, ref, role, name, base_dtype, rtol=eps(BF16), scale_tol=eps(BF16) / 4)


# -- fused experts ----------------------------------------------------------------------------------------------

E, H, I, T = 6, 19, 11, 23  # odd sizes; the routing never picks expert E - 1


def experts_case(weight_dtype, seed=0):
    import math

    import transformers

    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    module = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) * 3 / math.sqrt(H))
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) * 3 / math.sqrt(I))
    first = torch.randint(0, E - 1, (T,), generator=gen)
    second = (first + torch.randint(1, E - 1, (T,), generator=gen)) % (E - 1)
    index = torch.stack([first, second], 1)
    routing = torch.rand(T, 2, generator=gen) + 0.1
    x = torch.randn(T, H, generator=gen)
    grad = torch.randn(T, H, generator=gen)
    return module.to(weight_dtype), index, routing, x, grad


EXPERT_ROLES = {"active": (Role.ACTIVE, Role.ACTIVE), "sgd-sign": (Role.SGD, Role.SIGN),
                "sign-frozen": (Role.SIGN, Role.FROZEN), "frozen-sgd": (Role.FROZEN, Role.SGD)}


@pytest.mark.parametrize("weight_dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("roles", EXPERT_ROLES)
def test_experts_match_transformers_under_autocast(weight_dtype, roles):
    """fp32 hidden states (an fp32 norm's output) and fp32 routing weights, as a Qwen3-MoE layer under autocast."""
    roles = EXPERT_ROLES[roles]
    module, index, routing, x, grad = experts_case(weight_dtype)
    reference = copy.deepcopy(module)
    for p, role in zip((reference.gate_up_proj, reference.down_proj), roles):
        p.requires_grad_(role is not Role.FROZEN)
    ref_x, ref_r = x.clone().requires_grad_(True), routing.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y_ref = reference(ref_x, index, ref_r)
    y_ref.backward(grad)

    plans = tuple(plan_for(role, name) for role, name in zip(roles, ("gate_up_proj", "down_proj")))
    for p, role in zip((module.gate_up_proj, module.down_proj), roles):
        p.requires_grad_(role is Role.ACTIVE)
    x, routing = x.clone().requires_grad_(True), routing.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y = fused_experts(x, index, routing, module.gate_up_proj, module.down_proj, plans, experts_gate(module))
    y.backward(grad)

    assert y.dtype == y_ref.dtype == FP32  # the scatter into zeros_like(x)
    # the same bf16 GEMMs and gate on the same operands; the top-k sum into x's dtype in another order
    close(y, y_ref, "y", rtol=eps(FP32) * 4, scale_tol=eps(FP32) * 4)
    # ∂x, ∂r: chains of two bf16 GEMMs and the gate's backward, each rounded to bf16 once (as autograd's)
    close(x.grad, ref_x.grad, "dx", rtol=2 * eps(BF16), scale_tol=eps(BF16))
    close(routing.grad, ref_r.grad, "d routing", rtol=2 * eps(BF16), scale_tol=eps(BF16))
    for name, role in zip(("gate_up_proj", "down_proj"), roles):
        role_close(getattr(module, name), getattr(reference, name), role, name, weight_dtype,
                   rtol=2 * eps(BF16), scale_tol=eps(BF16))
    assert torch.equal(module.gate_up_proj[E - 1], reference.gate_up_proj[E - 1].detach())  # no token: untouched


@pytest.mark.parametrize("active", [0, 1])
def test_grouped_mm_experts_compute_in_the_weights_dtype_under_autocast_as_transformers_does(active):
    """transformers' default experts implementation (grouped_mm) is not autocast-enabled: it casts the input to the
    weights' dtype, so an fp32 model's experts run in fp32 under autocast.  The fused experts ran them in bf16 (the
    eager rule): the experts' dW off by 5e-3, the loss by 4e-5, by which block was active."""
    import transformers

    import bread_kernels

    def model():
        config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=44, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(config).train()

    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for patched in (False, True):
        m = model()
        assert m.config._experts_implementation == "grouped_mm"
        if patched:
            bread_kernels.patch(m)
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), list(m.named_parameters()),
                                           switch_mode="fixed", start_block=active, verbose=0)
        with torch.autocast("cpu", dtype=BF16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), m.model.layers[active].mlp.experts.down_proj.grad.clone()))
        opt.close()
    (loss_ref, grad_ref), (loss, grad) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


# -- fused head + loss ------------------------------------------------------------------------------------------

V, HID, T_LOSS = 97, 16, 26


@pytest.mark.parametrize("weight_dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("role", [None, Role.ACTIVE, Role.SGD, Role.SIGN, Role.FROZEN],
                         ids=lambda r: r.name if r else "none")
def test_head_loss_matches_hf_under_autocast(weight_dtype, softcap, role):
    """The reference is the unpatched causal LM's arithmetic under autocast: ``F.linear`` (bf16 logits), Gemma2's
    soft-capping in bf16, ``logits.float()`` and the fp32 cross-entropy; odd chunks (5 tokens, 3 vocabulary rows)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T_LOSS, HID, generator=gen)  # the final norm's fp32 output
    weight = (torch.randn(V, HID, generator=gen) * 2).to(weight_dtype)  # logits O(10): a peaked softmax
    bias = torch.randn(V, generator=gen).to(weight_dtype)
    targets = torch.randint(0, V, (T_LOSS,), generator=gen)
    targets[::4] = -100
    gamma = 100.0  # the loss scaled before the backward; large enough that SGD moves a bf16 head by several ulps

    h_ref, w_ref, b_ref = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    for p in (w_ref, b_ref):
        p.requires_grad_(role is not Role.FROZEN)
    with torch.autocast("cpu", dtype=BF16):
        z = F.linear(h_ref, w_ref, b_ref)
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        loss_ref = F.cross_entropy(z.float(), targets, ignore_index=-100)
    assert z.dtype == BF16
    (gamma * loss_ref).backward()

    h, w, b = hidden.clone().requires_grad_(True), weight.clone(), bias.clone()
    for p in (w, b):
        p.requires_grad_(role in (None, Role.ACTIVE))
    plan = plan_for(role, "head") if role is not None else None
    with torch.autocast("cpu", dtype=BF16):
        loss = fused_head_loss(h, w, b, targets, plan, softcap=softcap, chunk_bytes=5 * V * 12)
    (gamma * loss).backward()

    assert loss.dtype == FP32
    # the same bf16 logits, then fp32: the loss sums the tokens in chunks
    close(loss, loss_ref, "loss", rtol=1e-6)
    # dh = g·W_d, dW = gᵀh_d: bf16 GEMMs of the same bf16 g (γ applied before, or after, its rounding to bf16);
    # dW accumulates its chunks' bf16 GEMMs in fp32
    close(h.grad, h_ref.grad, "dh", rtol=2 * eps(BF16), scale_tol=eps(BF16))
    if role in (None, Role.ACTIVE):
        assert w.grad.dtype == weight_dtype
        close(w.grad, w_ref.grad, "dW", rtol=2 * eps(BF16), scale_tol=eps(BF16))
        close(b.grad, b_ref.grad, "db", rtol=2 * eps(BF16), scale_tol=eps(BF16))
    elif role.updates_on_the_fly:
        assert w.grad is None
        before = [hand_update_(p, role) for p in (w_ref, b_ref)]
        # the on-the-fly head recomputes each vocabulary tile's bf16 logits with a GEMM over the tile's rows, which
        # may round a logit to the neighbouring bf16 value of the forward's whole GEMM: a probability, hence its δ,
        # moves by ~eps·|z|·p, so dW's tolerance is eps/2 of its scale (not eps/4)
        updated_close(w, w_ref, before[0], role, "W", BF16, weight_dtype, grad_scale_tol=eps(BF16) / 2)
        updated_close(b, b_ref, before[1], role, "b", BF16, weight_dtype, grad_scale_tol=eps(BF16) / 2)
    else:
        assert torch.equal(w, weight) and torch.equal(b, bias)


# -- fused embedding: autocast does not apply to F.embedding ----------------------------------------------------

@pytest.mark.parametrize("role", [Role.ACTIVE, Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_embedding_is_untouched_by_autocast(role):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(V, HID, generator=gen)
    ids = torch.randint(0, V, (3, 11), generator=gen)
    grad = torch.randn(3, 11, HID, generator=gen)
    reference = nn.Embedding(V, HID, _weight=table.clone())
    with torch.autocast("cpu", dtype=BF16):
        y_ref = reference(ids)
    y_ref.backward(grad)
    weight = table.clone().requires_grad_(role is Role.ACTIVE)
    with torch.autocast("cpu", dtype=BF16):
        y = fused_embedding(ids, weight, plan_for(role))
    y.backward(grad)
    assert y.dtype == y_ref.dtype == FP32 and torch.equal(y, y_ref)
    if role is Role.ACTIVE:
        torch.testing.assert_close(weight.grad, reference.weight.grad)  # fp32 sums in another order
    else:
        hand_update_(reference.weight, role)
        torch.testing.assert_close(weight, reference.weight.detach())


_AUTOCAST_TYPES = ["cpu", "cuda", "xpu", "hpu", "xla", "ipu", "mtia", "maia", "mps", "privateuseone"]


@pytest.mark.parametrize("device_type", [t for t in _AUTOCAST_TYPES if torch.amp.is_autocast_available(t)])
def test_torch_any_autocast_query_covers_every_type_but_the_ones_asked_by_type(device_type, monkeypatch):
    """``autocast_dtype`` trusts torch's one-call query for every autocast device type but :data:`QUERY_MISSES`,
    which it asks by type where this process has such a device (the current accelerator): this fails if torch
    changes which types the query covers."""
    from bread_kernels.functions import autocast as module

    accelerator = torch.accelerator.current_accelerator()
    assert module._ASKED_BY_TYPE == module.QUERY_MISSES & {getattr(accelerator, "type", None)}
    monkeypatch.setattr(module, "_ASKED_BY_TYPE", module.QUERY_MISSES)  # as on a machine with that device
    enabled = torch.is_autocast_enabled(device_type)
    torch.set_autocast_enabled(device_type, True)
    try:
        assert torch._C._is_any_autocast_enabled() is (device_type not in module.QUERY_MISSES), device_type
        assert module.autocast_dtype(torch.device(device_type)) is torch.get_autocast_dtype(device_type)
    finally:
        torch.set_autocast_enabled(device_type, enabled)
    assert module.autocast_dtype(torch.device(device_type)) is None


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_autocast_dtype_follows_torch_through_its_any_autocast_query(device_type):
    """``autocast_dtype`` answers None at once where torch's private ``_is_any_autocast_enabled`` says no autocast is
    on: this fails if torch drops or changes that query (an autocast for one device type, or a nested disabled one,
    must still be seen)."""
    from bread_kernels.functions import autocast as module

    assert module._any_autocast_enabled is torch._C._is_any_autocast_enabled
    device = torch.device(device_type)
    assert not torch._C._is_any_autocast_enabled() and module.autocast_dtype(device) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch._C._is_any_autocast_enabled()
        expected = torch.bfloat16 if device_type == "cpu" else None
        assert module.autocast_dtype(device) is expected
        with torch.autocast("cpu", enabled=False):
            assert module.autocast_dtype(device) is None
            assert module.outside_autocast(device) is module._NO_CONTEXT
    assert module.autocast_dtype(device) is None
