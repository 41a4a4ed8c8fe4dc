"""The RMSNorm of Llama-style models, ``y = w · (x · rsqrt(mean(x²) + ε))``, as one ``autograd.Function`` that saves
only its input and the per-row ``rstd`` (Hugging Face's module, under plain autograd, saves an fp32 copy of ``x``
and runs some fifteen ops in its backward), with the same values bit for bit.

Shapes: ``x`` [..., K] of dtype ``d_x``, ``w`` [K] of dtype ``d_w``; the output has dtype ``d_y = promote(d_w,
d_x)``.  The forward is Hugging Face's ``LlamaRMSNorm`` op for op, so its values are the module's bit for bit::

    x_f = fp32(x)                         [..., K]
    r   = rsqrt(mean_K(x_f²) + ε)         [..., 1]  fp32 (saved)
    x̂   = x_f · r                         [..., K]  fp32 (recomputed in the backward from x and r)
    n   = d_x(x̂)
    y   = w · n                           [..., K]  d_y

Backward, with ``g = ∂L/∂y`` [..., K] in ``d_y``, each cast where autograd casts a gradient to its input's dtype::

    ∂L/∂w = d_w(Σ_rows g · n)                                       [K]
    ∂L/∂x̂ = fp32(d_x(g · w))                                        [..., K]
    ∂L/∂r = Σ_K ∂L/∂x̂ · x_f                                         [..., 1]
    c     = 2 · (−½ · ∂L/∂r · r³) / K                                [..., 1]   (through rsqrt, the mean, x_f²)
    ∂L/∂x = d_x(∂L/∂x̂ · r + x_f · c)                                [..., K]

These are autograd's own formulas for the module's ops (``mul``, ``to``, ``rsqrt``, ``mean``, ``pow``), in its
order of rounding, so the gradients are autograd's bit for bit; what changes is that the per-row factors are
formed on [..., 1] before they meet a row (autograd expands them to [..., K] first; scaling by 2 is exact, so the
values are the same), that ``x_f`` is recomputed from ``x`` instead of saved in fp32, and that the whole chain is
one node of about eight full-size ops (three more with ``∂L/∂w``, casts counted) instead of autograd's chain of
some fifteen.  In fp32 the two paths'
gradients reach ``x`` separately, as autograd's do (see :class:`RMSNormFunction`), so the sums they join round
alike too.

On the Triton backend (a GPU) the forward and the backward are one kernel each
(:mod:`bread_kernels.kernels.rms_norm`, through :mod:`bread_kernels.backends.elementwise`): the same formulas and
roundings, but its row sums (``mean(x²)``, ``∂L/∂r``, ``∂L/∂w`` over rows) in another order, so ``r`` and the
gradients are autograd's to fp32 rounding; ``y`` is :func:`_normalized`'s from the kernel's ``r`` bit for bit, which is
what a kept block's rebuild computes.  A backward that builds a graph (``create_graph``) runs the ops above out of
place and takes ``r`` from x again, so that second derivatives reach x through ``r``.

:func:`fusable_rms_norm` decides which modules this computes: one whose own forward gives exactly these values on
probe inputs (so Gemma's ``(1 + w)``, a norm that multiplies before the cast, or another ε are left alone).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..backends.elementwise import elementwise_backend
from .probe import computes_the_same
from .rebuild import mark_rebuildable

__all__ = ["RMSNormFunction", "rms_norm", "torch_rms_norm", "fusable_rms_norm", "rms_norm_epsilon"]

#: the attribute names transformers' RMSNorm classes give ε
_EPSILON_ATTRS = ("variance_epsilon", "eps")


def _rstd(x_f: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean_K(x_f²) + ε)`` [..., 1], Hugging Face's ops in its order."""
    return torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True).add_(eps))


