"""The dense linear ``y = x Wᵀ + b`` with a backward that obeys the weight's :class:`~bread_kernels.plan.Role`.

Shapes: ``x`` [..., K] (any leading dims, flattened to M = tokens), ``W`` [N, K] (any strides — GPT-2's ``Conv1D``
passes its [K, N] weight transposed), ``b`` [N] or None; fp32, bf16 or fp16, all three the same dtype — except
under ``torch.autocast``, below.

With ``g = ∂L/∂y`` flattened to [M, N] and ``x`` to [M, K], the backward computes

    dX = g · W                        only if the input needs a gradient; always from W *before* any update
    ACTIVE:  dW = gᵀ x,  db = Σ_m g   returned to autograd, so they accumulate into ``.grad`` like nn.Linear's
    SGD:     W -= lr·s · gᵀx,   b -= lr·s · Σ_m g          fused: dW is never materialised
    SIGN:    W -= lr·s · sign(gᵀx), b -= lr·s · sign(Σ_m g)
    FROZEN, LORA (base weight):  nothing for W and b

ACTIVE, and FROZEN/LORA where neither W nor b requires grad, are autograd's own ``F.linear`` (its backward is the
maths above, in C++) unless autocast casts W; :class:`FusedLinearFunction` serves the on-the-fly roles, a FROZEN
weight that requires grad (whose dW it keeps from autograd) and a W autocast casts (it saves W, not the cast).

``lr·s`` is read from the plan's :class:`~bread_kernels.plan.OnTheFlyUpdate` when the backward runs.  A weight used
several times in one forward receives one update for its summed gradient after the last use's backward (the update
is the fused kernel over the concatenated tokens of every use).  A non-finite ``g`` or ``x`` skips the update
(weight and bias untouched) and is reported on the plan.

Under ``torch.autocast`` for x's device type with autocast dtype ``d`` (see :mod:`.autocast`), x, W and b may have
any of the three dtypes and everything is computed as ``F.linear`` computes it there: ``y = x_d W_dᵀ + b_d`` in
``d`` (x, W, b cast to ``d``; the GEMM accumulates in fp32), output in ``d``; ``g`` [M, N] is then in ``d`` and

    dX = (g · W_d) cast to x's dtype      W_d cast from W before any update; only ``x_d`` is saved, as autograd does
    ACTIVE:  dW = (gᵀ x_d) in d, cast to W's dtype;  db = (Σ_m g) in d, cast to b's dtype
    SGD/SIGN: dW = gᵀ x_d in d (the backend's chunks: never whole beyond the chunk budget), applied to W in W's
             own dtype: an fp32 W gets ``W -= lr·s · fp32(dW_d)`` (or its sign), a bf16/fp16 W the usual rounding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import BACKWARD_TRIGGER, Role, WeightPlan, trigger_gradient
from ..rounding import FLOAT_DTYPES
from ..update import update_linear_
from .autocast import autocast_dtype, outside_autocast
from .rebuild import rebuildable, saved_input
from .recompute import apply_deferring_output, deferred_output, is_recomputing

__all__ = ["FusedLinearFunction", "fused_linear", "not_a_view", "check_linear_inputs", "check_plan_for_weight",
           "backward_trigger", "trigger_for", "start_weight_role", "finish_weight_role"]

def backward_trigger() -> torch.Tensor:
    """:data:`~bread_kernels.plan.BACKWARD_TRIGGER`: the leaf every fused function with an on-the-fly role takes."""
    return BACKWARD_TRIGGER


def trigger_for(plan: WeightPlan) -> torch.Tensor | None:
    """The backward trigger where ``plan`` updates its weight on the fly and grad is enabled (so its backward runs
    although none of the real inputs may require grad, and knows whether the backward accumulates: see
    :func:`~bread_kernels.plan.backward_accumulates`); None otherwise."""
    if not plan.role.updates_on_the_fly or not torch.is_grad_enabled():
        return None
    return BACKWARD_TRIGGER


def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: WeightPlan) -> None:
    """Raise a clear error for anything the fused linear cannot do correctly."""
    if bias is None and isinstance(plan, WeightPlan) and isinstance(x, torch.Tensor) and \
            isinstance(weight, torch.Tensor) and x.dtype in FLOAT_DTYPES and weight.dtype == x.dtype and \
            weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.device == weight.device:
        # what every call of a patched bias-free layer passes, in one expression (each check below holds; the loops
        # cost an on-the-fly weight's forward ~3 µs of its ~60: `python -m bread_kernels.bench host`)
        check_plan_for_weight("fused_linear", plan, weight, "the weight")
        return
    if not isinstance(plan, WeightPlan):
        raise TypeError(f"fused_linear: plan must be a bread_kernels.WeightPlan, got {type(plan).__name__}")
    for what, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear: {what} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"fused_linear: {what} has dtype {t.dtype}; the fused linear supports float32, bfloat16 and float16 "
                + ("(cast the model to one of them, model.float(), or unpatch it: bread_kernels.unpatch)"
                   if what != "input" else "(cast integer or float64 data with .to(weight.dtype) first)")
            )
    if weight.dim() != 2:
        raise ValueError(f"fused_linear: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear: input's last dimension is {x.shape[-1] if x.dim() else '(scalar)'} but the weight "
            f"{tuple(weight.shape)} expects in_features={weight.shape[1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    device, dtype = x.device, x.dtype
    for what, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"fused_linear: input is on {device} but {what} is on {t.device}; move them together")
        if t.dtype != dtype and autocast_dtype(device) is None:  # autocast casts all three to its dtype
            raise TypeError(f"fused_linear: input is {dtype} but {what} is {t.dtype}; cast them to one dtype")
    check_plan_for_weight("fused_linear", plan, weight, "the weight")


def check_plan_for_weight(function: str, plan: WeightPlan, weight: torch.Tensor, what: str) -> None:
    """The checks every fused function makes of a weight's plan (shared with the LoRA, experts and head+loss
    functions): the role can run as configured, and an ACTIVE weight's dW has somewhere to go."""
    plan.check()
    if plan.role is Role.ACTIVE and torch.is_grad_enabled() and not weight.requires_grad:
        raise ValueError(
            f"{function}: {plan.name or what} has role ACTIVE but requires_grad=False, so its dW would be "
            "dropped: requires_grad was turned off after the roles were set (a BlockOptimizer sets it at each block "
            "switch; peft.get_peft_model and add_adapter freeze the base weights, as requires_grad_(False) does). "
            "Make such a change before building the optimizer (a model wrapped by peft after patch: "
            "bread_kernels.unpatch(wrapper), then patch(wrapper) and a new optimizer), or set "
            "weight.requires_grad_(True), or give it Role.FROZEN"
        )


class FusedLinearFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: x, weight, bias (or None), plan, trigger (or None),
    deferred (None, or during a recompute the list that receives the output's GEMM)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: WeightPlan, trigger, deferred):
        needs_x = start_weight_role(ctx, plan, weight, bias)
        dtype = ctx.compute_dtype = autocast_dtype(x.device) or weight.dtype
        ctx.x_dtype = x.dtype
        x, weight_c, bias_c = _in_dtype(x, dtype), _in_dtype(weight, dtype), _in_dtype(bias, dtype)
        x_saved, ctx.x_source = saved_input(x if needs_x else None)  # x, or what rebuilds it (.rebuild)
        ctx.save_for_backward(weight, bias, *x_saved)
        if deferred is None:
            return not_a_view(F.linear(x, weight_c, bias_c))
        return deferred_output(deferred, x, (*x.shape[:-1], weight.shape[0]), lambda: F.linear(x, weight_c, bias_c))

    @staticmethod
    def backward(ctx, grad_output):
        weight, bias, *x_saved = ctx.saved_tensors
        x = ctx.x_source.restore(x_saved)
        with outside_autocast(grad_output.device):
            g = grad_output.reshape(-1, weight.shape[0])  # flattened once: each op below is one 2-D GEMM, no views
            grad_x = None
            if ctx.needs_input_grad[0]:  # from W before any update of W (invariant 1)
                grad_x = (g @ _in_dtype(weight, ctx.compute_dtype)).view(*grad_output.shape[:-1], weight.shape[1])
                grad_x = _in_dtype(grad_x, ctx.x_dtype)
            grad_weight, grad_bias = finish_weight_role(ctx, g, x, weight, bias, ctx.needs_input_grad[1],
                                                        ctx.needs_input_grad[2])
        return grad_x, grad_weight, grad_bias, None, trigger_gradient(ctx.needs_input_grad[4]), None


def not_a_view(output: torch.Tensor) -> torch.Tensor:
    """``output`` as a tensor of its own over the same storage, where it is a view (``F.linear`` of a 3-D input
    computes a 2-D GEMM and returns it reshaped): autograd forbids an in-place op on a view made inside a custom
    Function's forward, which the model may apply to a layer's output as it may to ``nn.Linear``'s (Falcon's
    ``mlp_output += attention_output``).  No copy: ``set_`` aliases the GEMM's result, which nothing else holds, so
    the values are the same bits (the deferred output's placeholder takes it so too)."""
    if output._base is None:
        return output
    return torch.empty(0, dtype=output.dtype, device=output.device).set_(
        output.untyped_storage(), output.storage_offset(), output.shape, output.stride())


def start_weight_role(ctx, plan: WeightPlan, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Forward half of a weight's Role (shared with the LoRA function): record the plan on ``ctx`` and register
    this use of an on-the-fly weight (not again in a block's recompute, whose graph the backward never runs).
    Returns whether the backward needs the layer's input ``x``.

    An on-the-fly weight's update is written into ``weight`` and ``bias`` themselves, held on ``ctx`` as
    ``ctx.written``: what ``ctx.saved_tensors`` gives back is what a saved-tensor hook's unpack returned,
    a copy wherever the hook moved it (``torch.autograd.graph.save_on_cpu`` on a GPU, an activation-offloading
    library), and a write into that copy would be lost."""
    ctx.plan = plan
    ctx.role = plan.role
    on_the_fly = plan.role.updates_on_the_fly
    ctx.use = plan.register_use(ctx) if on_the_fly and not is_recomputing() else None
    ctx.written = (weight, bias) if on_the_fly else None
    return plan.role is Role.ACTIVE or on_the_fly  # dX needs only W


def finish_weight_role(ctx, g, x, weight, bias, needs_weight_grad: bool, needs_bias_grad: bool):
    """Backward half: ``(dW, db)`` for ACTIVE (None where not needed), the fused update for SGD/SIGN (after the
    last use's backward: written into the forward's own weight and bias, ``ctx.written``), nothing for
    FROZEN/LORA.  ``g`` is [M, N]; ``x`` [..., K] the saved input, both in the compute dtype (W's, or autocast's);
    ``weight`` and ``bias`` as saved; ACTIVE's dW and db are returned in W's and b's own dtypes."""
    grad_weight = grad_bias = None
    if ctx.role is Role.ACTIVE:
        if needs_weight_grad:
            grad_weight = _in_dtype(g.t() @ _rows(x, weight.shape[1]), weight.dtype)
        if bias is not None and needs_bias_grad:
            grad_bias = _in_dtype(g.sum(0), bias.dtype)
    elif ctx.role.updates_on_the_fly:
        pending = ctx.plan.finish_use(ctx.use, (g, _rows(x, weight.shape[1])))
        if pending is not None:
            update_linear_(ctx.plan, ctx.role, *ctx.written, pending)
    return grad_weight, grad_bias


def _autograd_computes(x: torch.Tensor, plan: WeightPlan, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd's own ``F.linear`` is exactly the role's, at no more memory: ACTIVE, and FROZEN/LORA where
    neither W nor b requires grad (as the block optimizer leaves them) — unless autocast casts W, whose cast autograd
    would save where the Function saves W itself, or an ACTIVE weight's input is rebuildable (:mod:`.rebuild`:
    autograd would save it where the Function saves what rebuilds it).  It then runs in C++, with no Python per
    call (the Function's costs about 15-30 µs of host time a call: ``python -m bread_kernels.bench host``), and its
    recompute never computes the block's last GEMM, as the deferred output of the Function arranges."""
    if autocast_dtype(x.device) not in (None, weight.dtype):
        return False
    if plan.role is Role.ACTIVE:
        return not rebuildable(x)
    return not plan.role.updates_on_the_fly and not weight.requires_grad and not (bias is not None and
                                                                                  bias.requires_grad)


def _in_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` where that casts (under autocast); ``t`` itself otherwise, without the call's host cost."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as [tokens, width] (no op when it already is)."""
    return x if x.dim() == 2 else x.reshape(-1, width)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: WeightPlan) -> torch.Tensor:
    """``y = x Wᵀ + b`` whose backward follows ``plan`` (see the module docstring).  Where autograd's own linear is the
    role's (:func:`_autograd_computes`), it is that linear, reached before any of the checks below: a bad input then
    fails with autograd's own error, as the unpatched layer's would."""
    if torch.compiler.is_compiling():  # a graph break: the Function runs eagerly (its plan is read at backward)
        return _graph_break_fused_linear(x, weight, bias, plan, None)
    autograd_computes = None
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() == 2 and \
            (bias is None or isinstance(bias, torch.Tensor)) and isinstance(plan, WeightPlan):
        autograd_computes = _autograd_computes(x, plan, weight, bias)
        if autograd_computes and (plan.role is not Role.ACTIVE or weight.requires_grad):
            return F.linear(x, weight, bias)  # no more host time than the unpatched layer's (the checks cost ~5 µs)
    return _checked_fused_linear(x, weight, bias, plan, autograd_computes)


def _checked_fused_linear(x, weight, bias, plan, autograd_computes: bool | None) -> torch.Tensor:
    """:func:`fused_linear` after its inputs are checked; ``autograd_computes``: :func:`_autograd_computes`'s answer
    where the caller has it."""
    check_linear_inputs(x, weight, bias, plan)
    if autograd_computes is None:
        autograd_computes = _autograd_computes(x, plan, weight, bias)
    if autograd_computes:
        return F.linear(x, weight, bias)
    return apply_deferring_output(FusedLinearFunction, plan, x, weight, bias, plan, trigger_for(plan))


# torch.compiler.disable's wrapper only where dynamo traces: an eager call through it costs ~3 µs of host time
_graph_break_fused_linear = torch.compiler.disable(_checked_fused_linear)
