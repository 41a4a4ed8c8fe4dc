"""EngineDriver, the protocol any BCD library drives the engine with: its example, its errors, its lifetime."""

import copy
import gc
import warnings
import weakref

import pytest
import torch

import bread_kernels
from bread_kernels import EngineDriver, OnTheFlyUpdate, Role
from bread_kernels.patch import patched_state

from .. import model_zoo as models

LR = 1e-2


def _roles(model, active="model.layers.3.", other=Role.SGD):
    return {n: Role.ACTIVE if n.startswith(active) else other for n, _ in model.named_parameters()}


def test_the_docstring_example_matches_plain_autograd_with_hand_written_updates():
    """Layer 3 trained by the library's Adam from .grad, everything else W -= lr·s·g in the backward."""
    original = models.llama()
    reference, model = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR, scale=0.5))
    active = driver.set_roles(_roles(model))
    assert [n for n, _ in active] == [n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")]
    opt = torch.optim.SGD([p for _, p in active], lr=LR)
    ref_opt = torch.optim.SGD([p for n, p in reference.named_parameters() if n.startswith("model.layers.3.")], lr=LR)
    ids = models.batch(0)
    models.loss_of(model, ids).backward()
    opt.step()
    assert driver.end_step() == 0
    models.loss_of(reference, ids).backward()
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if not n.startswith("model.layers.3."):
                p -= LR * 0.5 * p.grad
    ref_opt.step()
    models.assert_same_parameters(reference, model, rtol=1e-5, atol=1e-6)
    driver.close()
    assert patched_state(model).cut == 0 and driver.closed


def test_string_roles_and_the_cut():
    model = bread_kernels.patch(models.llama())
    driver = EngineDriver(list(model.named_parameters()))
    driver.set_roles({n: "active" if n.startswith("model.layers.2.") else "frozen" for n, _ in model.named_parameters()})
    assert patched_state(model).cut == 2
    assert all(p.requires_grad == n.startswith("model.layers.2.") for n, p in model.named_parameters())


def test_bad_roles_are_refused_before_anything_is_written():
    model = bread_kernels.patch(models.llama())
    driver = EngineDriver(list(model.named_parameters()))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    roles = _roles(model, other=Role.FROZEN)
    with pytest.raises(KeyError, match="missing"):
        driver.set_roles({n: r for n, r in list(roles.items())[1:]})
    with pytest.raises(KeyError, match="unknown"):
        driver.set_roles({**roles, "nope": Role.FROZEN})
    with pytest.raises(ValueError, match="unknown role"):
        driver.set_roles({**roles, "lm_head.weight": "adam"})
    with pytest.raises(ValueError, match="LoRA base weight FROZEN"):
        driver.set_roles({**roles, "lm_head.weight": Role.LORA})
    with pytest.raises(ValueError, match="no update rule"):
        driver.set_roles({**roles, "lm_head.weight": Role.SGD})
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert patched_state(model).cut == 0


def test_unpatch_closes_a_driver_without_owner_and_a_dropped_driver_frees_its_hooks():
    model = bread_kernels.patch(models.llama())
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR))
    driver.set_roles(_roles(model))
    bread_kernels.unpatch(model)
    assert driver.closed
    bread_kernels.patch(model)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR))
    driver.set_roles(_roles(model))
    ref = weakref.ref(driver)
    del driver
    gc.collect()
    assert ref() is None and patched_state(model).cut == 0


def test_a_copy_of_a_driven_model_carries_none_of_its_drivers_hooks():
    """The driver's once-per-forward hooks (the loss scale's refresh, the DDP check, the stale-graph guard) sit on
    the patched model's state, which a copy of the model (``copy.deepcopy``) gets afresh: driven by no optimizer,
    it holds no reference to the original's driver or scale, and its forwards run none of them; they are all
    removed on close."""
    model = bread_kernels.patch(models.llama())
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR))
    driver.set_roles(_roles(model))
    driver.set_loss_scaler(torch.amp.GradScaler("cpu", init_scale=4.0))

    def held(m):
        state = patched_state(m)
        hooks = [*state.before_forward.values(), *state.after_forward.values()]
        return [h.__self__.driver() if hasattr(h, "__self__") else h.scale() for h in hooks]

    assert len(held(model)) == 3 and all(x is not None for x in held(model))
    duplicate = copy.deepcopy(model)
    assert held(duplicate) == []
    models.loss_of(duplicate, models.batch(0)).backward()  # the copy's own hooks run
    driver.close()
    assert held(model) == []


