"""fp32 masters: made for low-precision parameters only, kept across a rebuild when asked, round-tripped."""

import torch

from bread_kernels.optim.masters import Fp32Masters


def test_masters_for_low_precision_only_kept_when_asked_and_rounded_back():
    low = torch.nn.Parameter(torch.randn(3, 5).bfloat16())
    full = torch.nn.Parameter(torch.randn(4))
    masters = Fp32Masters()
    target_low, target_full = masters.rebuild([("low", low, False), ("full", full, False)])
    assert target_full is full and target_low.dtype == torch.float32 and len(masters) == 1
    assert torch.equal(target_low, low.float())
    assert masters.rebuild([("low", low, True)])[0] is target_low  # kept across the switch
    assert masters.rebuild([("low", low, False)])[0] is not target_low  # afresh

    master = masters.entries[0][1]
    low.grad = torch.ones_like(low)
    masters.grads_to_masters()
    assert low.grad is None and master.grad.dtype == torch.float32
    with torch.no_grad():
        master.add_(1e-3)  # smaller than a bf16 ulp for most entries: only the master keeps it
    saved = masters.state_dict()
    masters.masters_to_params()
    assert master.grad is None and torch.equal(low, master.bfloat16())
    with torch.no_grad():
        master.zero_()
    masters.load_state_dict(saved)
    assert torch.equal(master, saved["low"])
