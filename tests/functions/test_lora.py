"""The fused LoRA linear against peft's own autograd: output, dX, A.grad, B.grad, and the base weight's Role."""

import copy

import peft
import pytest
import torch
from torch import nn

from bread_kernels import OnTheFlyUpdate, Role, WeightPlan
from bread_kernels.functions.lora import fused_lora_linear

N_OUT, N_IN = 37, 53
TOKENS = (3, 29)
STEP = 0.05


class Host(nn.Module):
    """The smallest module peft can put one LoRA layer on."""

    def __init__(self, conv1d: bool, bias: bool):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(N_OUT, N_IN)  # weight [in, out], GPT-2's layout
            if not bias:
                self.proj.bias = None
        else:
            self.proj = nn.Linear(N_IN, N_OUT, bias=bias)


def make_layer(rank, dropout, conv1d=False, bias=True, rslora=False, dtype=torch.float32, adapter_dtype=None,
               device="cpu", seed=0):
    """A peft lora.Linear (random A and B, so every gradient is non-trivial) on a seeded base layer."""
    torch.manual_seed(seed)
    host = Host(conv1d, bias)
    config = peft.LoraConfig(r=rank, lora_alpha=3 * rank, lora_dropout=dropout, target_modules=["proj"],
                             fan_in_fan_out=conv1d, use_rslora=rslora)
    layer = peft.inject_adapter_in_model(config, host).proj
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer.to(device=device, dtype=dtype)
    if adapter_dtype is not None:  # peft's autocast_adapter_dtype: fp32 adapters on a low-precision base
        layer.lora_A.to(adapter_dtype)
        layer.lora_B.to(adapter_dtype)
    layer.train()
    return layer


def run_peft(layer, x, grad_out, seed):
    """peft's forward and plain autograd; every parameter trainable."""
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)  # the dropout mask
    y = layer(x)
    y.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def run_fused(layer, x, grad_out, seed, role, conv1d, train_adapters=True):
    x = x.detach().clone().requires_grad_(True)
    base = layer.base_layer
    weight = base.weight.t() if conv1d else base.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for p in (a, b):
        p.requires_grad_(train_adapters)
    for p in base.parameters():
        p.requires_grad_(role is Role.ACTIVE)
    update = OnTheFlyUpdate(lr=STEP) if role.updates_on_the_fly else None
    plan = WeightPlan(role, update, name="proj")
    torch.manual_seed(seed)
    dropout = layer.lora_dropout["default"]
    x_lora = None if isinstance(dropout, nn.Identity) else dropout(x.to(a.dtype))
    y = fused_lora_linear(x, x_lora, weight, base.bias, a, b, layer.scaling["default"], plan)
    y.backward(grad_out)
    return y.detach(), x.grad


def inputs(dtype, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*TOKENS, N_IN, generator=gen).to(dtype).to(device)
    g = torch.randn(*TOKENS, N_OUT, generator=gen).to(dtype).to(device)
    return x, g


def assert_close(actual, expected, what, dtype=torch.float32):
    """fp32: 1e-5 relative to the tensor's scale (its largest element): the two sides sum the same products in
    different orders, so an element that cancels to near zero carries the rounding of its larger terms."""
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    atol = rel * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_adapter_gradients_match_peft(backend, device, rank, dropout, conv1d):
    """Frozen base weight (Role.LORA): dX, A.grad and B.grad equal peft's; the base weight gets nothing."""
    layer = make_layer(rank, dropout, conv1d=conv1d, device=device)
    x, g = inputs(torch.float32, device)
    y_ref, dx_ref, grads_ref = run_peft(copy.deepcopy(layer), x, g, seed=11)
    y, dx = run_fused(layer, x, g, seed=11, role=Role.LORA, conv1d=conv1d)
    assert_close(y, y_ref, "output")
    assert_close(dx, dx_ref, "dX")
    for name in ("lora_A.default.weight", "lora_B.default.weight"):
        assert_close(dict(layer.named_parameters())[name].grad, grads_ref[name], name)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
