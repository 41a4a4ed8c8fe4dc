"""The fused RMSNorm and SwiGLU Functions on the Triton backend (under the interpreter on a CPU): one kernel each
way in place of torch's ops, values within fp32 rounding of autograd's module, a kept block's rebuild equal to the
kernel's output bit for bit, and torch's ops (autograd's values bit for bit) wherever the kernels do not serve: the
CPU backends, tensors they do not take, a double backward."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bread_kernels.backends.elementwise import elementwise_backend
from bread_kernels.functions.rebuild import _live_recipe, rebuilding_outputs
from bread_kernels.functions.rms_norm import rms_norm
from bread_kernels.functions.swiglu import silu_mul
from bread_kernels.kernels.rms_norm import MAX_COLUMNS

from ..aten_ops import AtenOps
from ..conftest import DEVICE

#: the torch ops each Function runs on the CPU backends, none of which its kernels run (the norm's backward sums its
#: kernel programs' partial ∂L/∂w with one ``sum``)
NORM_OPS = {"pow", "mean", "rsqrt", "mul"}
PRODUCT_OPS = {"silu", "silu_backward", "mul"}

RTOL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "triton")


def _norm_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 7, 45, generator=gen) * 3).to(device=DEVICE, dtype=dtype)
    w = (torch.randn(45, generator=gen) * 0.5 + 1).to(device=DEVICE, dtype=dtype)
    return x, w, torch.randn(3, 7, 45, generator=gen).to(device=DEVICE, dtype=dtype)


def _product_case(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a, u, g = ((torch.randn(3, 7, 45, generator=gen) * 3).to(device=DEVICE, dtype=dtype) for _ in range(3))
    return a, u, g


def _run(function, inputs, grad):
    """``function(*inputs)`` and the gradients of every input, recording each phase's aten ops."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with AtenOps() as forward_ops:
        out = function(*leaves)
    with AtenOps() as backward_ops:
        grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads, set(forward_ops.names), set(backward_ops.names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_the_triton_backend_runs_a_kernel_each_way_within_rounding_of_autograds_module(triton_backend, dtype):
    x, w, g = _norm_case(dtype)
    module = LlamaRMSNorm(45, eps=1e-6).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    y, (grad_x, grad_w), forward_ops, backward_ops = _run(lambda x, w: rms_norm(x, w, 1e-6), (x, w), g)
    assert not forward_ops & NORM_OPS and not backward_ops & NORM_OPS, (forward_ops, backward_ops)
    x_ref = x.clone().requires_grad_()
    y_ref = module(x_ref)
    ref_x, ref_w = torch.autograd.grad(y_ref, (x_ref, module.weight), g)
    for ours, theirs in ((y, y_ref.detach()), (grad_x, ref_x), (grad_w, ref_w)):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype])

    a, u, g = _product_case(dtype)
    h, (grad_a, grad_u), forward_ops, backward_ops = _run(silu_mul, (a, u), g)
    assert not forward_ops & PRODUCT_OPS and not backward_ops & PRODUCT_OPS, (forward_ops, backward_ops)
    a_ref, u_ref = a.clone().requires_grad_(), u.clone().requires_grad_()
    h_ref = F.silu(a_ref) * u_ref
    for ours, theirs in zip((h, grad_a, grad_u), (h_ref.detach(), *torch.autograd.grad(h_ref, (a_ref, u_ref), g))):
        torch.testing.assert_close(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype] * 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_a_kept_blocks_rebuild_is_the_kernels_output_bit_for_bit(triton_backend, dtype):
    """A consumer in a kept block rebuilds its input from what the norm and the product saved: the kernels' own
    values (the norm's from its r by torch's ops, which round as the kernel does; the product by its kernel)."""
    x, w, _ = _norm_case(dtype)
    a, u, _ = _product_case(dtype)
    with torch.enable_grad(), rebuilding_outputs():
        y = rms_norm(x.requires_grad_(), w, 1e-6)
        h = silu_mul(a.requires_grad_(), u)
    for out in (y, h):
        recipe = _live_recipe(out)
        assert recipe is not None
        assert torch.equal(recipe.rebuild(*recipe.tensors), out)