def _normalized(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, x_f: torch.Tensor | None = None):
    """``y = w · d_x(x_f · r)`` from ``r``: the forward's output (``x_f``: ``fp32(x)`` where the forward has it),
    and its rebuild in a consumer's backward (:mod:`.rebuild`)."""
    return weight * ((x.to(torch.float32) if x_f is None else x_f) * rstd).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: x, ``x_again`` (x itself when x is fp32, else None), weight,
    eps (a float).

    fp32 ``x`` is its own ``x_f``: autograd then hands x the two paths' gradients (through ``x_f · r`` and through
    ``x_f²``) one after the other, so the residual stream adds them to its own in that order.  Passing x twice
    returns them the same way (``∂L/∂x̂ · r`` for x, ``x_f · c`` for ``x_again``), and the fp32 sums round as
    autograd's do.  Another dtype has one ``ToCopy`` node that sums them first: one gradient."""

    @staticmethod
    def forward(ctx, x, x_again, weight, eps: float):
        ctx.split, ctx.eps = x_again is not None, eps
        output, rstd, ctx.backend = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return mark_rebuildable(output, _normalized, x, weight, rstd)  # a kernel's y is _normalized's from its r

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, rstd = ctx.saved_tensors
        if ctx.backend is not None:  # the kernel's forward: its backward, one pass (None: torch's ops below)
            need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grads = ctx.backend.rms_norm_backward(grad_output, x, weight, rstd, need_x, ctx.split,
                                                  ctx.needs_input_grad[2])
            if grads is not None:
                return *grads, None
        x_f = x.to(torch.float32)
        if torch.is_grad_enabled():  # a backward that builds a graph: r from x again, so that r's graph reaches x
            rstd = _rstd(x_f, ctx.eps)
        grad_weight = grad_x = grad_x_again = None
        if ctx.needs_input_grad[2]:
            products = grad_output * (x_f * rstd).to(x.dtype)
            rows = tuple(range(products.dim() - 1))  # none for a 1-D x
            grad_weight = (products.sum(dim=rows) if rows else products).to(weight.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_hat = (grad_output * weight).to(x.dtype).to(torch.float32)
            grad_rstd = (grad_hat * x_f).sum(-1, keepdim=True)
            row = (grad_rstd * -0.5 * rstd.pow(3)).div_(x.shape[-1]).mul_(2)
            through_square = x_f * row  # x_f may be x itself (fp32): never written
            # in place where nothing records the ops; a backward that builds a graph (create_graph) saved grad_hat
            # for grad_rstd's product, so it must not be written (the same values either way)
            first = grad_hat * rstd if torch.is_grad_enabled() else grad_hat.mul_(rstd)
            if ctx.split:
                grad_x, grad_x_again = first, through_square
            else:
                summed = first + through_square if torch.is_grad_enabled() else first.add_(through_square)
                grad_x = summed.to(x.dtype)
        return grad_x, grad_x_again, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``w · d_x(x_f · rsqrt(mean(x_f²) + ε))`` (see the module docstring); where nothing needs a gradient (a block
    below the cut, an evaluation) the backend's forward kernel where it has one, as under autograd, else torch's
    ops, and no graph."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _forward(x, weight, eps)[0]  # not marked rebuildable: nothing is saved here to rebuild from
    split = x.dtype == torch.float32 and not torch.compiler.is_compiling()  # dynamo refuses a tensor given twice
    return RMSNormFunction.apply(x, x if split else None, weight, eps)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(y, r, backend)``: the backend's kernel where it serves these tensors (the backend that served), torch's ops
    otherwise (None)."""
    backend = elementwise_backend(x.device)
    computed = None if backend is None else backend.rms_norm(x, weight, eps)
    if computed is None:
        return (*_torch_forward(x, weight, eps), None)
    return (*computed, backend)


def _torch_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(y, r)`` by torch's ops (Hugging Face's, in its order)."""
    x_f = x.to(torch.float32)
    rstd = _rstd(x_f, eps)
    return _normalized(x, weight, rstd, x_f), rstd


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm`'s values by torch's ops, with no graph of its own: what the probe compares a module with,
    whichever backend computes the norm in training."""
    return _torch_forward(x, weight, eps)[0]


def rms_norm_epsilon(module: nn.Module) -> float | None:
    """The module's ε, under the names transformers uses; None where it has none."""
    for name in _EPSILON_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def fusable_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm that :func:`rms_norm` computes: a class named ``...RMSNorm`` with one
    floating-point parameter ``weight`` [K], an ε attribute, and a forward that gives :func:`torch_rms_norm`'s values
    (torch's ops: :func:`rms_norm`'s bit for bit on the CPU backends, to fp32 rounding of the row sums on the Triton
    backend's kernels) bit for bit on probe rows (unit-scale and ε-scale, in the weight's dtype and in bf16/fp16).
    A weight that cannot be read (on the meta device, partitioned by ZeRO-3: no elements) fails the probe."""
    if not type(module).__name__.endswith("RMSNorm"):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    eps = rms_norm_epsilon(module)
    if len(params) != 1 or weight is None or weight.dim() != 1 or weight.numel() == 0 or eps is None \
            or not weight.is_floating_point() or weight.device.type == "meta" or list(module.children()):
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(4, weight.numel(), generator=generator)
    probe[2:] *= eps ** 0.5  # rows where ε weighs as much as the mean square
    probes = [probe.to(device=weight.device, dtype=dtype)
              for dtype in dict.fromkeys((weight.dtype, torch.bfloat16, torch.float16))]
    # a fresh weight is all ones, where w·d_x(x̂) and d_x(w·x̂) agree: probe a copy with a random weight
    probed = copy.copy(module)  # shallow: its own parameter dict, nothing else copied
    probed._parameters = {"weight": nn.Parameter((torch.randn(weight.shape, generator=generator) * 0.5 + 1).to(
        device=weight.device, dtype=weight.dtype), requires_grad=False)}
    return computes_the_same(probed, lambda x: torch_rms_norm(x, probed.weight, eps), probes)
