"""The model benchmark's step verification: its tolerances pass rounding and fail real differences."""

import pytest
import torch

from bread_kernels import Role
from bread_kernels.bench.verify import SIGN_FLIP_FRACTION, VerificationError, compare_parameters

LR = 0.05


def _case(flips: int, role: Role):
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(100, 50, generator=gen)
    ref = before - LR * torch.sign(torch.randn(100, 50, generator=gen))
    eng = ref.clone()
    eng.view(-1)[:flips] += 2 * LR  # a sign flip of the first elements' update
    return {"w": eng}, {"w": ref}, {"w": before}, {"w": role}


def test_a_rare_sign_flip_of_a_sign_update_passes():
    compare_parameters(*_case(int(SIGN_FLIP_FRACTION * 5000), Role.SIGN), lr=LR, what="sign")


@pytest.mark.parametrize("flips,role", [(50, Role.SIGN), (1, Role.SGD), (1, Role.FROZEN)])
def test_more_flips_or_a_flip_elsewhere_fails(flips, role):
    with pytest.raises(VerificationError, match="worst tensor w"):
        compare_parameters(*_case(flips, role), lr=LR, what="case")


def _adam_case(turn_index: int, gradient_error: float = 1e-3):
    """A bf16 Adam step of lr per element (``before → ref``) whose engine turns the step of one element; the
    gradients agree up to ``gradient_error`` relative noise, and element 0's gradient is ~0, of the other sign on
    the engine's side (as a rounding difference makes it)."""
    gen = torch.Generator().manual_seed(1)
    g_ref = torch.randn(64, 32, generator=gen)
    g_ref.view(-1)[0] = 1e-4
    g_eng = g_ref + gradient_error * g_ref.norm() / g_ref.numel() ** 0.5 * torch.randn(64, 32, generator=gen)
    g_eng.view(-1)[0] = -1e-4
    before = torch.randn(64, 32, generator=gen).bfloat16()
    ref = (before.float() - LR * torch.sign(g_ref)).bfloat16()
    eng = ref.clone()
    eng.view(-1)[turn_index] += (2 * LR * torch.sign(g_ref.view(-1)[turn_index])).bfloat16()
    return ({"w": eng}, {"w": ref}, {"w": before}, {"w": Role.ACTIVE}), ({"w": g_eng}, {"w": g_ref})


def test_low_precision_adam_may_turn_an_element_whose_gradient_is_at_its_rounding_error_from_zero():
    case, gradients = _adam_case(turn_index=0)
    compare_parameters(*case, lr=LR, what="adam", gradients=gradients)


def test_low_precision_adam_may_not_turn_an_element_with_a_real_gradient():
    case, gradients = _adam_case(turn_index=5)
    with pytest.raises(VerificationError, match="worst tensor w"):
        compare_parameters(*case, lr=LR, what="adam", gradients=gradients)


def test_low_precision_adam_fails_when_the_gradients_differ_beyond_rounding():
    case, gradients = _adam_case(turn_index=0, gradient_error=0.2)
    with pytest.raises(VerificationError, match="worst tensor w"):
        compare_parameters(*case, lr=LR, what="adam", gradients=gradients)
