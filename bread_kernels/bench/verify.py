"""Before the model benchmark times anything, it checks that the engine and the reference compute the same step.

One optimizer step (forward, backward, ``step()``) of the engine and of each reference way, from the same state and
on the same batch, with the on-the-fly updates rounded to nearest (the reference's rounding), must leave the same
parameters.  Tolerances, per element, with ``before`` and ``after`` the parameter around the step:

* parameters that are frozen or updated on the fly (SGD / sign): fp32 ``|Δ| ≤ 1e-6 + 1e-5·|ref|``; bf16/fp16
  ``|Δ| ≤ 1e-6 + 2⁻⁷·max(|before|, |ref|, |engine|) + 2⁻⁵·|ref − before|`` (one ulp of the update's operands:
  the engine's dW is summed in a different order, and on a GPU kept in fp32 rather than rounded to the weight's
  dtype first; and a few bf16 roundings of the update itself, as the fused head+loss rounds the logits' gradient
  from another fp32 summation than autograd's);
* parameters the base optimizer (Adam) trains, in fp32: the same bound, except that up to 1% of a tensor's elements
  may differ by up to ``2·lr``: Adam normalises each gradient, so an element whose gradient is ~0 can turn its step
  by a rounding difference of that gradient (the tests' ``adam_outliers`` rule);
* where the gradients are given (``gradients``, the step's ``.grad`` of each side; the bench always gives them):
  the gradient is what is checked, and the step only against it.  The tensor's gradients must agree in norm,
  ``‖g_eng − g_ref‖ ≤ 10⁻⁴·‖g_ref‖`` in fp32 (summation order) and ``2⁻⁵·‖g_ref‖`` in bf16/fp16 (a few bf16
  roundings: the fused head+loss rounds the logits' gradient to bf16 from an fp32 softmax summed in another order
  than autograd's log-softmax backward, and every gradient below it inherits that); then each element may differ by
  the bound above plus what Adam's first step from a fresh state,
  ``s(g) = lr·g/(|g| + ε)``, makes of the two gradients, ``|s(g_eng) − s(g_ref)|``.  That step normalises each
  gradient, so an element whose gradient is at its rounding error from zero turns (up to ``2·lr``; measured, 2.5% of
  a zero-initialised LoRA ``B``'s elements under BREAD in bf16), and one whose gradient is within a few ``ε`` moves
  by ``lr·ε·Δg/g²`` (a Qwen2 k_proj bias whose gradient is ~3e-8, a GPT-2 key bias whose true gradient is 0); an
  element whose gradient agrees gets no allowance.  No fraction is counted; without gradients the fp32 rule above
  applies, with 2% in bf16/fp16;
* parameters updated by SGD in bf16/fp16: the same bound, except that up to 0.1% of a tensor's elements may be off by
  up to four times it: an element whose summed gradient nearly cancels has a rounding error large against itself;
* parameters updated by SIGN: the same bound, except that up to 0.1% (bf16/fp16: 1%, measured 0.6% of a norm
  weight's) of a tensor's elements may differ by one sign
  flip, up to ``2·lr``: an element whose summed gradient is ~0 takes its sign from the summation order.  Where the
  reference's gradient is given (the bench gives it), every element whose reference gradient is within one ulp of
  the tensor's largest gradient from zero (``|g_ref| ≤ eps·max|g_ref|``, ``eps`` fp32's, the accumulation's) may
  flip too, uncounted: its sign is rounding noise, the true gradient is ~0 (GPT-2's key bias, a third of
  ``c_attn.bias``, has a true gradient of exactly 0, softmax being invariant to it: measured ``2·10⁻⁹·max`` in fp32,
  and each side took the sign of its own noise); an element with a gradient above that still counts;

Each fraction allows at least one element (a norm weight of 512 elements can turn one sign).  A failure raises
:class:`VerificationError` naming the worst tensor.

A value that is not finite never lies within a tolerance: an engine's NaN or inf where the reference's step is finite
fails (``diff > bound`` is False for a NaN, so each comparison is written as ``not diff <= bound``).  A reference
step that is not finite itself (a NaN or inf parameter or gradient after it) is refused: there is nothing to verify
against, and an inf on both sides would otherwise give a NaN difference.  So is a reference step without a
gradient: every gradient given zero, or (without gradients) no parameter moved.  A loss over no token has all-zero
gradients (then AdamW's weight decay alone moves the parameters), and an engine that computed no gradient either
would pass.
"""

