"""The on-the-fly update of one weight: the one place that checks, reports, reads the step, draws the seed and writes.

Every SGD/SIGN update in the library goes through one of four entry points, by the shape of its gradient:

=========================  ======================================================  ==================================
entry point                gradient                                                callers
=========================  ======================================================  ==================================
:func:`update_linear_`     ``dW = gᵀx`` from (g [M, N], x [M, K]) pairs, summed      the fused linear and LoRA functions
:func:`update_experts_`    expert e of a 3-D weight [E, N, K]: ``dW_e = gₑᵀxₑ``     the fused experts function
:func:`update_rows_`       the summed rows ``G`` [R, H] of the distinct ids [R]     the fused embedding
:func:`update_dense_`      a materialised gradient of the parameter's shape          the optimizer's hook path (norms)
=========================  ======================================================  ==================================

Each does, in this order: read ``lr·s`` (:meth:`OnTheFlyUpdate.step_size`), hand the write to the plan's
:class:`UpdateTarget` with the update's seed stream, and, when the target reports a non-finite gradient, undo the
seed draws (a skipped update draws no random stream) and report the skip on the plan (design invariant 3).

*Where the bytes go* is the target's job: :data:`LOCAL` (the default, ``plan.target is None``) writes the tensor
itself through the backend of its device; the DeepSpeed integration supplies a target that reduce-scatters dW and
writes this rank's ZeRO-3 shard.  Nothing here knows which; that is what keeps ``functions/`` free of DeepSpeed.
A target checks finiteness itself because a sharded one must agree across ranks (a flag rides in its collective).
"""

from __future__ import annotations

from typing import Callable

import torch

from .backends import get_backend
from .plan import OnTheFlyUpdate, Role, WeightPlan

__all__ = ["UpdateTarget", "LocalTarget", "LOCAL", "all_finite", "update_linear_", "update_experts_", "update_rows_",
           "update_dense_"]


def all_finite(*tensors: torch.Tensor) -> bool:
    """True if no element is inf or nan: one min/max reduction per tensor, which propagates nan and allocates
    nothing tensor-sized (``isfinite`` would build several masks, ``sum(dtype=fp32)`` an fp32 copy)."""
    extremes = [value for t in tensors if t.numel() for value in torch.aminmax(t)]
    return not extremes or bool(torch.isfinite(torch.stack(extremes).float()).all())


class UpdateTarget:
    """Where an on-the-fly update writes (a strategy a :class:`~bread_kernels.plan.WeightPlan` carries).

    Each method applies ``P -= step · f(gradient)`` (``f`` the identity, or ``sign`` when ``sign``), rounding with
    ``update.rounding`` and drawing seeds with ``update.next_seed()``, and returns False — having written nothing
    — when the gradient is not finite.  ``skip_reason`` is what the plan reports then.
    """

    skip_reason = "its gradient is not finite"

    def linear_(self, weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor, x: torch.Tensor,
                step: float, sign: bool, update: OnTheFlyUpdate) -> bool:
        """``weight`` [N, K] with ``dW = gᵀx`` (g [M, N], x [M, K]); ``bias`` [N] with ``db = Σ_m g``."""
        raise NotImplementedError

    def experts_(self, weight: torch.Tensor, per_expert: dict[int, tuple[torch.Tensor, torch.Tensor]], step: float,
                 sign: bool, update: OnTheFlyUpdate) -> bool:
        """A 3-D expert weight [E, N, K]: each expert ``e`` in ``per_expert`` with ``dW_e = gᵀx`` (g [M_e, N],
        x [M_e, K]); the other experts are left untouched (their gradient is zero)."""
        raise NotImplementedError(
            f"bread_kernels: the update target {type(self).__name__} cannot write 3-D expert weights (mixture-of-"
            "experts); train the experts with Role.ACTIVE or FROZEN there"
        )

    def rows_(self, weight: torch.Tensor, rows: torch.Tensor, summed: torch.Tensor, step: float, sign: bool,
              update: OnTheFlyUpdate) -> bool:
        """Rows ``rows`` [R] of ``weight`` [V, H] with their summed fp32 gradients ``summed`` [R, H]."""
        raise NotImplementedError

    def dense_(self, param: torch.Tensor, grad: torch.Tensor, step: float, sign: bool,
               update: OnTheFlyUpdate) -> bool:
        """``param`` (any shape) with ``grad`` of its shape."""
        raise NotImplementedError


