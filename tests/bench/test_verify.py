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


def _fp32_bias_case(turned: int, gradient_error: float = 1e-7):
    """An fp32 Adam step of a 128-element bias whose gradient is ~Adam's eps in ``turned`` elements (a Qwen2
    k_proj bias: ~3e-8), where a rounding difference of the gradient moves the step by up to lr."""
    gen = torch.Generator().manual_seed(2)
    g_ref = torch.randn(128, generator=gen, dtype=torch.float64)
    g_ref[:turned] = 3e-8
    g_eng = g_ref * (1 + gradient_error * torch.randn(128, generator=gen, dtype=torch.float64))
    g_eng[:turned] = 1e-8
    before = torch.randn(128, generator=gen, dtype=torch.float64)
    step = lambda g: LR * g / (g.abs() + 1e-8)  # noqa: E731 - Adam's first step
    ref, eng = (before - step(g_ref)).float(), (before - step(g_eng)).float()
    return ({"b": eng}, {"b": ref}, {"b": before.float()}, {"b": Role.ACTIVE}), ({"b": g_eng.float()},
                                                                                   {"b": g_ref.float()})


def test_fp32_adam_may_move_elements_whose_gradient_is_near_eps_by_what_their_gradients_make_of_it():
    """1% of a 128-element tensor is one element: the bench refused Qwen2 and GPT-2 whose gradients matched."""
    case, gradients = _fp32_bias_case(turned=3)
    compare_parameters(*case, lr=LR, what="bias", gradients=gradients)
    with pytest.raises(VerificationError, match="worst tensor b"):  # without the gradients: the 1% rule
        compare_parameters(*case, lr=LR, what="bias")
    case, gradients = _fp32_bias_case(turned=3, gradient_error=1e-2)  # gradients that differ: refused
    with pytest.raises(VerificationError, match="worst tensor b"):
        compare_parameters(*case, lr=LR, what="bias", gradients=gradients)


def test_the_bench_verifies_a_model_with_dropout():
    """GPT-2's config has dropout 0.1: each side drew its own masks, and the verification failed."""
    from bread_kernels import patch
    from bread_kernels.bench.model import verify_step
    from tests import model_zoo as models

    base = models.gpt2(dropout=0.1).train()
    ids = models.batch(0)
    import copy

    verify_step(patch(copy.deepcopy(base)).train(), copy.deepcopy(base).train(), "BAdam", 0, ids, lr=1e-3)