from __future__ import annotations

import math

import torch

from ..plan import Role

__all__ = ["VerificationError", "compare_parameters", "ADAM_OUTLIER_FRACTION", "SIGN_FLIP_FRACTION",
           "GRADIENT_NORM_TOLERANCE"]

ADAM_OUTLIER_FRACTION = 0.01
SIGN_FLIP_FRACTION = 1e-3


class VerificationError(RuntimeError):
    """The engine's step differs from the reference's beyond the stated tolerance."""


def _bound(ref: torch.Tensor, before: torch.Tensor, eng: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return 1e-6 + 1e-5 * ref.abs()
    # |eng| too: a result one ulp away across a power of two has the ulp of the larger binade (a finite one: an inf
    # would widen its own bound to inf); and 2⁻⁵ of the update itself: the fused head+loss rounds the logits'
    # gradient to bf16 from another fp32 summation, so each gradient below it (and each update) differs by a few
    # bf16 roundings
    eng = torch.where(eng.isfinite(), eng.abs(), 0.0)
    return (1e-6 + 2.0 ** -7 * torch.maximum(torch.maximum(before.abs(), ref.abs()), eng)
            + 2.0 ** -5 * (ref - before).abs())


GRADIENT_NORM_TOLERANCE = 2.0 ** -5  # bf16/fp16
FP32_GRADIENT_NORM_TOLERANCE = 1e-4


def _adam_first_step_spread(grad_engine: torch.Tensor, grad_reference: torch.Tensor, lr: float,
                            eps: float, tolerance: float = GRADIENT_NORM_TOLERANCE) -> torch.Tensor | None:
    """``|s(g_eng) − s(g_ref)|`` per element, with ``s(g) = lr·g/(|g| + eps)`` Adam's first step from a fresh state
    (bias-corrected: ``m̂ = g``, ``v̂ = g²``); None if the two gradients differ by more than ``tolerance`` of the
    reference's norm."""
    g_eng, g_ref = grad_engine.detach().double(), grad_reference.detach().double()
    if not float((g_eng - g_ref).norm()) <= tolerance * float(g_ref.norm()):  # a NaN norm differs too
        return None

    def first_step(g):
        return lr * g / (g.abs() + eps)

    return (first_step(g_eng) - first_step(g_ref)).abs()


def _sign_of_rounding_noise(grad_reference: torch.Tensor) -> torch.Tensor:
    """Where a gradient's sign is rounding noise: ``|g| ≤ eps·max|g|``, within one fp32 ulp of the tensor's largest
    gradient from zero.  A summed gradient whose terms cancel is left with an error of about that size from the
    fp32 accumulation (a GEMM's, in bf16 as in fp32), so its sign depends on the summation order; rounding the sum
    to bf16 keeps its sign, so bf16's own eps (2⁻⁷: 4.5% of a bf16 tensor's elements, measured) would forgive far
    more than noise."""
    g = grad_reference.detach().abs().double()
    return g <= torch.finfo(torch.float32).eps * g.max()


def compare_parameters(engine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                       before: dict[str, torch.Tensor], roles: dict[str, Role], lr: float, what: str,
                       gradients: tuple[dict, dict] | None = None, low_precision: bool | None = None,
                       adam_eps: float = 1e-8) -> None:
    """Raise :class:`VerificationError` if any parameter of ``engine`` is outside the tolerance around
    ``reference`` (all three dicts by name, the same names); ``roles`` says which the base optimizer trained;
    ``gradients``, ``(engine's, reference's)`` by name, the ``.grad`` of the parameters the base optimizer trained,
    taken before its step, and on the reference's side also those of the SIGN-updated parameters (the gradient
    their hooks consumed; the engine's fused update has none); ``low_precision``: whether the step computed in
    bf16/fp16 (None: each parameter's own dtype says; peft keeps LoRA adapters in fp32 under a bf16 model);
    ``adam_eps``: the base optimizer's ``eps`` (the step compared is Adam's first from a fresh state)."""
    _refuse_a_non_finite_reference(reference, gradients, what)
    _refuse_a_reference_without_gradient(reference, before, gradients, what)
    worst = None
    for name, ref in reference.items():
        eng = engine[name].detach().double()
        ref = ref.detach().double()
        start = before[name].double()
        diff = (eng - ref).abs()
        low = engine[name].dtype != torch.float32 if low_precision is None else low_precision
        bound = _bound(ref, start, eng, engine[name].dtype)
        bad = ~(diff <= bound)  # a NaN is outside every bound
        if (gradients is not None and roles.get(name) is Role.ACTIVE and name in gradients[1]
                and gradients[1][name] is not None):
            tolerance = GRADIENT_NORM_TOLERANCE if low else FP32_GRADIENT_NORM_TOLERANCE
            spread = (None if gradients[0].get(name) is None
                      else _adam_first_step_spread(gradients[0][name], gradients[1][name], lr, adam_eps, tolerance))
            if spread is None:  # the gradients themselves differ: report the whole tensor
                bad = torch.ones_like(bad)
            else:
                bad = ~(diff <= bound + spread)
            fraction = None
        else:
            fraction = {Role.ACTIVE: ADAM_OUTLIER_FRACTION * (2 if low else 1),
                        Role.SIGN: SIGN_FLIP_FRACTION * (10 if low else 1),
                        Role.SGD: SIGN_FLIP_FRACTION if low else None}.get(roles.get(name))
        if roles.get(name) is Role.SIGN and gradients is not None and gradients[1].get(name) is not None:
            bad = bad & ~(_sign_of_rounding_noise(gradients[1][name]) & (diff <= 2 * lr + bound))
        if fraction is not None and bad.any():
            reach = 4 * bound if roles.get(name) is Role.SGD else 2 * lr + bound
            outliers = bad & (diff <= reach)
            if int(outliers.sum()) <= max(1, math.floor(fraction * bad.numel())):  # a small tensor may have one
                bad = bad & ~outliers
        if bad.any():
            excess = float(torch.nan_to_num(diff, nan=math.inf).max())
            if worst is None or excess > worst[1]:
                worst = (name, excess, int(bad.sum()), bad.numel(), roles.get(name), int((~eng.isfinite()).sum()))
    if worst is not None:
        name, excess, count, total, role, non_finite = worst
        raise VerificationError(
            f"{what}: the engine's step differs from the reference's; worst tensor {name} (role "
            f"{role.name if role else '?'}): max |diff| {excess:.3g}, {count}/{total} elements outside the tolerance"
            + (f", {non_finite} of them not finite on the engine's side" if non_finite else ""))


def _refuse_a_non_finite_reference(reference: dict[str, torch.Tensor], gradients: tuple[dict, dict] | None,
                                   what: str) -> None:
    """A reference step that left a parameter or a gradient not finite is nothing to verify against: refused,
    naming the first such tensor (the engine's agreeing with it would say nothing, and inf against inf is NaN)."""
    tensors = [(f"parameter {name}", t) for name, t in reference.items()]
    if gradients is not None:
        tensors += [(f"gradient of {name}", t) for name, t in gradients[1].items() if t is not None]
    for label, tensor in tensors:
        if not bool(tensor.detach().isfinite().all()):
            raise VerificationError(
                f"{what}: the reference's step is not finite (its {label} has NaN or inf values), so there is nothing "
                "to verify the engine's against; check the model's weights and the batch (a loss over no token is "
                "NaN)")


def _refuse_a_reference_without_gradient(reference: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                                         gradients: tuple[dict, dict] | None, what: str) -> None:
    """A reference step whose gradients are all zero (given) or that moved no parameter (without gradients) is
    nothing to verify against: an engine that computes no gradient would agree with it."""
    if gradients is not None:
        given = [g for g in gradients[1].values() if g is not None]
        if given and any(bool(g.detach().any()) for g in given):
            return
        found = "every gradient of the trained parameters is zero" if given else "no trained parameter has a gradient"
    elif any(not torch.equal(ref, before[name]) for name, ref in reference.items()):
        return
    else:
        found = "it moved no parameter"
    raise VerificationError(f"{what}: the reference's step has no gradient ({found}; a loss with no token to score "
                            "has none), so there is nothing to verify the engine's against")
