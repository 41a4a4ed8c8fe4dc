"""A peft LoRA linear ``y = x Wᵀ + b + s·(x̃ Aᵀ) Bᵀ`` whose backward computes the adapter gradients in one pass
and obeys the base weight's :class:`~bread_kernels.plan.Role`.

Shapes: ``x`` [..., K] (flattened to M tokens), base ``W`` [N, K] (GPT-2's ``Conv1D`` passes its [K, N] weight
transposed), ``b`` [N] or None, ``A`` [r, K], ``B`` [N, r], ``s`` the adapter's scaling (``lora_alpha / r``, or
``/ √r`` with rsLoRA).  ``x̃`` is the adapter's input: ``dropout(x)`` cast to the adapters' dtype, or ``x`` itself
when the adapter has no dropout.  The forward computes what peft's ``lora.Linear.forward`` does, in its order,
except that where the adapters share the layer's dtype ``s·u Bᵀ`` is added in the GEMM's epilogue
(:func:`lora_output`): one rounding where peft rounds the product, its scaling and the sum, so an element may differ
from peft's by an ulp of that dtype (a bf16 layer: about a quarter of them), and lies closer to the float64 value.
It saves ``u = x̃ Aᵀ`` [M, r].  With ``g = ∂L/∂y`` [M, N] (cast to the adapters' dtype for their
gradients, as peft's graph does):

    v  = g B                          [M, r]   the shared intermediate
    dB = s · gᵀ u                     [N, r]   into ``B.grad``
    dA = s · vᵀ x̃                     [r, K]   into ``A.grad``
    dX = g W  +  s · v A              [M, K]   from W *before* any update; the second term goes to ``x̃``'s own
                                               autograd (dropout's mask) when x̃ is not x
    base W by Role: ACTIVE -> dW = gᵀx, db = Σg;  SGD/SIGN -> the fused update;  FROZEN/LORA -> nothing

``v``, ``dA`` and ``dB`` come from the backend's ``lora_grads`` (on a GPU three cuBLAS GEMMs, or with
``BREAD_LORA_KERNEL=triton`` one Triton kernel that reads ``g`` and ``x̃`` once; on a CPU three GEMMs, or, for
peft's fp32 adapters on a bf16/fp16 layer, the native backend's rank-r products that read the bf16 ``g`` and ``x̃``
as they are, without their fp32 copies), so no N×K tensor exists for a frozen base weight.  Dropout is exact: the
mask belongs to the dropout op's own autograd node, which recompute (``bread_kernels.stream``) replays with the
forward's RNG state.

Under ``torch.autocast`` with dtype ``d`` (see :mod:`.autocast`) peft's forward runs its base layer and both
adapter linears under autocast, so every GEMM above is in ``d``: ``y = x_d W_dᵀ + b_d + s·(x̃_d A_dᵀ) B_dᵀ`` with
the output in ``d`` (peft's ``result.to(result dtype)``: the base layer's ``d``), where ``x̃_d`` is peft's cast of x
to the adapters' dtype (dropout after it) cast on to ``d``.  The backward then computes ``v``, ``dB``, ``dA`` and
``dX`` in ``d`` from ``g`` [M, N] in ``d`` and ``A_d``, ``B_d``, ``W_d`` (W's cast taken before any update), and
returns each gradient in its tensor's own dtype (``dA``, ``dB`` in the adapters' dtype, ``dX`` in x's, the dropout
branch's in x̃'s), as autograd does through autocast's casts; the base weight's Role works as in the dense linear.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..backends import get_backend, lora_kernel_requested
from ..plan import WeightPlan, trigger_gradient
from ..rounding import FLOAT_DTYPES
from .autocast import autocast_dtype, outside_autocast
from .linear import check_linear_inputs, finish_weight_role, not_a_view, start_weight_role, trigger_for
from .rebuild import saved_input
from .recompute import apply_deferring_output, deferred_output

__all__ = ["FusedLoRALinearFunction", "fused_lora_linear", "check_lora_inputs"]


def check_lora_inputs(x, weight, lora_a, lora_b, scaling) -> None:
    """Raise a clear error for adapter shapes/dtypes the fused LoRA function cannot serve."""
    for what, t in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"fused_lora_linear: {what} weight must be a 2-D tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_lora_linear: {what} has dtype {t.dtype}; use float32, bfloat16 or float16")
        if t.device != x.device:
            raise ValueError(f"fused_lora_linear: {what} is on {t.device} but the input is on {x.device}")
    n_out, n_in = weight.shape
    rank = lora_a.shape[0]
    if tuple(lora_a.shape) != (rank, n_in) or tuple(lora_b.shape) != (n_out, rank):
        raise ValueError(
            f"fused_lora_linear: adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the base "
            f"weight [out={n_out}, in={n_in}]; expected A [r, {n_in}] and B [{n_out}, r]"
        )
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"fused_lora_linear: lora_A is {lora_a.dtype} but lora_B is {lora_b.dtype}; use one dtype")
    lora_kernel_requested()  # a misspelt BREAD_LORA_KERNEL is refused at the forward, before any backward writes
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"fused_lora_linear: scaling must be a finite number (peft's lora_alpha / r), got "
                         f"{scaling!r}")


class FusedLoRALinearFunction(torch.autograd.Function):
    """See the module docstring.  Inputs: x, x_lora (None: x), weight, bias, lora_a, lora_b, scaling, plan,
    trigger, deferred (None, or during a recompute the list that receives the output's GEMMs)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling: float, plan: WeightPlan, trigger, deferred):
        needs_x = start_weight_role(ctx, plan, weight, bias)
        autocast = autocast_dtype(x.device)
        base_dtype = ctx.compute_dtype = autocast or weight.dtype  # the base GEMM's
        lora_dtype = ctx.lora_dtype = autocast or lora_a.dtype  # the adapters' GEMMs'
        ctx.scaling = scaling
        ctx.separate_lora_input = x_lora is not None
        ctx.x_dtype = x.dtype
        ctx.x_lora_dtype = x_lora.dtype if x_lora is not None else None
        # x̃: peft's cast of x to the adapters' dtype (and dropout), then autocast's to its own.  None saved: the
        # backward takes x̃ from the saved x (the backend casts it to the adapters' dtype)
        x_c = x.to(base_dtype)  # no-op without autocast
        if x_lora is not None:
            adapter_input = saved_adapter_input = x_lora.to(lora_dtype)
        elif autocast is None:
            adapter_input, saved_adapter_input = x.to(lora_a.dtype), None
        elif lora_a.dtype in (torch.float32, x.dtype):  # the cast through the adapters' dtype is exact: x̃ = x_d
            adapter_input, saved_adapter_input = x_c, None
        else:
            adapter_input = saved_adapter_input = x.to(lora_a.dtype).to(lora_dtype)
        x = x_c
        lora_a_c, lora_b_c = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
        u = F.linear(adapter_input, lora_a_c)
        keep_x = needs_x or saved_adapter_input is None  # x is also the adapter input
        # x, or what rebuilds it; shared with x's other adapters, which need its cast to their dtype (.rebuild)
        x_saved, ctx.x_source = saved_input(x if keep_x else None, share=saved_adapter_input is None)
        ctx.save_for_backward(saved_adapter_input, weight, bias, lora_a, lora_b, u, *x_saved)
        weight_c, bias_c = weight.to(base_dtype), (bias.to(base_dtype) if bias is not None else None)
        if deferred is None:
            return not_a_view(lora_output(x, weight_c, bias_c, u, lora_b_c, scaling))
        return deferred_output(deferred, x, (*x.shape[:-1], weight.shape[0]),
                               lambda: lora_output(x, weight_c, bias_c, u, lora_b_c, scaling))

    @staticmethod
    def backward(ctx, grad_output):
        with outside_autocast(grad_output.device):
            return _lora_backward(ctx, grad_output)


def _lora_backward(ctx, grad_output):
    adapter_input, weight, bias, lora_a, lora_b, u, *x_saved = ctx.saved_tensors
    needs = ctx.needs_input_grad
    n_out, n_in = weight.shape
    rank = lora_a.shape[0]
    backend = get_backend(grad_output.device)
    if adapter_input is None:  # x is the adapter input: in the dtype the backend reads it in (a cast to the
        # adapters' dtype is made once for x's adapters that share it)
        x, adapter_input = ctx.x_source.restore(
            x_saved, cast_to=backend.lora_input_dtype(ctx.compute_dtype, ctx.lora_dtype, rank))
    else:
        x = ctx.x_source.restore(x_saved)
    g = grad_output.reshape(-1, n_out)
    adapter_input = adapter_input.reshape(-1, n_in)
    need_a, need_b = needs[4], needs[5]
    need_lora_dx = needs[1] if ctx.separate_lora_input else needs[0]
    lora_a_c = lora_a.to(ctx.lora_dtype)

    grad_a = grad_b = v = None
    if need_a or need_b or need_lora_dx:
        v, grad_a, grad_b = backend.lora_grads(g, adapter_input, u.reshape(-1, rank), lora_b.to(ctx.lora_dtype),
                                               ctx.scaling, need_a, need_b)
        v = v.to(ctx.lora_dtype)
    adapter_input = None  # its cast (an fp32 [M, K]) is not held through dX below, unless other adapters share it

    grad_x = grad_x_lora = None
    if needs[0]:
        grad_x = grad_output @ weight.to(ctx.compute_dtype)  # before any update of W (design invariant 1)
    if need_lora_dx:  # s · v A: into dX directly (a GEMM epilogue when the dtypes agree), or to x̃'s autograd
        flat = grad_x.view(-1, n_in) if not ctx.separate_lora_input else None
        if flat is not None and flat.dtype == lora_a_c.dtype:
            flat.addmm_(v, lora_a_c, alpha=ctx.scaling)
        elif flat is not None:  # autograd's sum: the branch's gradient rounded to x's dtype, then added
            backend.add_product_(flat, v, lora_a_c, ctx.scaling, round_term=True)
        else:
            lora_dx = torch.mm(v, lora_a_c).mul_(ctx.scaling)
            grad_x_lora = lora_dx.view(grad_output.shape[:-1] + (n_in,)).to(ctx.x_lora_dtype)
    if grad_x is not None:
        grad_x = grad_x.to(ctx.x_dtype)

    grad_weight, grad_bias = finish_weight_role(ctx, g, x, weight, bias, needs[2], needs[3])
    if grad_a is not None:
        grad_a = grad_a.to(lora_a.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(lora_b.dtype)
    trigger = trigger_gradient(ctx.needs_input_grad[8])
    return grad_x, grad_x_lora, grad_weight, grad_bias, grad_a, grad_b, None, None, trigger, None


def lora_output(x, weight, bias, u, lora_b, scaling: float) -> torch.Tensor:
    """``x Wᵀ + b + s·u Bᵀ`` as peft computes it (the operands already in their compute dtypes), the adapter term
    rounded once where it shares the layer's dtype (see the module docstring)."""
    result = F.linear(x, weight, bias)
    if u.dtype == result.dtype:  # result += s·u Bᵀ in the GEMM's epilogue: no [M, N] temporaries
        result.view(-1, weight.shape[0]).addmm_(u.view(-1, u.shape[-1]), lora_b.t(), alpha=scaling)
        return result
    # adapters of another dtype: peft's promotion, then one rounding to the layer's dtype
    update = F.linear(u, lora_b)
    if update.dtype == torch.promote_types(update.dtype, result.dtype):  # fp32 adapters on a low-precision layer:
        # round(fp32(result) + s·(u Bᵀ)) into result, one pass where the backend has one (native: no fp32 copies)
        get_backend(result.device).add_scaled_(result, update, scaling)
        return result
    return (result + update * scaling).to(result.dtype)


def fused_lora_linear(x: torch.Tensor, x_lora: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, plan: WeightPlan) -> torch.Tensor:
    """``x Wᵀ + b + scaling·(x̃ Aᵀ) Bᵀ`` (x̃ = ``x_lora``, or ``x`` when None) whose backward follows ``plan``
    for the base weight and gives A and B their gradients (see the module docstring)."""
    if torch.compiler.is_compiling():  # a graph break (see fused_linear)
        return _graph_break_fused_lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling, plan)
    return _checked_fused_lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling, plan)


def _checked_fused_lora_linear(x, x_lora, weight, bias, lora_a, lora_b, scaling, plan) -> torch.Tensor:
    check_linear_inputs(x, weight, bias, plan)
    check_lora_inputs(x, weight, lora_a, lora_b, scaling)
    if x_lora is not None and not isinstance(x_lora, torch.Tensor):
        raise TypeError(f"fused_lora_linear: x_lora must be None (the adapters read x) or a tensor, got "
                        f"{type(x_lora).__name__}")
    if x_lora is not None and (x_lora.shape != x.shape or x_lora.dtype != lora_a.dtype):
        raise ValueError(f"fused_lora_linear: x_lora must have x's shape {tuple(x.shape)} and the adapters' dtype "
                         f"{lora_a.dtype}, got {tuple(x_lora.shape)} {x_lora.dtype}")
    trigger = trigger_for(plan)
    return apply_deferring_output(FusedLoRALinearFunction, plan, x, x_lora, weight, bias, lora_a, lora_b,
                                  float(scaling), plan, trigger)


_graph_break_fused_lora_linear = torch.compiler.disable(_checked_fused_lora_linear)