def test_active_base_weight_gets_its_gradient_too(backend, device, dropout):
    layer = make_layer(8, dropout, rslora=True, device=device)
    x, g = inputs(torch.float32, device)
    _, dx_ref, grads_ref = run_peft(copy.deepcopy(layer), x, g, seed=5)
    _, dx = run_fused(layer, x, g, seed=5, role=Role.ACTIVE, conv1d=False)
    assert_close(dx, dx_ref, "dX")
    for name, p in layer.named_parameters():
        assert_close(p.grad, grads_ref[name], name)


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
def test_on_the_fly_base_update_with_trained_adapters(backend, device, role):
    """sgd_mode on a LoRA model: the base weight takes W -= lr·f(dW) (dW = gᵀx, from the weight before the update)
    while A and B get peft's gradients."""
    layer = make_layer(8, 0.0, device=device)
    x, g = inputs(torch.float32, device)
    reference = copy.deepcopy(layer)
    _, dx_ref, grads_ref = run_peft(reference, x, g, seed=0)
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    expected_w = reference.base_layer.weight.detach().double() - STEP * f(grads_ref["base_layer.weight"].double())
    expected_b = reference.base_layer.bias.detach().double() - STEP * f(grads_ref["base_layer.bias"].double())
    _, dx = run_fused(layer, x, g, seed=0, role=role, conv1d=False)
    assert_close(dx, dx_ref, "dX")
    assert_close(layer.base_layer.weight.detach(), expected_w, "updated W")
    assert_close(layer.base_layer.bias.detach(), expected_b, "updated b")
    assert layer.base_layer.weight.grad is None
    for name in ("lora_A.default.weight", "lora_B.default.weight"):
        assert_close(dict(layer.named_parameters())[name].grad, grads_ref[name], name)


def test_frozen_adapters_still_give_dx(backend, device):
    """Adapters below BREAD-partial's active block are frozen: only dX flows (through W and B·A)."""
    layer = make_layer(8, 0.0, device=device)
    x, g = inputs(torch.float32, device)
    _, dx_ref, _ = run_peft(copy.deepcopy(layer), x, g, seed=0)
    _, dx = run_fused(layer, x, g, seed=0, role=Role.FROZEN, conv1d=False, train_adapters=False)
    assert_close(dx, dx_ref, "dX")
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
def test_bf16_base_with_fp32_adapters(backend, device, dropout):
    """peft's default on a bf16 model (autocast_adapter_dtype): the adapter path runs in fp32 (without dropout the
    native backend reads the bf16 x̃ and g as they are)."""
    layer = make_layer(8, dropout, dtype=torch.bfloat16, adapter_dtype=torch.float32, device=device)
    x, g = inputs(torch.bfloat16, device)
    y_ref, dx_ref, grads_ref = run_peft(copy.deepcopy(layer), x, g, seed=2)
    y, dx = run_fused(layer, x, g, seed=2, role=Role.LORA, conv1d=False)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)  # the same ops in the same order
    assert_close(dx, dx_ref, "dX", torch.bfloat16)
    for name in ("lora_A.default.weight", "lora_B.default.weight"):
        p = dict(layer.named_parameters())[name]
        assert p.grad.dtype == torch.float32
        # g is bf16, so the fp32 adapter gradients agree to bf16-input GEMM accuracy
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-4, atol=1e-4)


