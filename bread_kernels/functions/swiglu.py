"""The SwiGLU product of Llama-style MLPs, ``h = silu(a) · u``, as one ``autograd.Function`` that saves its two
inputs and recomputes ``silu(a)`` in the backward (autograd saves ``silu(a)`` as well: a third [T, I] tensor).

Shapes: ``a = x W_gateᵀ`` and ``u = x W_upᵀ`` [..., I]; ``h`` [..., I] in ``promote(d_a, d_u)``.  With ``g = ∂L/∂h``::

    ∂L/∂u = d_u(g · silu(a))
    ∂L/∂a = silu_backward(d_a(g · u), a)        silu'(a) = σ(a)·(1 + a·(1 − σ(a)))

— autograd's own formulas for ``mul`` and ``silu``, in its order, so the gradients are autograd's bit for bit;
``silu(a)`` is recomputed by the same op that computed it in the forward, after ``∂L/∂a`` (whose ``g·u`` is then
freed), and ``∂L/∂u`` is written over it: two [T, I] buffers alive at once where the other order with each op's own
output holds three at the peak of an MLP's backward.

On the Triton backend (a GPU) the product and both gradients are one kernel each way
(:mod:`bread_kernels.kernels.swiglu`, through :mod:`bread_kernels.backends.elementwise`: one ``exp`` and one read of
g, a and u for both gradients), rounding where the ops above round; a kept block rebuilds the product by the same
kernel.

:func:`fusable_swiglu_mlp` decides which MLP modules compute ``down(silu_mul(gate(x), up(x)))`` instead of their own
forward: one whose own forward gives exactly that on probe rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.elementwise import elementwise_backend
from .probe import computes_the_same
from .rebuild import mark_rebuildable

__all__ = ["SiLUMulFunction", "silu_mul", "fusable_swiglu_mlp", "swiglu_mlp"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SiLUMulFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: a (the gate projection), u (the up projection)."""

    @staticmethod
    def forward(ctx, a, u):
        ctx.save_for_backward(a, u)
        output, ctx.backend = _forward(a, u)
        # rebuilt as it was computed (by the same kernel, or torch's ops): the same values
        return mark_rebuildable(output, _product if ctx.backend is None else ctx.backend.silu_mul, a, u)

    @staticmethod
    def backward(ctx, grad_output):
        a, u = ctx.saved_tensors
        if ctx.backend is not None:  # the kernel's forward: its backward, one pass (None: torch's ops below)
            grads = ctx.backend.silu_mul_backward(grad_output, a, u, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            if grads is not None:
                return grads
        grad_a = grad_u = None
        # da first, so that g·u is freed before silu(a) is made: two [T, I] buffers alive at once, not three
        if ctx.needs_input_grad[0]:
            product = (grad_output * u).to(a.dtype)
            # autograd's own op (a dispatch mode then sees what it sees under plain autograd: FlopCounterMode
            # decomposes silu_backward, not its out= form), or with create_graph its differentiable formula
            grad_a = _differentiable_silu_backward(product, a) if torch.is_grad_enabled() else \
                torch.ops.aten.silu_backward(product, a)
            del product
        if ctx.needs_input_grad[1]:
            silu = F.silu(a)
            # g·silu(a) written over silu(a) (the same product, one rounding), except where autograd records the ops
            # (create_graph) or a is broadcast against u (the product is the larger shape)
            if not torch.is_grad_enabled() and silu.dtype == grad_output.dtype and silu.shape == grad_output.shape:
                grad_u = silu.mul_(grad_output).to(u.dtype)
            else:
                grad_u = (grad_output * silu).to(u.dtype)
        return grad_a, grad_u


def _differentiable_silu_backward(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``silu_backward`` in ops autograd can differentiate again: autograd's own formula for a backward that builds a
    graph (``infinitely_differentiable_silu_backward`` in torch's ``FunctionsManual.cpp``), in its order."""
    sigmoid = a.sigmoid()
    return grad * sigmoid * (1.0 + a * (1.0 - sigmoid))


def silu_mul(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(a) · u`` (see the module docstring); where nothing needs a gradient (a block below the cut, an
    evaluation) the backend's forward kernel where it has one, as under autograd, else torch's ops, and no graph."""
    if not torch.is_grad_enabled() or not (a.requires_grad or u.requires_grad):
        return _forward(a, u)[0]  # not marked rebuildable: nothing is saved here to rebuild from
    return SiLUMulFunction.apply(a, u)


def _forward(a: torch.Tensor, u: torch.Tensor):
    """``(h, backend)``: the backend's kernel where it serves these tensors (the backend that served), torch's ops
    otherwise (None)."""
    backend = elementwise_backend(a.device)
    output = None if backend is None else backend.silu_mul(a, u)
    return (_product(a, u), None) if output is None else (output, backend)


def _product(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(a) · u``: the forward's output, and its rebuild in a consumer's backward (:mod:`.rebuild`)."""
    return F.silu(a) * u


def swiglu_mlp(module: nn.Module, x: torch.Tensor, product=silu_mul) -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) · up_proj(x))``: the gate projection first, as the MLPs call them
    (``product``: torch's ops for the probe, whichever backend computes the product in training)."""
    return module.down_proj(product(module.gate_proj(x), module.up_proj(x)))


def fusable_swiglu_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a SwiGLU MLP that :func:`swiglu_mlp` computes: a class named ``...MLP`` with
    ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``, no parameters of its own, and a forward that
    gives :func:`swiglu_mlp`'s values with torch's product (the CPU backends'; the Triton kernel rounds as its ops
    do) bit for bit on probe rows.  Weights that cannot be read (on the meta device,
    partitioned by ZeRO-3) fail the probe."""
    if not type(module).__name__.endswith("MLP") or list(module.parameters(recurse=False)):
        return False
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in _PROJECTIONS):
        return False
    if "silu" not in type(getattr(module, "act_fn", None)).__name__.lower():
        return False
    weight = next(module.gate_proj.parameters(), None)
    if weight is None or weight.numel() == 0 or weight.device.type == "meta" or not weight.is_floating_point():
        return False
    hidden = weight.shape[-1] if weight.dim() == 2 else None
    if hidden is None:
        return False
    probe = torch.randn(4, hidden, generator=torch.Generator(device="cpu").manual_seed(0))
    probe[2:] *= 1e3  # rows large enough to meet a clamp (swiglu_limit)
    return computes_the_same(module, lambda x: swiglu_mlp(module, x, _product), [probe.to(device=weight.device,
                                                                                 dtype=weight.dtype)])
