"""The fused RMSNorm against Hugging Face's modules under plain autograd (bit for bit: forward, dx, dw, and the
residual stream's fp32 sum) and against float64; which modules ``fusable_rms_norm`` accepts."""

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from bread_kernels.functions.rms_norm import fusable_rms_norm, rms_norm

K = 77  # odd: no vectorised tail hides a wrong reduction
MIXES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.bfloat16, torch.float32)]  # (x, weight): the last one is an fp32 weight under a bf16 stream


def _norm(cls=LlamaRMSNorm, dtype=torch.float32, eps=1e-6, seed=0):
    norm = cls(K, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(K, generator=torch.Generator().manual_seed(seed)) * 0.3 + 1)
    return norm


def _inputs(x_dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, K, generator=gen) * 2
    x[1] *= 1e-3  # rows where ε weighs
    return x.to(x_dtype), torch.randn(3, 11, K, generator=gen)


@pytest.mark.parametrize("x_dtype,w_dtype", MIXES, ids=lambda d: str(d)[6:])
def test_forward_and_gradients_are_autograds_bit_for_bit(x_dtype, w_dtype):
    norm = _norm(dtype=w_dtype)
    x, g = _inputs(x_dtype)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = norm(x_ref)
    y_fused = rms_norm(x_fused, norm.weight, norm.variance_epsilon)
    assert y_fused.dtype == y_ref.dtype
    assert torch.equal(y_fused, y_ref)
    g = g.to(y_ref.dtype)
    dw_ref, = torch.autograd.grad(y_ref, norm.weight, g, retain_graph=True)
    dw_fused, = torch.autograd.grad(y_fused, norm.weight, g, retain_graph=True)
    y_ref.backward(g)
    y_fused.backward(g)
    assert torch.equal(dw_fused, dw_ref)
    assert torch.equal(x_fused.grad, x_ref.grad)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_residual_stream_sums_the_gradients_as_autograd_does(x_dtype):
    """``h = x + norm(x)·v`` (a pre-norm block's residual): x's gradient is the sum of three (fp32: the residual's
    and the norm's two paths, in autograd's order) — bit for bit."""
    norm = _norm(dtype=x_dtype)
    x, g = _inputs(x_dtype)
    v = torch.randn(K, dtype=x_dtype)
    grads = []
    for forward in (norm, lambda t: rms_norm(t, norm.weight, norm.variance_epsilon)):
        leaf = x.clone().requires_grad_()
        (leaf + forward(leaf) * v).backward(g.to(x_dtype))
        grads.append(leaf.grad)
    assert torch.equal(grads[1], grads[0])


def test_gradients_match_float64():
    norm = _norm(dtype=torch.float32)
    x, g = _inputs(torch.float32)
    x = x.requires_grad_()
    rms_norm(x, norm.weight, norm.variance_epsilon).backward(g)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)  # fp32, one cancelling sum
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_without_gradients_it_builds_no_graph():
    norm = _norm()
    x, _ = _inputs(torch.float32)
    assert rms_norm(x, norm.weight.detach(), 1e-6).grad_fn is None
    with torch.no_grad():
        assert rms_norm(x, norm.weight, 1e-6).grad_fn is None


class _MultipliesBeforeTheCast(LlamaRMSNorm):  # OLMo/Cohere-style: (w · x̂) cast, not w · cast(x̂)
    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(dtype)


class _OtherEpsilon(LlamaRMSNorm):  # reads ε from elsewhere than the attribute the probe trusts
    def forward(self, hidden_states):
        h = hidden_states.to(torch.float32)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-3)).to(hidden_states.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_probe_accepts_llama_style_norms_only(dtype):
    assert fusable_rms_norm(_norm(LlamaRMSNorm, dtype))
    assert fusable_rms_norm(_norm(Qwen2RMSNorm, dtype))
    assert not fusable_rms_norm(_norm(GemmaRMSNorm, dtype))  # (1 + w)
    assert not fusable_rms_norm(_norm(_MultipliesBeforeTheCast, dtype))
    assert not fusable_rms_norm(_norm(_OtherEpsilon, dtype))
    assert not fusable_rms_norm(nn.LayerNorm(K).to(dtype))
    with torch.device("meta"):
        assert not fusable_rms_norm(LlamaRMSNorm(K))
    partitioned = _norm()  # what a ZeRO-3-partitioned weight looks like outside its gather
    partitioned.weight.data = torch.empty(0)
    assert not fusable_rms_norm(partitioned)


def test_the_probe_is_not_fooled_by_a_fresh_weight_of_ones_nor_by_the_output_dtype():
    """A fresh norm's weight is all ones, where ``d(w·x̂)`` and ``w·d(x̂)`` agree; the probe uses a random weight.
    ``torch.equal`` ignores dtypes; the probe compares them."""
    fresh = _MultipliesBeforeTheCast(K).to(torch.bfloat16)
    assert torch.equal(fresh.weight, torch.ones_like(fresh.weight))
    assert not fusable_rms_norm(fresh)
    assert not fusable_rms_norm(_MultipliesBeforeTheCast(K))  # fp32 weight: a bf16 probe's dtypes differ
    state = torch.random.get_rng_state()
    assert fusable_rms_norm(LlamaRMSNorm(K))
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe draws from its own generator


def test_a_1d_input_gets_autograds_gradients():
    norm = _norm()
    x = torch.randn(K, requires_grad=True)
    rms_norm(x, norm.weight, 1e-6).backward(torch.ones(K))
    x_ref = x.detach().clone().requires_grad_()
    dw = norm.weight.grad.clone()
    norm.weight.grad = None
    norm(x_ref).backward(torch.ones(K))
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(dw, norm.weight.grad)


@pytest.mark.parametrize("x_dtype,w_dtype", MIXES, ids=lambda d: str(d)[6:])
def test_a_double_backward_through_the_norm_is_autograds(x_dtype, w_dtype):
    """With ``create_graph=True`` the backward records out-of-place ops and takes ``r`` from x again (the saved
    ``r`` has no graph), so second derivatives (a gradient penalty through a patched model) are the module's under
    plain autograd, to rounding.  Before, fp32 raised (an in-place write of a tensor the graph saved) and a graph
    through the saved ``r`` would have missed its dependence on x."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 29, generator=gen) * 2).to(x_dtype)
    w = (torch.randn(29, generator=gen) * 0.5 + 1).to(w_dtype)
    g = torch.randn(3, 5, 29, generator=gen).to(torch.promote_types(x_dtype, w_dtype))
    def plain(x, w):  # LlamaRMSNorm's forward, under plain autograd
        x_f = x.to(torch.float32)
        return w * (x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    results = []
    for norm in (plain, lambda x, w: rms_norm(x, w, 1e-6)):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        grad_x, grad_w = torch.autograd.grad(norm(x_, w_), (x_, w_), g, create_graph=True)
        results.append(torch.autograd.grad((grad_x.float().square().sum() + grad_w.float().square().sum()), (x_, w_)))
    rtol = 1e-5 if x_dtype == w_dtype == torch.float32 else 2e-2
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused.float(), plain.float(), rtol=rtol, atol=rtol)
