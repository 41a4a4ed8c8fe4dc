"""The mixture-of-experts feed-forward of transformers 5.x, with a backward that obeys each expert weight's Role.

transformers stores the E experts of a layer as two 3-D parameters, ``gate_up_proj`` W₁ [E, 2I, H] and
``down_proj`` W₂ [E, H, I], and calls the experts module with the hidden states ``x`` [T, H], the router's top-k
expert ids ``idx`` [T, k] and routing weights ``r`` [T, k].  The forward computes transformers' eager
``Experts.forward`` with the same operations on the same values (bit for bit in fp32): for each expert e that
received a token, in ascending order, with ``t`` [n_e] its tokens and ``p`` [n_e] their top-k positions
(``torch.where`` order: by position, then token)::

    xₑ = x[t]                          [n_e, H]
    uₑ = xₑ W₁[e]ᵀ                      [n_e, 2I]
    aₑ = gate(uₑ) = act(u_gate) · u_up  [n_e, I]      (the module's ``_apply_gate`` when it has one)
    oₑ = aₑ W₂[e]ᵀ                      [n_e, H]
    y[t] += oₑ · r[t, p]               index_add_ into zeros [T, H], in the output's dtype, in expert order

The GEMMs run expert by expert; the gate (row-wise) and the routing-weight product run once over all (token,
expert) slots, and the scatter back to the tokens is one ``index_add_`` in expert order.

With ``G = ∂L/∂y`` [T, H], the backward runs every chain-rule step from the weights *before* any update (design
invariant 1: the updates are applied after every dX and gₐ is computed)::

    gᵧ = G[t]                               [n_e, H]
    ∂r[t, p] = Σ_h gᵧ · oₑ                   the routing weights' gradient (it reaches the router)
    gₒ = gᵧ · r[t, p]                        [n_e, H]
    gₐ = gₒ W₂[e]                            [n_e, I]
    gᵤ = gate'(uₑ) ⊙ gₐ                       [n_e, 2I]   (autograd of the gate on the saved uₑ, any act)
    ∂x[t] += gᵤ W₁[e]                        [n_e, H]
    dW₂[e] = gₒᵀ aₑ    [H, I]                 dW₁[e] = gᵤᵀ xₑ    [2I, H]

and each weight follows its plan: ``ACTIVE`` (or no plan: plain autograd) returns the dense [E, ·, ·] gradient,
zero for the experts without a token, exactly what autograd accumulates into ``.grad``; ``SGD``/``SIGN`` hand
the per-expert pairs (gₒ, aₑ) and (gᵤ, xₑ) to :func:`~bread_kernels.update.update_experts_`, which applies
``W[e] -= lr·s·f(dW_e)`` expert by expert through the backend's fused GEMM epilogue — no [E, ·, ·] gradient
exists, and of one expert's dW only the backend's bounded chunks (none with SGD and nearest rounding: one
``addmm_``; on a GPU one Triton launch per expert, a grouped kernel being future work); an expert without a token
is not touched (its reference gradient is zero: SGD moves it by ``lr·0``, sign gives ``sign(0) = 0``) — under DDP
it takes the other ranks' average, every rank calling the update alike; ``FROZEN``: nothing.  A weight used
several times in one forward gets one update for its summed per-expert gradient after its last use's backward (the
plan's multi-use bookkeeping).

transformers' ``grouped_mm`` and ``batched_mm`` implementations compute the same maths with the GEMMs grouped
or batched and the top-k outputs summed per token: equal to fp32 rounding (with k = 2 the per-token sum is the
same two-term sum, so only the GEMMs' blocking differs) — outside autocast; under it ``grouped_mm`` computes in the
weights' dtype (below: ``autocast_casts=False``).  The patched module runs this function whatever the
config selects; an unplanned module (no optimizer yet) keeps transformers' own forward.

Under ``torch.autocast`` with dtype ``d`` (see :mod:`.autocast`) the eager forward's two ``F.linear`` per expert
run in ``d`` (operands cast to ``d``) and everything between them follows its inputs' dtype; so here ``xₑ``,
``W₁[e]``, ``aₑ`` and ``W₂[e]`` are cast to ``d``, ``uₑ``, ``aₑ`` (the gate of a ``d`` tensor, under the same
autocast) and ``oₑ`` are in ``d``, and ``oₑ · r`` and the scatter keep the eager promotions (the output in x's
dtype).  The backward's GEMMs run in ``d`` with the weights' casts taken before any update: ``gₐ``, ``gᵤ`` and
each expert's ``∂x`` in ``d`` (``∂x`` summed over the top-k in x's dtype, as autograd's index backward does);
``dW₁[e] = gᵤᵀ xₑ`` and ``dW₂[e] = gₒᵀ aₑ`` in ``d``, copied into the dense gradient in the weight's dtype (ACTIVE)
or handed to the update, which writes them in the weight's own dtype (SGD/SIGN).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..plan import Role, WeightPlan, trigger_gradient
from ..rounding import FLOAT_DTYPES
from ..update import update_experts_, writes_collectively
from .autocast import autocast_dtype, outside_autocast
from .linear import backward_trigger, check_plan_for_weight
from .recompute import is_recomputing

__all__ = ["FusedExpertsFunction", "fused_experts", "check_experts_inputs", "experts_layout_problem",
           "experts_gate", "EXPERT_WEIGHTS", "EXPERT_PLANS_ATTR"]

#: the 3-D parameters of a transformers experts module, in the order the function takes them
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
#: the attribute of a patched experts module holding ``{weight name: WeightPlan or None}`` (one plan per weight)
EXPERT_PLANS_ATTR = "_bread_expert_plans"
#: what transformers' ``use_experts_implementation`` records about the layout, and the values computed here
_LAYOUT_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                 "has_post_expert_norm": False}


def experts_layout_problem(module: nn.Module, shape_of: Callable[[torch.Tensor], torch.Size] = torch.Tensor.size
                           ) -> str | None:
    """None if ``module`` is a transformers experts module this function computes exactly; otherwise why not
    (a sentence).  Structural: the direct parameters are exactly ``gate_up_proj`` [E, 2I, H] and ``down_proj``
    [E, H, I] (3-D, one E, one H), an ``act_fn`` or ``_apply_gate`` gives the gating, and the layout flags that
    transformers' ``use_experts_implementation`` records (if any) are the concatenated, untransposed, bias-free
    gated layout of Qwen2/Qwen3-MoE and Mixtral.  ``shape_of`` gives a parameter's shape (patch gives a partitioned
    one's whole shape)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(EXPERT_WEIGHTS):
        return f"its direct parameters are {sorted(params)}, not {list(EXPERT_WEIGHTS)}"
    gate_up, down = shape_of(params["gate_up_proj"]), shape_of(params["down_proj"])
    if len(gate_up) != 3 or len(down) != 3:
        return f"gate_up_proj {tuple(gate_up)} and down_proj {tuple(down)} are not both 3-D"
    if gate_up[0] != down[0] or gate_up[2] != down[1] or gate_up[1] != 2 * down[2]:
        return f"gate_up_proj {tuple(gate_up)} and down_proj {tuple(down)} are not [E, 2I, H] and [E, H, I]"
    for flag, value in _LAYOUT_FLAGS.items():
        if hasattr(module, flag) and getattr(module, flag) != value:
            return f"its layout has {flag}={getattr(module, flag)!r} (the fused experts compute {flag}={value!r})"
    if not hasattr(module, "_apply_gate") and not callable(getattr(module, "act_fn", None)):
        return "it has neither act_fn nor _apply_gate"
    return None