def test_tensors_the_kernels_do_not_take_and_a_double_backward_run_torchs_ops(triton_backend):
    """Non-contiguous halves of one gate_up output, a product of two dtypes, a row wider than the kernel's widest:
    torch's ops, bit for bit the CPU backends' values; a backward that builds a graph differentiates torch's
    formula."""
    a, u, g = _product_case(torch.float32)
    fused = torch.cat([a, u], dim=-1)  # one leaf; its halves are strided views
    h, grads, forward_ops, backward_ops = _run(lambda f: silu_mul(f[..., :45], f[..., 45:]), (fused,), g)
    assert "silu" in forward_ops and "silu_backward" in backward_ops
    plain = _run(lambda f: F.silu(f[..., :45]) * f[..., 45:], (fused,), g)
    assert torch.equal(h, plain[0]) and torch.equal(grads[0], plain[1][0])

    h, grads, forward_ops, _ = _run(silu_mul, (a.to(torch.bfloat16), u), g)
    assert "silu" in forward_ops
    plain = _run(lambda a, u: F.silu(a) * u, (a.to(torch.bfloat16), u), g)
    assert torch.equal(h, plain[0]) and all(torch.equal(p, q) for p, q in zip(grads, plain[1]))

    wide = MAX_COLUMNS + 1
    x, w, g = (torch.randn(2, wide, device=DEVICE), torch.randn(wide, device=DEVICE), torch.randn(2, wide, device=DEVICE))
    y, grads, forward_ops, _ = _run(lambda x, w: rms_norm(x, w, 1e-6), (x, w), g)
    assert "rsqrt" in forward_ops
    plain = _run(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), (x, w), g)
    assert torch.equal(y, plain[0]) and all(torch.equal(p, q) for p, q in zip(grads, plain[1]))

    x, w, g = _norm_case(torch.float32)
    x, w = x.requires_grad_(), w.requires_grad_()
    y = rms_norm(x, w, 1e-6)
    (grad_x,) = torch.autograd.grad(y, x, g, create_graph=True)
    second = torch.autograd.grad(grad_x.square().sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    (grad_x64,) = torch.autograd.grad(y64, x64, g.double(), create_graph=True)
    for ours, theirs in zip(second, torch.autograd.grad(grad_x64.square().sum(), (x64, w64))):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


def test_the_cpu_backends_keep_torchs_ops(monkeypatch):
    for name in ("native", "torch"):
        monkeypatch.setenv("BREAD_BACKEND", name)
        assert elementwise_backend(torch.device("cpu")) is None


@pytest.mark.parametrize("shape", [(2, 5000), (45,), (0, 45)], ids=["wide-rows", "1-d", "no-rows"])
def test_the_norm_kernels_serve_wide_rows_a_1d_input_and_no_rows(triton_backend, shape):
    """Rows wider than 4,096 (one per program), a 1-D input (one row) and an empty one, through the Function."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 2).to(DEVICE)
    w = (torch.randn(shape[-1], generator=gen) * 0.5 + 1).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    y, (grad_x, grad_w), forward_ops, _ = _run(lambda x, w: rms_norm(x, w, 1e-6), (x, w), g)
    assert not forward_ops & NORM_OPS
    plain = _run(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), (x, w), g)
    for ours, theirs in zip((y, grad_x, grad_w), (plain[0], *plain[1])):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bread_elementwise_torch_turns_the_kernels_off_and_a_wrong_value_is_refused(triton_backend, monkeypatch):
    """``BREAD_ELEMENTWISE=torch`` (an A/B measurement, a GPU where a kernel misbehaves): torch's ops, autograd's
    values bit for bit, on the Triton backend too; a value that is not a choice names the choices."""
    a, u, g = _product_case(torch.bfloat16)
    monkeypatch.setenv("BREAD_ELEMENTWISE", "torch")
    h, grads, forward_ops, _ = _run(silu_mul, (a, u), g)
    assert "silu" in forward_ops
    plain = _run(lambda a, u: F.silu(a) * u, (a, u), g)
    assert torch.equal(h, plain[0]) and all(torch.equal(p, q) for p, q in zip(grads, plain[1]))
    monkeypatch.setenv("BREAD_ELEMENTWISE", "kernels")
    assert elementwise_backend(torch.device(DEVICE)) is not None
    monkeypatch.setenv("BREAD_ELEMENTWISE", "fast")
    with pytest.raises(ValueError, match="'kernels'.*'torch'"):
        silu_mul(a.requires_grad_(), u)


def test_without_gradients_the_kernels_serve_too_and_the_probes_still_compare_torchs_ops(triton_backend):
    """A block below the cut (no autograd) runs the forward kernels, the values the Functions give under autograd,
    with no graph; the probes that decide which modules the Functions replace compare torch's ops with the module, so
    Llama's norm and MLP are still recognised where the kernels would round the norm's sum otherwise."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from bread_kernels.functions.rms_norm import fusable_rms_norm
    from bread_kernels.functions.swiglu import fusable_swiglu_mlp

    x, w, _ = _norm_case(torch.bfloat16)
    a, u, _ = _product_case(torch.bfloat16)
    with torch.no_grad(), AtenOps() as ops:
        y, h = rms_norm(x, w, 1e-6), silu_mul(a, u)
    assert not set(ops.names) & (NORM_OPS | PRODUCT_OPS), ops.names
    assert y.grad_fn is None and h.grad_fn is None
    assert torch.equal(y, rms_norm(x.clone().requires_grad_(), w, 1e-6))
    assert torch.equal(h, silu_mul(a.clone().requires_grad_(), u))

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6)  # a width whose probe rows the kernel's sum order rounds otherwise
    config = LlamaConfig(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_key_value_heads=4)
    assert fusable_rms_norm(norm.to(DEVICE)) and fusable_swiglu_mlp(LlamaMLP(config).to(DEVICE))