def test_a_double_backward_differentiates_every_path(backend, device):
    """create_graph=True through a bf16 layer with fp32 adapters: dX and dA as functions of g are peft's (the native
    backend's C++ sums have no derivative, so a backward that builds a graph runs torch's ops)."""
    layer = make_layer(4, 0.0, dtype=torch.bfloat16, adapter_dtype=torch.float32, device=device)
    x, g = inputs(torch.bfloat16, device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def second_order(y, x):
        grad = g.detach().clone().requires_grad_(True)
        dx, da = torch.autograd.grad(y, (x, a), grad, create_graph=True)
        return torch.autograd.grad(dx.float().square().sum() + da.square().sum(), grad)[0]

    x_ref = x.detach().clone().requires_grad_(True)
    expected = second_order(layer(x_ref), x_ref)
    x_fused = x.detach().clone().requires_grad_(True)
    plan = WeightPlan(Role.LORA, name="proj")
    y = fused_lora_linear(x_fused, None, layer.base_layer.weight, layer.base_layer.bias, a, b,
                          layer.scaling["default"], plan)
    assert_close(second_order(y, x_fused), expected, "d(|dX|² + |dA|²)/dg", torch.bfloat16)


def test_bad_adapter_shapes_are_refused():
    layer = make_layer(4, 0.0)
    x, _ = inputs(torch.float32, "cpu")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    plan = WeightPlan(Role.LORA)
    with pytest.raises(ValueError, match="adapter shapes"):
        fused_lora_linear(x, None, layer.base_layer.weight, None, b, a, 1.0, plan)
    with pytest.raises(TypeError, match="lora_A is torch.float32 but lora_B is torch.bfloat16"):
        fused_lora_linear(x, None, layer.base_layer.weight, None, a, b.bfloat16(), 1.0, plan)
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, float("nan"), plan)
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, True, plan)
    with pytest.raises(TypeError, match="x_lora must be None .* or a tensor, got float"):
        fused_lora_linear(x, 1.0, layer.base_layer.weight, None, a, b, 1.0, plan)


def test_a_numpy_scaling_is_a_number():
    """``scaling`` computed with numpy (``np.float32(alpha) / r``) gives what the same Python float gives."""
    import numpy as np

    layer = make_layer(4, 0.0)
    x, _ = inputs(torch.float32, "cpu")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    args = (x, None, layer.base_layer.weight, None, a, b)
    expected = fused_lora_linear(*args, 0.5, WeightPlan(Role.LORA))
    assert torch.equal(fused_lora_linear(*args, np.float32(2.0) / 4, WeightPlan(Role.LORA)), expected)


@pytest.mark.parametrize("role", [Role.SGD, Role.FROZEN], ids=lambda r: r.name)
def test_output_may_be_modified_in_place(backend, device, role):
    """A model may add into a LoRA layer's output in place, as into peft's (Falcon's ``mlp_output +=
    attention_output``): the same output and input gradient as peft's forward with plain autograd."""
    layer = make_layer(8, 0.0, device=device)
    x, grad_out = inputs(torch.float32, device)
    residual = torch.randn(*TOKENS, N_OUT, generator=torch.Generator().manual_seed(9)).to(device)
    ref_x = x.clone().requires_grad_(True)
    expected = layer(ref_x)
    expected = expected + residual
    expected.backward(grad_out)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x.requires_grad_(True)
    plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP) if role.updates_on_the_fly else None, name="proj")
    y = fused_lora_linear(x, None, layer.base_layer.weight, layer.base_layer.bias, a.detach(), b.detach(),
                          layer.scaling["default"], plan)
    y += residual
    assert_close(y, expected, "output")
    y.backward(grad_out)
    assert_close(x.grad, ref_x.grad, "dX")


def test_a_misspelt_lora_kernel_choice_is_refused_at_the_forward(monkeypatch):
    """``BREAD_LORA_KERNEL=trition`` silently kept cuBLAS's GEMMs (a benchmark of the kernel measured them); it is
    refused at the forward, before a backward writes anything, on every device."""
    layer = make_layer(4, 0.0)
    x, _ = inputs(torch.float32, "cpu")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    monkeypatch.setenv("BREAD_LORA_KERNEL", "trition")
    with pytest.raises(ValueError, match="BREAD_LORA_KERNEL='trition' is not a choice; use 'triton'"):
        fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, 1.0, WeightPlan(Role.LORA))
    for choice in ("Triton", ""):
        monkeypatch.setenv("BREAD_LORA_KERNEL", choice)
        fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, 1.0, WeightPlan(Role.LORA))