def test_a_new_driver_takes_the_parameters_over_and_a_disjoint_one_is_refused():
    model = bread_kernels.patch(models.llama())
    first = EngineDriver(list(model.named_parameters()))
    with pytest.warns(RuntimeWarning, match="belonged to a live"):
        second = EngineDriver(list(model.named_parameters()))
    assert first.closed and not second.closed
    second.close()
    named = list(model.named_parameters())
    keeper = EngineDriver(named[1:])
    with pytest.raises(ValueError, match="driven by a live"):
        EngineDriver(named[:1])  # other parameters of a model another driver writes the plans of
    keeper.close()


def test_a_driver_refused_for_its_parameters_or_owner_leaves_the_live_one_driving():
    """A list holding a parameter of another model, or an owner no weak reference can hold, is refused before the
    live driver over the same parameters is closed (its hooks removed, its plans cleared)."""
    model = bread_kernels.patch(models.llama())
    named = list(model.named_parameters())
    first = EngineDriver(named, update=OnTheFlyUpdate(lr=0.1))
    first.set_roles(_roles(model))
    foreign = ("lm_head.weight", models.llama(seed=1).lm_head.weight)
    with pytest.raises(ValueError, match="'lm_head.weight' is not a parameter of the LlamaForCausalLM"):
        EngineDriver(named[:-1] + [foreign])
    with pytest.raises(TypeError, match="owner must be an object held weakly"):
        EngineDriver(named, owner=3)
    assert not first.closed and patched_state(model).driver is first
    first.close()


def test_an_accelerated_model_taken_over_by_a_block_optimizer_runs_on_the_engine():
    """accelerate() patched the model; a BlockOptimizer built over the same parameters closes that acceleration
    (which unpatches) — the new optimizer then finds the model unpatched and says so, never half-driven."""
    import badam
    model = models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = badam.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                   verbose=0)
    bread_kernels.accelerate(opt, model)
    with pytest.warns(RuntimeWarning, match="belonged to a live"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not patched.*")
        mine = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR),
                                            list(model.named_parameters()), verbose=0, sgd_mode="all")
    assert patched_state(model) is None and mine.engine is None, "the new optimizer runs the hook path, whole"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    models.loss_of(model, models.batch(0)).backward()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2, "the SGD updates of the hook path ran"


def _plans(model) -> dict:
    return {name: getattr(module, "_bread_weight_plan") for name, module in patched_state(model).fused_modules}


@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN])
def test_small_block_linears_are_updated_by_the_drivers_hooks(role):
    """patch(hook_update_numel=4096): the tiny Llama's attention weights (≤ 64×64) lose their plan and take the
    driver's hook, with requires_grad on; its MLP weights (88×64), the embedding and the head keep a fused plan.
    The hooked weights move by the rule's step on autograd's dW, and hold no .grad after the backward."""
    original = models.llama()
    reference, model = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original), hook_update_numel=4096)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR, scale=0.5))
    driver.set_roles(_roles(model, other=role))
    hooked = {n for n, plan in _plans(model).items() if plan is None}
    assert hooked == {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj",
                                                                                       "o_proj")}
    params = dict(model.named_parameters())
    assert all(params[f"{n}.weight"].requires_grad and f"{n}.weight" in driver.hook_plans for n in hooked)
    assert not params["model.layers.0.mlp.gate_proj.weight"].requires_grad  # fused: autograd computes no dW
    ids = models.batch(0)
    models.loss_of(model, ids).backward()
    assert driver.end_step() == 0
    assert all(params[f"{n}.weight"].grad is None for n in hooked)
    models.loss_of(reference, ids).backward()
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if not n.startswith("model.layers.3."):
                p -= LR * 0.5 * (p.grad.sign() if role is Role.SIGN else p.grad)
    models.assert_same_parameters(reference, model, rtol=1e-5, atol=1e-6)  # layer 3 (ACTIVE): unstepped in both

    bread_kernels.patch(model, hook_update_numel=0)  # read when the plans are written next
    assert {n for n, plan in _plans(model).items() if plan is None} == hooked  # until the plans are written again
    driver.set_roles(_roles(model, other=role))
    assert not any(plan is None for plan in _plans(model).values())
    assert not params["model.layers.0.self_attn.q_proj.weight"].requires_grad
    driver.close()


