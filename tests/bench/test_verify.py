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
