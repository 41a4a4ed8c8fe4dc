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


def test_a_parameter_written_from_outside_gives_its_master_its_values_and_its_own_rounding_keeps_the_master():
    """``model.load_state_dict`` after the optimizer was built (or an EMA copy-back) writes the bf16 parameter: the
    next step starts from it, not from the stale master, which would round back over it; a write of the master's
    own rounding (a resume loading the model after the optimizer) keeps the master's fp32 bits."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    masters = Fp32Masters()
    (master,) = masters.rebuild([("w", p, False)])
    master.data += torch.tensor([1e-3, 0.0, 0.0])  # fp32 bits the bf16 parameter cannot hold
    masters.masters_to_params()
    kept = master.detach().clone()
    with torch.no_grad():
        p.copy_(master.to(torch.bfloat16))  # its own rounding, written again: the master keeps its bits
    p.grad = torch.zeros_like(p)
    masters.grads_to_masters()
    assert torch.equal(master, kept) and not torch.equal(kept, kept.to(torch.bfloat16).float())
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0, 7.0]))  # new weights loaded
    masters.grads_to_masters()
    assert torch.equal(master, torch.tensor([5.0, 6.0, 7.0]))
    masters.masters_to_params()
    masters.grads_to_masters()  # nothing written since: the master stays
    assert torch.equal(master, torch.tensor([5.0, 6.0, 7.0]))


def test_a_parameter_whose_storage_is_replaced_gives_its_master_its_values():
    """``p.data = ...`` (torch.nn.utils.vector_to_parameters) bumps no version: the stale master rounded back over
    the write at the next step."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    masters = Fp32Masters()
    (master,) = masters.rebuild([("w", p, False)])
    masters.masters_to_params()
    torch.nn.utils.vector_to_parameters(torch.tensor([5.0, 6.0, 7.0], dtype=torch.bfloat16), [p])
    masters.grads_to_masters()
    assert torch.equal(master, torch.tensor([5.0, 6.0, 7.0]))
