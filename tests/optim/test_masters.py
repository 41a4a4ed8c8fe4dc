"""fp32 masters: made for low-precision parameters only, kept across a rebuild when asked, round-tripped."""

import warnings

import torch

import bread_kernels
from bread_kernels.optim.masters import Fp32Masters
from tests import model_zoo as models


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


# -- a model cast after the optimizer was built (model.to(torch.bfloat16)): the active block gets its masters --------
def _cast_run(cast_after_optimizer: bool, steps: int, cast_at: int = 0, resume_at_cast: bool = False):
    """A patched Llama trained with BlockOptimizer (BREAD-SGD, a switch after 3 steps), cast to bf16 before step
    ``cast_at``: after the optimizer was built, or before it (``resume_at_cast``: a new optimizer built after the cast
    that loads the first one's state_dict, saved before the cast)."""
    model = bread_kernels.patch(models.llama())

    def build():
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
                                            list(model.named_parameters()), switch_block_every=3, verbose=0,
                                            sgd_mode="all", rounding="nearest")

    if not cast_after_optimizer and cast_at == 0:
        model.to(torch.bfloat16)
    opt = build()
    for step in range(steps):
        if step == cast_at and cast_after_optimizer:
            model.to(torch.bfloat16)
        if step == cast_at and resume_at_cast:
            saved = opt.state_dict()
            opt.close()
            model.to(torch.bfloat16)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = build()
            opt.load_state_dict(saved)
        models.loss_of(model, models.batch(step)).backward()
        opt.step()
        opt.zero_grad()
        if step == cast_at:
            state = opt.base_optimizer.state
            assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
            assert len(opt.masters) == sum(len(g["params"]) for g in opt.base_optimizer.param_groups)
    opt.close()
    return bread_kernels.unpatch(model)


def test_a_model_cast_after_the_optimizer_was_built_trains_with_fp32_masters():
    """The masters were made when the block was activated, for the dtypes then: a model cast to bf16 after that
    trained its first block's bf16 weights with the base optimizer directly (bf16 Adam state, every step below half
    an ulp lost) until the next switch.  Cast before the first step: the run of the optimizer built after the
    cast."""
    models.assert_same_parameters(_cast_run(False, 4), _cast_run(True, 4), rtol=0, atol=0)


def test_a_model_cast_mid_block_keeps_its_optimizer_state_in_fp32():
    """Cast after the first step: the base optimizer's state moves to the new masters in fp32, as a resume into the
    cast model (a new optimizer loading the state saved before the cast) has it."""
    resumed = _cast_run(False, 4, cast_at=1, resume_at_cast=True)
    models.assert_same_parameters(resumed, _cast_run(True, 4, cast_at=1), rtol=0, atol=0)