def experts_gate(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's gating ``[n, 2I] -> [n, I]``: its ``_apply_gate`` (transformers' default is the one below), or
    ``act(gate) · up`` over the two halves, as the eager forward writes it."""
    if hasattr(module, "_apply_gate"):
        return module._apply_gate
    act = module.act_fn

    def gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate_half, up = gate_up.chunk(2, dim=-1)
        return act(gate_half) * up

    return gate


def check_experts_inputs(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, plans) -> None:
    """Raise a clear error for anything the fused experts cannot do correctly."""
    for plan in plans:
        if plan is not None and not isinstance(plan, WeightPlan):
            raise TypeError(f"fused_experts: plans must be bread_kernels.WeightPlan or None, got {type(plan).__name__}")
    for what, t in (("hidden_states", hidden_states), ("top_k_weights", top_k_weights),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_experts: {what} must be a float32/bfloat16/float16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if hidden_states.dim() != 2:
        raise ValueError(f"fused_experts: hidden_states must be [tokens, hidden], got {tuple(hidden_states.shape)}")
    tokens, hidden = hidden_states.shape
    if top_k_index.dtype not in (torch.int32, torch.int64) or top_k_index.dim() != 2 or \
            top_k_index.shape[0] != tokens:
        raise ValueError(f"fused_experts: top_k_index must be integer [tokens={tokens}, k], got "
                         f"{tuple(top_k_index.shape)} {top_k_index.dtype}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"fused_experts: top_k_weights {tuple(top_k_weights.shape)} must have top_k_index's shape "
                         f"{tuple(top_k_index.shape)}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3 or gate_up_proj.shape[0] != down_proj.shape[0] or \
            gate_up_proj.shape[2] != hidden or down_proj.shape[1] != hidden:
        raise ValueError(f"fused_experts: gate_up_proj {tuple(gate_up_proj.shape)} and down_proj "
                         f"{tuple(down_proj.shape)} must be [E, 2I, H={hidden}] and [E, H={hidden}, I]")
    for what, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj),
                    ("down_proj", down_proj)):
        if t.device != hidden_states.device:
            raise ValueError(f"fused_experts: hidden_states are on {hidden_states.device} but {what} is on "
                             f"{t.device}; move them together")
    mixed_ok = autocast_dtype(hidden_states.device) is not None  # autocast casts the GEMMs' operands
    for what, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != hidden_states.dtype and not mixed_ok:
            raise TypeError(f"fused_experts: hidden_states are {hidden_states.dtype} but {what} is {t.dtype}; cast "
                            "them to one dtype")
    for what, weight, plan in zip(EXPERT_WEIGHTS, (gate_up_proj, down_proj), plans):
        if plan is None:
            continue
        if plan.role is Role.LORA:
            raise ValueError(f"fused_experts: {plan.name or what} has role LORA; LoRA on expert weights is not "
                             "supported (give it ACTIVE, SGD, SIGN or FROZEN)")
        check_plan_for_weight("fused_experts", plan, weight, what)


def _routing(top_k_index: torch.Tensor, num_experts: int):
    """(token [S], position [S], counts per expert): the (token, top-k position) slots sorted by expert, within an
    expert by position then token — the order of the eager forward's ``torch.where(expert_mask[e])``.  Slots
    routed to an id >= E (expert-parallel sentinels) are left out, as the eager forward skips them."""
    tokens = top_k_index.shape[0]
    flat = top_k_index.t().reshape(-1)  # position-major: slot p·T + t
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()  # the one host sync
    order = order[: sum(counts)]
    return order % tokens, order // tokens, counts


def _spans(counts):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class FusedExpertsFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: hidden_states [T, H], top_k_index [T, k], top_k_weights
    [T, k], gate_up_proj [E, 2I, H], down_proj [E, H, I], gate (callable), plans (one WeightPlan or None per
    weight), trigger (or None).  Tensors are kept per (token, expert) slot, in expert order (S slots): expert e's
    GEMMs work on its row range of the slot buffers."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate, plans, trigger,
                autocast_casts=True):
        ctx.gate, ctx.plans = gate, plans
        ctx.roles = tuple(plan.role if plan is not None else None for plan in plans)
        ctx.uses = tuple(plan.register_use(ctx) if plan is not None and plan.role.updates_on_the_fly
                         and not is_recomputing() else None for plan in plans)
        token, position, counts = _routing(top_k_index, gate_up_proj.shape[0])
        ctx.counts = counts
        autocast = ctx.autocast = autocast_dtype(hidden_states.device)
        dtype = ctx.compute_dtype = (autocast if autocast_casts else gate_up_proj.dtype) or hidden_states.dtype
        x = hidden_states[token].to(dtype)  # [S, H]
        gate_up_out = x.new_empty(token.numel(), gate_up_proj.shape[1])  # uₑ, slot order
        with outside_autocast(hidden_states.device):  # the GEMMs in ``dtype``: their operands are cast already
            for e, start, stop in _spans(counts):
                gate_up_out[start:stop] = F.linear(x[start:stop], gate_up_proj[e].to(dtype))
        activated = gate(gate_up_out).to(dtype)  # aₑ (under autocast: cast for the GEMM, as F.linear's)
        down_out = x.new_empty(token.numel(), down_proj.shape[1])  # oₑ
        with outside_autocast(hidden_states.device):
            for e, start, stop in _spans(counts):
                down_out[start:stop] = F.linear(activated[start:stop], down_proj[e].to(dtype))
        final = torch.zeros_like(hidden_states)
        final.index_add_(0, token, (down_out * top_k_weights[token, position, None]).to(final.dtype))
        ctx.save_for_backward(hidden_states, top_k_weights, gate_up_proj, down_proj, token, position, gate_up_out,
                              down_out)
        # what the on-the-fly updates write, the weights themselves: a saved-tensor hook may hand copies back
        # (linear.start_weight_role)
        ctx.written = (gate_up_proj, down_proj)
        return final

    @staticmethod
    def backward(ctx, grad_output):
        with outside_autocast(grad_output.device):
            return _experts_backward(ctx, grad_output)


def _experts_backward(ctx, grad_output):
    hidden_states, top_k_weights, gate_up_proj, down_proj, token, position, gate_up_out, down_out = \
        ctx.saved_tensors
    dtype = ctx.compute_dtype
    weights = (gate_up_proj, down_proj)
    need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    # per weight: "grad" (returned to autograd), "update" (on the fly) or None
    modes = tuple("update" if role is not None and role.updates_on_the_fly else
                  "grad" if (role is None or role is Role.ACTIVE) and ctx.needs_input_grad[3 + i] else None
                  for i, role in enumerate(ctx.roles))
    need_gu = need_x or modes[0] is not None  # gᵤ: for ∂x and W₁
    need_go = need_gu or modes[1] is not None  # gₒ: for gₐ and W₂
    grad_x = grad_r = None
    grads = [torch.zeros_like(w) if mode == "grad" else None for w, mode in zip(weights, modes)]
    pairs: tuple[dict, dict] = ({}, {})  # expert -> (g, x) of each on-the-fly weight
    spans = list(_spans(ctx.counts))

    if need_go or need_r:  # the routing weights' product, through autograd: its exact dtype promotions
        with torch.enable_grad():
            o = down_out.detach().requires_grad_(need_go)
            r = top_k_weights[token, position].detach().requires_grad_(need_r)
            y = (o * r[:, None]).to(grad_output.dtype)
        wanted = [v for v, needed in ((o, need_go), (r, need_r)) if needed]
        tail = list(torch.autograd.grad(y, wanted, grad_output[token]))
        g_o = tail.pop(0) if need_go else None  # [S, H]
        if need_r:
            grad_r = torch.zeros_like(top_k_weights)
            grad_r[token, position] = tail.pop(0)
    if need_go:
        with torch.enable_grad(), _autocast_of(ctx, grad_output.device):  # the gate as the forward ran it
            u = gate_up_out.detach().requires_grad_(need_gu)
            a = ctx.gate(u)  # [S, I]
        a_c = a.detach().to(dtype)  # the GEMM operand
        g_a = g_o.new_empty(a.shape) if need_gu else None
        for e, start, stop in spans:
            rows = slice(start, stop)
            if need_gu:
                g_a[rows] = g_o[rows] @ down_proj[e].to(dtype)  # from W₂ before its update
            _weight_gradient(modes[1], grads[1], pairs[1], e, g_o[rows], a_c[rows])
    if need_gu:
        (g_u,) = torch.autograd.grad(a, u, g_a.to(a.dtype))  # [S, 2I]
        x = hidden_states[token].to(dtype) if modes[0] is not None else None
        dx = g_u.new_empty(token.numel(), hidden_states.shape[1]) if need_x else None
        for e, start, stop in spans:
            rows = slice(start, stop)
            if need_x:
                dx[rows] = g_u[rows] @ gate_up_proj[e].to(dtype)  # from W₁ before its update
            if modes[0] is not None:
                _weight_gradient(modes[0], grads[0], pairs[0], e, g_u[rows], x[rows])
        if need_x:
            grad_x = torch.zeros_like(hidden_states).index_add_(0, token, dx.to(hidden_states.dtype))

    for plan, role, use, weight, mode, mine in zip(ctx.plans, ctx.roles, ctx.uses, ctx.written, modes, pairs):
        if mode != "update":
            continue
        pending = plan.finish_use(use, mine)
        if pending is not None:
            merged: dict[int, list] = {}
            for contribution in pending:
                for e, pair in contribution.items():
                    merged.setdefault(e, []).append(pair)
            if merged or writes_collectively(plan):  # every rank calls alike, whichever experts its tokens reached
                update_experts_(plan, role, weight, merged)
    return grad_x, None, grad_r, grads[0], grads[1], None, None, trigger_gradient(ctx.needs_input_grad[7]), None


def _autocast_of(ctx, device: torch.device):
    """The forward's autocast (the gate's recompute in the backward sees what the forward's gate saw)."""
    if ctx.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=ctx.autocast)


