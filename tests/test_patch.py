"""patch(model): discovery, the installed wrappers, plans written through PatchedModel, unpatch."""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import bread_kernels
from bread_kernels import Role, WeightPlan
from bread_kernels.patch import patched_state
from tests.model_zoo import BUILDERS, batch, loss_of


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_patch_is_idempotent_and_unpatch_restores_the_module_tree(arch):
    model = BUILDERS[arch]()
    keys = list(model.state_dict().keys())
    forwards = {n: type(m).forward for n, m in model.named_modules()}
    assert bread_kernels.patch(model) is model
    state = patched_state(model)
    assert bread_kernels.patch(model) is model and patched_state(model) is state
    assert list(model.state_dict().keys()) == keys
    bread_kernels.unpatch(model)
    assert patched_state(model) is None
    assert list(model.state_dict().keys()) == keys
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, name
        assert not hasattr(module, "_bread_weight_plan"), name
        assert type(module).forward is forwards[name]


def test_discovery_finds_each_architecture_structurally():
    expected = {"llama": ("model.layers", 4), "gpt2": ("transformer.h", 3), "bert": ("bert.encoder.layer", 3)}
    for arch, (name, n) in expected.items():
        state = patched_state(bread_kernels.patch(BUILDERS[arch]()))
        assert (state.blocks_name, len(state.blocks)) == (name, n)
        assert state.embedding is not None and state.head is not None
    gpt2 = patched_state(bread_kernels.patch(BUILDERS["gpt2"]()))
    assert any(type(m).__name__ == "Conv1D" for _, m in gpt2.fused_modules)  # GPT-2's transposed-weight layers


def test_unsupported_model_gets_a_clear_error_and_blocks_argument_works():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.second(self.first(x))

    with pytest.raises(ValueError, match=r"found no block stack.*patch\(model, blocks=model"):
        bread_kernels.patch(Odd())
    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="not a submodule"):
        bread_kernels.patch(model, blocks=nn.ModuleList([nn.Linear(4, 4)]))
    assert patched_state(bread_kernels.patch(model, blocks=model[0])).blocks is model[0]




def test_apply_plans_refuses_unknown_modules_and_non_plans():
    model = bread_kernels.patch(BUILDERS["llama"]())
    state = patched_state(model)
    name = state.fused_modules[0][0]
    with pytest.raises(KeyError, match="not fused modules"):
        state.apply_plans({"model.nowhere": WeightPlan(Role.FROZEN)})
    with pytest.raises(TypeError, match="not a WeightPlan"):
        state.apply_plans({name: "frozen"})
    with pytest.raises(ValueError, match=r"cut must be an int in \[0, 4\]"):
        state.set_cut(5)
    state.apply_plans({name: WeightPlan(Role.FROZEN, name=name)})
    assert getattr(state.fused_modules[0][1], "_bread_weight_plan").role is Role.FROZEN
    assert all(getattr(m, "_bread_weight_plan") is None for _, m in state.fused_modules[1:])


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_a_patched_model_and_its_blocks_are_collected_after_del(arch):
    """The stream's signature cache is keyed on the class's forward, not on the bound method of each block."""
    model = bread_kernels.patch(BUILDERS[arch]())
    loss_of(model, batch(0)).backward()
    state = patched_state(model)
    refs = [weakref.ref(model), weakref.ref(state)] + [weakref.ref(b) for b in state.blocks]
    del model, state
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_unpatch_closes_the_optimizer_that_drives_the_model():
    model = bread_kernels.patch(BUILDERS["llama"]())
    hooks_before = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           list(model.named_parameters()), sgd_mode="all", verbose=0)
    assert patched_state(model).driver is opt
    bread_kernels.unpatch(model)
    assert opt.closed
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()) == hooks_before
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
