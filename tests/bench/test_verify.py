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



def test_a_refused_step_leaves_no_hook_on_the_reference():
    """A sign variant keeps its reference's gradients with a tensor hook on each SIGN parameter; a reference loss
    that is not finite (one token per sequence: the shifted labels score none) refused the step and left them on
    the model, where each later backward copied the gradients again."""
    import copy

    from bread_kernels import patch
    from bread_kernels.bench.model import verify_step
    from tests import model_zoo as models

    base = models.llama(layers=3).train()
    ids = models.batch(0, shape=(2, 1))
    reference = copy.deepcopy(base).train()
    with pytest.raises(VerificationError, match="nothing to verify"):
        verify_step(patch(copy.deepcopy(base)).train(), reference, "BREAD-SGD-sign", 1, ids, lr=1e-3)
    hooked = [n for n, p in reference.named_parameters() if p._backward_hooks]
    assert not hooked, f"hooks left on the reference's {hooked}"
    assert not any(p._post_accumulate_grad_hooks for p in reference.parameters()), "the optimizer's hooks left"

def _finite_case(role: Role, low: bool):
    """A step the engine computed exactly as the reference (so it passes), for a role and a precision."""
    gen = torch.Generator().manual_seed(3)
    before = torch.randn(40, 30, generator=gen)
    grad = torch.randn(40, 30, generator=gen)
    ref = before - LR * torch.sign(grad)
    if low:
        before, ref = before.bfloat16(), ref.bfloat16()
    return {"w": ref.clone()}, {"w": ref}, {"w": before}, {"w": role}, ({"w": grad.clone()}, {"w": grad})


@pytest.mark.parametrize("low", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("role, with_gradients", [(Role.ACTIVE, True), (Role.ACTIVE, False), (Role.SIGN, False),
                                                  (Role.SGD, False), (Role.FROZEN, False)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_engine_value_fails_whatever_the_role(role, with_gradients, low, value):
    """``diff > bound`` is False for a NaN: one NaN element (which every fraction rule would allow as an outlier) in
    a step the reference took finite passed, and an inf on the engine's side passed wherever its rule counted it
    among the outliers."""
    engine, reference, before, roles, gradients = _finite_case(role, low)
    compare_parameters(engine, reference, before, roles, lr=LR, what="case",
                       gradients=gradients if with_gradients else None)  # the case itself passes
    engine["w"].view(-1)[7] = value
    with pytest.raises(VerificationError, match=r"worst tensor w .*1/1200 elements outside the tolerance, 1 of them "
                                                r"not finite on the engine's side"):
        compare_parameters(engine, reference, before, roles, lr=LR, what="case",
                           gradients=gradients if with_gradients else None)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_engine_gradient_fails(value):
    """The gradients' norms were compared with ``>``: a NaN norm passed, and the step check then had a NaN
    allowance."""
    engine, reference, before, roles, (g_eng, g_ref) = _finite_case(Role.ACTIVE, low=True)
    g_eng["w"].view(-1)[3] = value
    with pytest.raises(VerificationError, match="worst tensor w"):
        compare_parameters(engine, reference, before, roles, lr=LR, what="case", gradients=(g_eng, g_ref))


@pytest.mark.parametrize("where", ["parameter", "gradient", "both sides inf"])
def test_a_reference_step_that_is_not_finite_is_refused(where):
    """Nothing to verify against: an inf on both sides gave a NaN difference, which passed."""
    engine, reference, before, roles, (g_eng, g_ref) = _finite_case(Role.ACTIVE, low=False)
    if where == "gradient":
        g_ref["w"].view(-1)[0] = float("nan")
        g_eng["w"].view(-1)[0] = float("nan")
    else:
        reference["w"].view(-1)[0] = float("inf")
        if where == "both sides inf":
            engine["w"].view(-1)[0] = float("inf")
    label = "gradient of w" if where == "gradient" else "parameter w"
    with pytest.raises(VerificationError, match=f"the reference's step is not finite \\(its {label} has NaN or inf "
                                                "values\\), so there is nothing to verify the engine's against"):
        compare_parameters(engine, reference, before, roles, lr=LR, what="case", gradients=(g_eng, g_ref))


def test_a_reference_step_without_a_gradient_is_refused():
    """A loss over no token (``--seq 1``): zero gradients (AdamW's weight decay alone moved the parameters), and an
    engine that computed no gradient either "agreed"."""
    engine, reference, before, roles, (g_eng, g_ref) = _finite_case(Role.ACTIVE, low=False)
    zero = ({"w": torch.zeros_like(g_eng["w"])}, {"w": torch.zeros_like(g_ref["w"])})
    with pytest.raises(VerificationError, match="the reference's step has no gradient \\(every gradient of the "
                                                "trained parameters is zero"):
        compare_parameters(engine, reference, before, roles, lr=LR, what="case", gradients=zero)
    with pytest.raises(VerificationError, match="the reference's step has no gradient \\(it moved no parameter"):
        compare_parameters({"w": before["w"].clone()}, {"w": before["w"].clone()}, before, roles, lr=LR, what="case")


def _key_bias_case(real_flips: int, dtype=torch.float32):
    """A SIGN-updated GPT-2 ``c_attn.bias`` of hidden 64: the key third's true gradient is 0 (softmax is invariant to
    a key bias), so the reference's is rounding noise (measured 2e-9 of the tensor's largest) and the engine's sign
    of its own noise differs in half of them; ``real_flips`` query elements, whose gradients are real, flipped too."""
    gen = torch.Generator().manual_seed(4)
    g_ref = torch.randn(192, generator=gen) * 1e-2
    g_ref[64:128] = torch.randn(64, generator=gen) * 1e-11
    g_eng = g_ref.clone()
    g_eng[64:128] = torch.randn(64, generator=gen) * 1e-11  # its own noise
    before = torch.randn(192, generator=gen)
    ref, eng = before - LR * torch.sign(g_ref), before - LR * torch.sign(g_eng)
    eng[:real_flips] += 2 * LR * torch.sign(g_ref[:real_flips])
    case = {"b": eng.to(dtype)}, {"b": ref.to(dtype)}, {"b": before.to(dtype)}, {"b": Role.SIGN}
    return case, ({}, {"b": g_ref.to(dtype)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sign_update_may_flip_elements_whose_gradient_is_rounding_noise(dtype):
    """GPT-2's SIGN variants failed: 21/192 elements of c_attn.bias outside the tolerance, all in the key slice."""
    case, gradients = _key_bias_case(real_flips=0, dtype=dtype)
    assert int((case[0]["b"] != case[1]["b"]).sum()) > 20  # beyond the fraction rule's allowance
    compare_parameters(*case, lr=LR, what="sign", gradients=gradients)
    with pytest.raises(VerificationError, match="worst tensor b"):  # without the reference's gradient: refused
        compare_parameters(*case, lr=LR, what="sign")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sign_flip_of_an_element_with_a_real_gradient_is_still_caught(dtype):
    case, gradients = _key_bias_case(real_flips=3, dtype=dtype)
    with pytest.raises(VerificationError, match=r"worst tensor b \(role SIGN\): .* 3/192 elements"):
        compare_parameters(*case, lr=LR, what="sign", gradients=gradients)