def _weight_gradient(mode, grad, pairs, e, g, x) -> None:
    """Expert ``e``'s share of one weight's gradient ``gᵀx``: into the dense gradient (a copy into its dtype), or
    kept for the update."""
    if mode == "grad":
        grad[e] = g.t() @ x
    elif mode == "update":
        pairs[e] = (g, x)


@torch.compiler.disable  # under torch.compile: a graph break (see fused_linear)
def fused_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  plans: tuple[WeightPlan | None, WeightPlan | None],
                  gate: Callable[[torch.Tensor], torch.Tensor], autocast_casts: bool = True) -> torch.Tensor:
    """The experts' output [T, H] whose backward follows ``plans`` (one per weight: gate_up_proj, down_proj; None
    is plain autograd for that weight).  ``gate`` maps [n, 2I] to [n, I] (:func:`experts_gate`).
    ``autocast_casts``: whether ``torch.autocast`` casts the GEMMs (the eager and ``batched_mm`` implementations);
    False computes them in the weights' dtype under autocast too, as transformers' ``grouped_mm`` does (``torch``'s
    grouped GEMM is not autocast-enabled, so it casts the input to the weights' dtype)."""
    plans = tuple(plans)
    if len(plans) != 2:
        raise ValueError(f"fused_experts: plans must be (gate_up_proj's, down_proj's), got {len(plans)} entries")
    check_experts_inputs(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, plans)
    trigger = None
    if torch.is_grad_enabled() and any(plan is not None and plan.role.updates_on_the_fly for plan in plans):
        trigger = backward_trigger()  # the backward runs, and knows whether it accumulates (see trigger_for)
    return FusedExpertsFunction.apply(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate,
                                      plans, trigger, autocast_casts)