class LocalTarget(UpdateTarget):
    """The tensor itself, through the backend of its device (no dW tensor for a linear weight)."""

    def linear_(self, weight, bias, g, x, step, sign, update) -> bool:
        if not all_finite(g, x):
            return False
        backend = get_backend(weight.device)
        backend.update_weight_(weight, g, x, step, sign, update.rounding, update.next_seed())
        if bias is not None:
            backend.apply_update_(bias, g.sum(0, dtype=torch.float32), step, sign, update.rounding,
                                  update.next_seed())
        return True

    def experts_(self, weight, per_expert, step, sign, update) -> bool:
        """One seed for the whole parameter, and expert ``e``'s slice ``weight[e]`` (a 2-D view) written through the
        backend with ``offset = e·N·K``: every element draws the random bits of its logical index in [E, N, K], as
        :meth:`dense_` of the whole tensor would.  All experts' operands are checked first: a non-finite one skips
        the whole parameter, as the reference's hook skips its whole gradient."""
        if not all_finite(*(t for pair in per_expert.values() for t in pair)):
            return False
        backend = get_backend(weight.device)
        seed = update.next_seed()
        per_slice = weight.shape[1] * weight.shape[2]
        for e in sorted(per_expert):
            g, x = per_expert[e]
            backend.update_weight_(weight[e], g, x, step, sign, update.rounding, seed, offset=e * per_slice)
        return True

    def rows_(self, weight, rows, summed, step, sign, update) -> bool:
        if not all_finite(summed):
            return False
        with torch.no_grad():
            selected = weight.index_select(0, rows)
            get_backend(weight.device).apply_update_(selected, summed, step, sign, update.rounding,
                                                     update.next_seed())
            weight.index_copy_(0, rows, selected)
        return True

    def dense_(self, param, grad, step, sign, update) -> bool:
        if not all_finite(grad):
            return False
        target = param.detach()
        flat = target.view(-1) if target.dim() > 2 else target
        with torch.no_grad():
            get_backend(param.device).apply_update_(flat, grad.float().reshape(flat.shape), step, sign,
                                                    update.rounding, update.next_seed())
        return True


LOCAL = LocalTarget()


def _apply(plan: WeightPlan, role: Role, write: Callable[[UpdateTarget, float, bool, OnTheFlyUpdate], bool]) -> bool:
    update = plan.update
    if update is None or not role.updates_on_the_fly:
        raise ValueError(f"bread_kernels: {plan.name or 'a weight'} has role {role.name}, which takes no on-the-fly "
                         "update")
    target = plan.target if plan.target is not None else LOCAL
    draws = update.draws
    if write(target, update.step_size(), role is Role.SIGN, update):
        return True
    update.draws = draws  # a skipped update draws no random stream
    plan.report_skip(target.skip_reason)
    return False


def update_linear_(plan: WeightPlan, role: Role, weight: torch.Tensor, bias: torch.Tensor | None,
                   contributions: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """``plan``'s update of a linear weight (and bias) for the summed gradient of the (g [M, N], x [M, K]) pairs,
    one per use of the weight in the forward.  Returns False (reported, nothing written) if it was skipped."""
    if len(contributions) == 1:
        g, x = contributions[0]
    else:
        g = torch.cat([c[0] for c in contributions])
        x = torch.cat([c[1] for c in contributions])
    return _apply(plan, role, lambda target, step, sign, update: target.linear_(weight, bias, g, x, step, sign,
                                                                                update))


def update_experts_(plan: WeightPlan, role: Role, weight: torch.Tensor,
                    contributions: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> bool:
    """``plan``'s update of a 3-D expert weight ``weight`` [E, N, K] (``gate_up_proj``, ``down_proj``): expert ``e``
    takes the update for ``dW_e = Σ gᵀx`` over its (g [M_e, N], x [M_e, K]) pairs — the tokens routed to it, one
    pair per use of the weight in the forward.  Experts absent from ``contributions`` received no token: their gradient
    is zero and they are not written (SGD: ``-lr·0``; SIGN: ``sign(0) = 0``).  No [E, N, K] gradient exists.
    Returns False (reported, nothing written) if it was skipped."""
    per_expert = {}
    for e, pairs in contributions.items():
        per_expert[e] = pairs[0] if len(pairs) == 1 else (torch.cat([g for g, _ in pairs]),
                                                          torch.cat([x for _, x in pairs]))
    return _apply(plan, role, lambda target, step, sign, update: target.experts_(weight, per_expert, step, sign,
                                                                                 update))


def update_rows_(plan: WeightPlan, role: Role, weight: torch.Tensor, rows: torch.Tensor,
                 summed: torch.Tensor) -> bool:
    """``plan``'s row-sparse update of an embedding table: ``rows`` [R] distinct ids, ``summed`` [R, H] fp32."""
    return _apply(plan, role, lambda target, step, sign, update: target.rows_(weight, rows, summed, step, sign,
                                                                              update))


def update_dense_(plan: WeightPlan, param: torch.Tensor, grad: torch.Tensor) -> bool:
    """``plan``'s update of a parameter whose whole gradient ``grad`` exists (the hook path)."""
    return _apply(plan, plan.role, lambda target, step, sign, update: target.dense_(param, grad, step, sign,
                                                                                    update))
