"""The fused SwiGLU product against autograd's ``silu(a) · u`` (bit for bit) and float64; which MLPs
``fusable_swiglu_mlp`` accepts."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from bread_kernels.functions.swiglu import fusable_swiglu_mlp, silu_mul, swiglu_mlp

MIXES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.bfloat16, torch.float32)]


def _inputs(a_dtype, u_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(3, 7, 45, generator=gen) * 3).to(a_dtype)  # odd width; past silu's bend on both sides
    u = torch.randn(3, 7, 45, generator=gen).to(u_dtype)
    return a, u, torch.randn(3, 7, 45, generator=gen)


@pytest.mark.parametrize("a_dtype,u_dtype", MIXES, ids=lambda d: str(d)[6:])
def test_product_and_gradients_are_autograds_bit_for_bit(a_dtype, u_dtype):
    a, u, g = _inputs(a_dtype, u_dtype)
    results = []
    for forward in (lambda a, u: F.silu(a) * u, silu_mul):
        a_, u_ = a.clone().requires_grad_(), u.clone().requires_grad_()
        h = forward(a_, u_)
        h.backward(g.to(h.dtype))
        results.append((h, a_.grad, u_.grad))
    for fused, plain in zip(results[1], results[0]):
        assert fused.dtype == plain.dtype
        assert torch.equal(fused, plain)


def test_gradients_match_float64():
    a, u, g = _inputs(torch.float32, torch.float32)
    a, u = a.requires_grad_(), u.requires_grad_()
    silu_mul(a, u).backward(g)
    a64, u64 = a.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    (a64 * torch.sigmoid(a64) * u64).backward(g.double())
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.grad.double(), u64.grad, rtol=1e-5, atol=1e-6)


def test_only_the_inputs_are_saved():
    a, u, _ = _inputs(torch.bfloat16, torch.bfloat16)
    a, u = a.requires_grad_(), u.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        silu_mul(a, u)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {a.data_ptr(), u.data_ptr()}
    with torch.no_grad():
        assert silu_mul(a, u).grad_fn is None


@pytest.mark.parametrize("a_dtype,u_dtype", MIXES, ids=lambda d: str(d)[6:])
def test_the_backward_writes_du_over_silu(a_dtype, u_dtype):
    """du is written over the [.., I] buffer of ``silu(a)``: three allocations of that size where a dtype-matched
    backward's ops would make four (their results counted with a dispatch mode: outputs that share no input's
    storage); da is ``silu_backward``'s own output, the op autograd calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    a, u, g = _inputs(a_dtype, u_dtype)
    a, u = a.requires_grad_(), u.requires_grad_()
    h = silu_mul(a, u)
    g = g.to(h.dtype)
    fresh = []

    class Fresh(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in [*args, *(kwargs or {}).values()]
                      if isinstance(t, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.shape == a.shape and \
                    out.untyped_storage().data_ptr() not in inputs:
                fresh.append(func)
            return out

    with Fresh():
        h.backward(g)
    # mixed: silu(a) in a's dtype cannot take the product in h's (one more), and g·u is cast to a's dtype
    assert len(fresh) == (3 if a_dtype == u_dtype else 5), fresh


@pytest.mark.parametrize("a_dtype,u_dtype", MIXES, ids=lambda d: str(d)[6:])
def test_under_a_dispatch_mode_the_gradients_are_still_autograds(a_dtype, u_dtype):
    """A dispatch mode around the backward (``FlopCounterMode``, which Trainer-side tooling runs, decomposes
    ``silu_backward`` but not its ``out=`` form) sees the ops autograd's own backward calls, so the gradients stay
    autograd's bit for bit there too."""
    from torch.utils.flop_counter import FlopCounterMode

    a, u, g = _inputs(a_dtype, u_dtype)
    results = []
    for forward in (lambda a, u: F.silu(a) * u, silu_mul):
        a_, u_ = a.clone().requires_grad_(), u.clone().requires_grad_()
        h = forward(a_, u_)
        with FlopCounterMode(display=False):
            h.backward(g.to(h.dtype))
        results.append((a_.grad, u_.grad))
    for fused, plain in zip(*results):
        assert torch.equal(fused, plain)


def test_broadcast_operands_get_autograds_gradients():
    """``a`` broadcast against ``u`` (its gradient summed back to its shape by autograd): the product's gradient is
    the larger shape, so du is not written into ``silu(a)``'s buffer; du is autograd's bit for bit, da to fp32
    rounding (autograd sums over the broadcast rows before silu's derivative, the fused backward after it)."""
    a, u, g = _inputs(torch.float32, torch.float32)
    a = a[:, :1]
    results = []
    for forward in (lambda a, u: F.silu(a) * u, silu_mul):
        a_, u_ = a.clone().requires_grad_(), u.clone().requires_grad_()
        forward(a_, u_).backward(g)
        results.append((a_.grad, u_.grad))
    (fused_a, fused_u), (plain_a, plain_u) = results[1], results[0]
    assert torch.equal(fused_u, plain_u)
    torch.testing.assert_close(fused_a, plain_a, rtol=1e-5, atol=1e-6)


def test_a_double_backward_through_the_product_is_autograds():
    """With ``create_graph=True`` the backward's ops are recorded (out-of-place, and silu's derivative in the ops
    autograd differentiates, as autograd's own): second derivatives equal plain autograd's to fp32 rounding (the
    double backward sums the two gradients' contributions in the other order)."""
    a, u, g = _inputs(torch.float32, torch.float32)
    results = []
    for forward in (lambda a, u: F.silu(a) * u, silu_mul):
        a_, u_ = a.clone().requires_grad_(), u.clone().requires_grad_()
        grad_a, grad_u = torch.autograd.grad(forward(a_, u_), (a_, u_), g, create_graph=True)
        results.append(torch.autograd.grad((grad_a * grad_u).sum(), (a_, u_)))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def _config(act="silu"):
    return LlamaConfig(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_key_value_heads=4, hidden_act=act)


class _GateOnTheUpProjection(LlamaMLP):  # silu on the other projection: not what swiglu_mlp computes
    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_probe_accepts_swiglu_mlps_only(dtype):
    torch.manual_seed(0)
    assert fusable_swiglu_mlp(LlamaMLP(_config()).to(dtype))
    assert fusable_swiglu_mlp(Qwen2MLP(_config()).to(dtype))
    assert not fusable_swiglu_mlp(LlamaMLP(_config("gelu")).to(dtype))
    assert not fusable_swiglu_mlp(_GateOnTheUpProjection(_config()).to(dtype))
    with torch.device("meta"):
        assert not fusable_swiglu_mlp(LlamaMLP(_config()))
    mlp = LlamaMLP(_config()).to(dtype)
    x = torch.randn(5, 24, dtype=dtype)
    assert torch.equal(swiglu_mlp(mlp, x), mlp(x))


class _Clamped(LlamaMLP):  # a swiglu_limit: equal to the plain product only where activations are small
    def forward(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x)).clamp(max=10.0)) * self.up_proj(x).clamp(-10, 10))


class _DropoutAfter(LlamaMLP):  # a residual dropout: equal in evaluation mode only
    def __init__(self, config):
        super().__init__(config)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def test_the_probe_meets_clamps_and_training_mode_dropout():
    torch.manual_seed(0)
    assert not fusable_swiglu_mlp(_Clamped(_config()))
    evaluating = _DropoutAfter(_config()).eval()
    assert not fusable_swiglu_mlp(evaluating)
    assert not evaluating.training and not evaluating.dropout.training  # its modes are restored