def test_hook_path_stays_off_where_the_library_applies_the_hook_updates():
    """library_hooks=True (accelerate's drivers): the library's own hooks would step a hooked weight with its own
    rule, so every on-the-fly update stays fused."""
    model = bread_kernels.patch(models.llama(), hook_update_numel=1 << 20)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR), library_hooks=True)
    driver.set_roles(_roles(model))
    assert not any(plan is None for plan in _plans(model).values())
    driver.close()


def test_hook_path_stays_off_where_the_updates_write_elsewhere():
    """An update target (ZeRO-3's shards; here a local one standing in): the hook would write the whole tensor, so
    every on-the-fly update stays fused however small (ZeRO-3 keeps small weights whole, persistent)."""
    from bread_kernels.update import LocalTarget
    model = bread_kernels.patch(models.llama(), hook_update_numel=1 << 20)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR), update_target=LocalTarget())
    driver.set_roles(_roles(model))
    assert not any(plan is None for plan in _plans(model).values())
    driver.close()


def test_hooked_weights_are_read_fresh_by_the_next_forward_in_one_autocast_region():
    """Two steps and a forward inside one bf16 autocast region: autocast caches its cast of a weight that requires
    grad until the region ends, so a hooked weight (updated in the backward) must be cast by the layer itself; the
    losses are the fused path's, whose Function casts W at each use."""
    losses = {}
    for hook_update_numel in (0, 1 << 20):
        model = bread_kernels.patch(models.llama(), hook_update_numel=hook_update_numel, fused_loss=False)
        driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=0.5))
        driver.set_roles(_roles(model))
        assert any(plan is None for plan in _plans(model).values()) == bool(hook_update_numel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seen = []
            for _ in range(2):
                loss = models.loss_of(model, models.batch(0))
                seen.append(loss.item())
                loss.backward()
                driver.end_step()
                model.zero_grad(set_to_none=True)
            seen.append(models.loss_of(model, models.batch(0)).item())
        losses[hook_update_numel] = seen
        driver.close()
    assert losses[0][0] > losses[0][1] > losses[0][2]  # lr 0.5 moves the loss at every step
    torch.testing.assert_close(losses[1 << 20], losses[0], rtol=2e-2, atol=0)


def test_end_step_names_each_reason_of_the_skipped_updates():
    """One warning a step, each reason with its count and weights: a non-finite gradient is not the only one (an
    earlier forward whose uses did not all run their backward is another)."""
    model = bread_kernels.patch(models.llama(), hook_update_numel=0)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR))
    driver.set_roles(_roles(model))
    plans = _plans(model)
    plans["model.layers.0.mlp.up_proj"].report_skip("its gradient is not finite")
    plans["model.layers.1.mlp.up_proj"].report_skip("its gradient is not finite")
    plans["lm_head"].report_skip("not every use of an earlier forward ran its backward")
    with pytest.warns(RuntimeWarning, match=r"skipped 3 on-the-fly update\(s\): 2 because its gradient is not finite "
                                            r"\(.*layers.0.*layers.1.*\); 1 because not every use of an earlier "
                                            r"forward ran its backward \(.*lm_head.*\)"):
        assert driver.end_step() == 3
    driver.close()


@pytest.mark.parametrize("sgd_mode", ["partial", "all"])
def test_float64_weights_with_an_on_the_fly_role_are_refused_when_the_optimizer_is_built(sgd_mode):
    """Unpatched (patch refuses float64 and points here): before, the first backward failed inside the update op
    after the hooks of other weights may have run."""
    model = models.llama(dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-path warning
        with pytest.raises(TypeError, match=r"is torch.float64 and has an on-the-fly role.*model.float\(\)") as refused:
            bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=LR), list(model.named_parameters()),
                                         sgd_mode=sgd_mode, verbose=0)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        # the refused optimizer (kept alive by the traceback pytest holds, as a notebook's last traceback does) left
        # its hooks on every parameter and owned them: the next optimizer warned that it closed a live one
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*belonged to a live")
        warnings.filterwarnings("ignore", message=".*slow path")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=LR), list(model.named_parameters()),
                                           sgd_mode="disabled", verbose=0)
    del refused
    models.loss_of(model, models.batch(0)).backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
