"""patch(model): discovery, the installed wrappers, plans written through PatchedModel, unpatch."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import bread_kernels
from bread_kernels import Role, WeightPlan
from bread_kernels.plan import PLAN_ATTR
from bread_kernels.patch import DEFAULT_HOOK_UPDATE_NUMEL, fused_fraction, patched_models, patched_state
from tests import model_zoo as models
from tests.model_zoo import BUILDERS, MOE_BUILDERS, batch, loss_of


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


class _VisionAndText(nn.Module):
    """A vision tower of many small layers beside a language model's stack of few large ones (Llava's shape)."""

    def __init__(self):
        super().__init__()
        self.vision = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(6))
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))


def test_discovery_weighs_the_stacks_of_a_model_built_partitioned_by_their_whole_size(monkeypatch):
    """A model built partitioned (DeepSpeed's zero.Init, which from_pretrained uses under a ZeRO-3 config) holds empty
    tensors: discovery weighed stacks by elements and found none (counting tensors instead would take the vision
    tower).  The sizes come from the functions integrations register; without one, a clear error."""
    import sys

    from bread_kernels.patch import _find_block_stack, register_whole_shape

    model = _VisionAndText()
    assert _find_block_stack(model)[0] == "layers"
    shapes = {id(p): tuple(p.shape) for p in model.parameters()}
    for p in model.parameters():
        p.data = torch.empty(0)
    monkeypatch.setattr(sys.modules["bread_kernels.patch"], "_WHOLE_SHAPE", [])
    with pytest.raises(ValueError, match="empty tensors .* import bread_kernels.integrations.deepspeed before patch"):
        _find_block_stack(model)
    register_whole_shape(lambda p: shapes.get(id(p)))
    assert _find_block_stack(model)[0] == "layers"


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




@pytest.mark.parametrize("recompute", ["yes", 1, None])
def test_a_recompute_that_is_not_a_bool_is_refused_before_anything_is_installed(recompute):
    model = BUILDERS["llama"]()
    with pytest.raises(TypeError, match="recompute must be True or False"):
        bread_kernels.patch(model, recompute=recompute)
    assert patched_state(model) is None and not any("forward" in m.__dict__ for m in model.modules())


def test_a_float64_model_is_refused_before_anything_is_installed_naming_the_cast():
    """Every training forward of a patched float64 model would fail at its first fused module."""
    model = BUILDERS["llama"]().double()
    with pytest.raises(TypeError, match=r"float64; .*model\.float\(\)"):
        bread_kernels.patch(model)
    assert patched_state(model) is None and not any("forward" in m.__dict__ for m in model.modules())
    patched = bread_kernels.patch(model.float())
    assert patched_state(patched) is not None


@pytest.mark.parametrize("change", ["resize", "tie"])
def test_plans_for_a_model_changed_after_patch_are_refused_until_it_is_patched_again(change):
    """A head replaced (``resize_token_embeddings``) or weights tied after ``patch``: what patch found no longer
    holds (the old head stayed fused and alive, the new one went untrained by a driver built before; a tied weight
    took one sign step per owner), so an optimizer's plans are refused, naming the remedy; patched again, a sign
    step moves the tied head by one step."""
    model = bread_kernels.patch(BUILDERS["llama"](), hook_update_numel=0)
    if change == "resize":
        model.resize_token_embeddings(models.VOCAB + 7, mean_resizing=False)
    else:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with pytest.raises(ValueError, match="after patch\\(\\).*unpatch\\(model\\) and patch\\(model\\) again"):
        _block_optimizer(model, sgd_mode="all", sgd_use_sign=True)
    bread_kernels.unpatch(model)
    bread_kernels.patch(model, hook_update_numel=0)
    optimizer = _block_optimizer(model, sgd_mode="all", sgd_use_sign=True)
    before = model.lm_head.weight.detach().clone()
    ids = batch(0) % model.config.vocab_size
    loss_of(model, ids).backward()
    optimizer.step()
    moved = (model.lm_head.weight - before).abs().max().item()
    assert 0 < moved <= 1e-2 * (1 + 1e-5)  # one sign step of lr 1e-2 (scaling 1)
    optimizer.close()


def test_patch_of_blocks_another_live_patched_model_streams_is_refused_naming_the_remedy():
    """A part of a patched model patched on its own (``patch(model.model)``), or a model given a block of another
    patched model: patch installed a second stream over the first one's, which the next forward failed in ("block
    0's first argument is tuple") or, for the part, patched silently.  Refused before anything is installed, naming
    the remedy; once the other model is unpatched, the model patches."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    with pytest.raises(ValueError, match=r"layers\.0 is a block of the patched LlamaForCausalLM, which this LlamaModel "
                                         r"is part of.*bread_kernels\.unpatch\(model\)"):
        bread_kernels.patch(model.model)
    assert patched_state(model.model) is None and patched_state(model).stack_change() is None
    other = BUILDERS["llama"]()
    other.model.layers[1] = model.model.layers[1]
    with pytest.raises(ValueError, match=r"model\.layers\.1 is a block of the patched LlamaForCausalLM.*"
                                         r"another model.*copy\.deepcopy"):
        bread_kernels.patch(other)
    assert patched_state(other) is None and not any("forward" in m.__dict__ for m in other.model.layers[0].modules())
    bread_kernels.unpatch(model)
    bread_kernels.patch(other)
    loss_of(other, batch(0)).backward()


def test_a_model_built_from_copies_of_a_patched_models_parts_patches_and_trains_as_the_reference():
    """A deep copy of a part of a patched model (a block, the base model) carries patch's forwards, which run plain
    autograd; a model built from such copies failed in its first forward once patched ("block 0's first argument is
    tuple, not hidden states": the new stream wrapped the copied one).  It patches, trains under BREAD-SGD as the
    unpatched model does under the plain-autograd reference, and unpatches to the original module tree."""

    source = bread_kernels.patch(models.llama(seed=1, layers=2))
    reference, model = models.llama(layers=2), models.llama(layers=2)
    model.model = copy.deepcopy(source.model)
    model.model.layers[1] = copy.deepcopy(source.model.layers[0])
    reference.load_state_dict(model.state_dict())
    bread_kernels.patch(model, fused_loss=False)
    models.assert_sgd_all_trains_as_the_reference(reference, model)
    bread_kernels.unpatch(model)
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__ and not any(a.startswith("_bread_") for a in module.__dict__), name


@pytest.mark.parametrize("how", ["prune", "parametrize"])
def test_a_weight_pruned_or_parametrized_after_the_plans_were_written_is_refused_until_they_are_written_again(how):
    """``torch.nn.utils.prune`` or a parametrization applied to a fused layer after the optimizer wrote its plans
    makes ``module.weight`` a tensor computed from the parameter: BREAD-SGD's fused update was written into that
    temporary and lost, silently, until the next block switch (up_proj 7e-4 off the reference after 4 steps).  A
    forward with grad is refused, naming the remedy; applied before the optimizer, the layer trains as the
    plain-autograd reference trains the unpatched model given the same change."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune


    class Scaled(nn.Module):
        def forward(self, weight):
            return weight * 1.5

    def change(model):
        for layer in model.model.layers:
            if how == "prune":
                prune.l1_unstructured(layer.mlp.up_proj, "weight", amount=0.3)
            else:
                parametrize.register_parametrization(layer.mlp.up_proj, "weight", Scaled(), unsafe=True)

    def sgd_all(model):
        return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            list(model.named_parameters()), sgd_mode="all", switch_block_every=2,
                                            verbose=0)

    model = bread_kernels.patch(models.llama(layers=2), hook_update_numel=0)
    optimizer = sgd_all(model)
    change(model)
    with torch.no_grad():
        loss_of(model, batch(0))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.up_proj's weight is no longer a parameter.*"
                                           r"before building the optimizer"):
        loss_of(model, batch(0))
    optimizer.close()

    reference, model = models.llama(layers=2), bread_kernels.patch(models.llama(layers=2), hook_update_numel=0)
    change(reference)
    change(model)
    models.assert_sgd_all_trains_as_the_reference(reference, model, sgd_all(model))


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("sgd_mode", ["all", "disabled"])
def test_a_head_pruned_or_parametrized_before_patch_trains_as_the_reference_under_the_default_fused_loss(how,
                                                                                                          sgd_mode):
    """``lm_head`` pruned (``torch.nn.utils.prune``: still an ``nn.Linear``, its ``weight`` a tensor that the
    module's forward pre-hook computes from ``weight_orig``) before ``patch``: the fused loss read that tensor, made
    once by ``prune`` and never again (the head's own forward does not run there), so the second backward failed
    ("Trying to backward through the graph a second time"), and the loss was of the stale weight.  The default
    patch runs the model's own forward for such a head, which trains as the plain-autograd reference trains the
    unpatched model; ``fused_loss=True`` refuses it, naming the remedy."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    from tests.optim.reference_bcd import ReferenceBCD, block_prefixes

    class Scaled(nn.Module):
        def forward(self, weight):
            return weight * 1.5

    def change(model):
        if how == "prune":
            prune.l1_unstructured(model.lm_head, "weight", amount=0.3)
        else:
            parametrize.register_parametrization(model.lm_head, "weight", Scaled(), unsafe=True)
        return model

    refusal = r"tensor computed from one by a forward pre-hook" if how == "prune" else r"ParametrizedLinear, not a"
    with pytest.raises(ValueError, match=rf"the head of LlamaForCausalLM.*{refusal}.*fused_loss=False"):
        bread_kernels.patch(change(models.llama(layers=2)), fused_loss=True)
    reference, model = change(models.llama(layers=2)), change(models.llama(layers=2))
    bread_kernels.patch(model, hook_update_numel=0)
    layers, embedding = models.layout(reference)
    expected = ReferenceBCD(reference, block_prefixes([n for n, _ in reference.named_parameters()], layers, embedding),
                            loss_fn=loss_of, optimizer_cls=torch.optim.SGD, optimizer_kwargs=dict(lr=0.1),
                            sgd_mode=sgd_mode, switch_block_every=2)
    optimizer = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             list(model.named_parameters()), sgd_mode=sgd_mode, switch_block_every=2,
                                             verbose=0)
    for ids in models.batches(3):
        expected.step(ids)
        loss_of(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    models.assert_same_parameters(reference, model)
    optimizer.close()


def test_a_block_swapped_while_an_optimizer_drives_refuses_training_until_it_lets_go():
    """A block assigned in place of a streamed one runs without the stream, its linears without plans: their
    on-the-fly updates would stop silently.  Inference runs; a forward with grad is refused while the optimizer
    drives, and after it is closed the model trains with plain autograd, a new optimizer's plans refused."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    optimizer = _block_optimizer(model, sgd_mode="all")
    model.model.layers[1] = copy.deepcopy(model.model.layers[1])
    assert patched_state(model).find_lost().startswith("model.layers.1.")  # the old block's layers are gone
    with torch.no_grad():
        model(input_ids=batch(0))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.\S+ was replaced after patch\(\).*while an optimizer"):
        loss_of(model, batch(0))
    optimizer.close()
    loss_of(model, batch(0)).backward()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.\S+ was replaced after patch\(\)"):
        _block_optimizer(model, sgd_mode="all")


def test_a_fused_module_removed_or_replaced_then_its_optimizer_dropped_trains_on_with_plain_autograd():
    """Setting a fused module to None (torch calls the registration hook with None) is noticed, not a crash; an
    optimizer dropped without close() (freed by reference counting: the cycle collector off) lets go of the model,
    and the refusal ends with it; a new optimizer is refused, naming the module."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    optimizer = _block_optimizer(model, sgd_mode="all")
    model.model.layers[0].mlp.add_module("down_proj", None)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(model.config.intermediate_size, model.config.hidden_size,
                                                          bias=False)
    with pytest.raises(ValueError, match="down_proj was replaced .*while an optimizer drives.*the LlamaForCausalLM: "
                                         "bread_kernels.unpatch"):
        loss_of(model, batch(0))
    gc.disable()
    try:
        del optimizer
        loss_of(model, batch(0)).backward()
    finally:
        gc.enable()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj was replaced after patch\(\)"):
        _block_optimizer(model, sgd_mode="all")


def test_a_stack_swapped_whole_or_sliced_is_refused_and_a_stack_put_back_or_a_model_moved_is_not():
    """A temporary subset of the stack put back (LayerDrop), or the patched model taken out of a holder, loses
    nothing: each forward looks at the model itself.  A stack swapped whole runs no streamed block, so the model's
    own pre-hook refuses it while an optimizer drives; a stack sliced after patch is refused at the next optimizer,
    before it infers blocks from the stack patch found."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    optimizer = _block_optimizer(model, sgd_mode="all")
    full = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(full)[:2])
    model.model.layers = full
    holder = torch.nn.Module()
    holder.lm = model
    holder.lm = torch.nn.Linear(2, 2)
    loss_of(model, batch(0)).backward()
    optimizer.step()
    assert patched_state(model).find_lost() is None
    model.model.layers = copy.deepcopy(full)
    with pytest.raises(ValueError, match=r"model\.layers\.0 was replaced .*while an optimizer drives"):
        loss_of(model, batch(0))
    optimizer.close()
    sliced = bread_kernels.patch(BUILDERS["llama"]())
    sliced.model.layers = sliced.model.layers[:3]
    with pytest.raises(ValueError, match=r"model\.layers\.3 was replaced after patch\(\)"):
        _block_optimizer(sliced, sgd_mode="all")


def _grow_stack(model, change):
    """Depth up-scaling (LLaMA-Pro's block expansion; into a new ``ModuleList`` for ``"assign"``) or a reordering of
    a Llama's stack, its layers renumbered for the KV cache as a fresh stack of that depth numbers them."""
    layers = model.model.layers
    if change == "insert":
        layers.insert(1, copy.deepcopy(layers[0]))
    elif change == "append":
        layers.append(copy.deepcopy(layers[0]))
    elif change == "assign":
        layers = model.model.layers = nn.ModuleList([*layers, copy.deepcopy(layers[0])])
    else:
        layers[1], layers[2] = layers[2], layers[1]
    for index, layer in enumerate(layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(layers)


def _train(model, steps=3, **modes):
    optimizer = _block_optimizer(model, **modes)
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.close()


@pytest.mark.parametrize("change", ["insert", "append", "assign", "swap"])
def test_a_stack_grown_or_reordered_after_patch_is_refused_and_trains_as_the_slow_path_patched_again(change):
    """A layer inserted, appended or moved after ``patch`` (``insert`` and ``del`` reach no hook), or the stack
    assigned anew with a layer more: each streamed block kept its index, which the stream compares with the cut the
    optimizer counts by place, so a block inserted below the active one put that one below the cut, where it ran
    without autograd and never trained, and an appended copy of a patched block read the KV cache as another
    forward's.  The optimizer is refused, naming the remedy; unpatched, no forward of patch's is left on the copied
    layer (in a stack assigned anew, it was); patched again, it trains as the same surgery unpatched (the slow path)
    does."""
    reference, model = models.llama(layers=3), bread_kernels.patch(models.llama(layers=3), hook_update_numel=0)
    _grow_stack(reference, change)
    _grow_stack(model, change)
    with pytest.raises(ValueError, match=r"block stack changed after patch\(\): model\.layers.*Prune, grow or reorder "
                                         r"the layers before patch\(\)"):
        _block_optimizer(model, sgd_mode="partial")
    bread_kernels.unpatch(model)
    assert not [name for name, module in model.named_modules()
                if "forward" in module.__dict__ or any(key.startswith("_bread") for key in module.__dict__)]
    bread_kernels.patch(model, hook_update_numel=0)
    _train(reference, sgd_mode="partial")
    _train(model, sgd_mode="partial")
    models.assert_same_parameters(reference, model)


def test_a_layer_inserted_while_an_optimizer_drives_refuses_training_until_it_lets_go():
    """BAdam with the top block active: a layer inserted at the bottom shifted the blocks' places past their indices,
    and the active block ran below the cut (the loss had no gradient for it).  Refused while the optimizer drives;
    closed, the model trains with plain autograd, the inserted copy of a patched block too, as unpatched."""
    reference, model = models.llama(layers=3), bread_kernels.patch(models.llama(layers=3))
    optimizer = _block_optimizer(model, sgd_mode="disabled")
    _grow_stack(reference, "insert")
    _grow_stack(model, "insert")
    with pytest.raises(ValueError, match=r"model\.layers holds 4 blocks where patch\(\) streamed 3 .*while an "
                                         r"optimizer drives"):
        loss_of(model, batch(0))
    optimizer.close()
    model.requires_grad_(True)
    loss_of(model, batch(0)).backward()
    loss_of(reference, batch(0)).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


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


def test_set_cut_by_hand_is_refused_while_an_optimizer_drives_the_model():
    """A cut above the active block stopped the backward before it: the block took no gradient (the step warned that
    the batch had not reached it) and the on-the-fly updates below the cut never ran, silently."""
    from bread_kernels.patch import set_cut

    model = bread_kernels.patch(BUILDERS["llama"]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                           list(model.named_parameters()), start_block=0, sgd_mode="all", verbose=0)
    state = patched_state(model)
    cut = state.stream.cut
    with pytest.raises(RuntimeError, match="a live BlockOptimizer drives this model and sets the cut itself"):
        set_cut(model, 3)
    assert state.stream.cut == cut
    with pytest.raises(ValueError, match=r"cut must be an int in \[0, 4\], got True"):
        state.set_cut(True)
    opt.close()
    set_cut(model, 3)
    assert state.stream.cut == 3


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


def _block_optimizer(model, **modes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2),
                                            list(model.named_parameters()), switch_block_every=1, verbose=0, **modes)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_deep_copy_of_a_patched_model_is_a_patched_model_of_its_own(arch):
    """``copy.deepcopy`` (an EMA or reference model, TRL's ``create_reference_model``, a snapshot) gives a model whose
    blocks run its own weights: its output does not follow the original's, its backward writes its own ``.grad``
    and no on-the-fly update (the original's plans belong to the original's optimizer); it is patched and undriven,
    trains with an optimizer of its own exactly as the original trains with its own, never touches the original,
    and is freed when dropped (with the rotary dispatcher once both are gone)."""
    from transformers.models.llama import modeling_llama

    gc.collect()  # models of the tests before, dropped in reference cycles, hold the rotary dispatcher until then
    before = modeling_llama.apply_rotary_pos_emb
    original = bread_kernels.patch(BUILDERS[arch]())
    optimizer = _block_optimizer(original, sgd_mode="all")
    loss_of(original, batch(0)).backward()
    optimizer.step()
    optimizer.zero_grad()
    duplicate = copy.deepcopy(original)
    state = patched_state(duplicate)
    assert state is not patched_state(original) and state.driver is None and state.cut == 0
    assert duplicate in patched_models()
    assert all(getattr(m, PLAN_ATTR) is None for _, m in state.fused_modules)
    assert any(getattr(m, PLAN_ATTR) is not None for _, m in patched_state(original).fused_modules)
    assert {id(m) for _, m in state.fused_modules} == {id(m) for m in duplicate.modules()} & \
        {id(m) for _, m in state.fused_modules}  # the copy's own modules
    assert sorted(state.block_of_linear.values()) == sorted(patched_state(original).block_of_linear.values())
    assert set(state.block_of_linear) <= {id(m) for m in duplicate.modules()}

    saved = {n: p.detach().clone() for n, p in duplicate.named_parameters()}
    with torch.no_grad():
        expected = loss_of(duplicate, batch(1))
        for p in original.parameters():
            p.mul_(0.5)  # the original alone changes
        assert torch.equal(loss_of(duplicate, batch(1)), expected)
    for p in duplicate.parameters():
        p.requires_grad_(True)
    loss_of(duplicate, batch(1)).backward()
    assert all(p.grad is None for p in original.parameters())
    assert all(p.grad is not None for p in duplicate.parameters() if p.requires_grad)
    assert all(torch.equal(p, saved[n]) for n, p in duplicate.named_parameters())  # no update of the original's plans
    duplicate.zero_grad()

    # trained by an optimizer of its own as a fresh copy is, without touching the original
    untouched = {n: p.detach().clone() for n, p in original.named_parameters()}
    twin = copy.deepcopy(duplicate)
    for model in (duplicate, twin):
        opt = _block_optimizer(model, sgd_mode="partial")
        for step in range(3):
            loss_of(model, batch(step)).backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    models.assert_same_parameters(duplicate, twin, rtol=0, atol=0)
    assert not [n for n, p in original.named_parameters() if not torch.equal(p, untouched[n])]
    assert [n for n, p in duplicate.named_parameters() if not torch.equal(p, saved[n])]

    import pickle

    with pytest.raises(TypeError, match="does not pickle whole"):
        pickle.dumps(duplicate)
    with pytest.raises(TypeError, match="does not pickle"):  # a driven model: its plans say it first
        pickle.dumps(original)

    # a copy of a part (the base model under the head): no plan of the optimizer's, the backward reaching every block
    base = original.model if arch == "llama" else original.transformer
    part = copy.deepcopy(base)
    assert not [m for m in part.modules() if getattr(m, PLAN_ATTR, None) is not None]
    assert all(m._bread_block[1].cut == 0 for m in part.modules() if "_bread_block" in m.__dict__)
    kept = {n: p.detach().clone() for n, p in part.named_parameters()}
    for p in part.parameters():
        p.requires_grad_(True)
    part(input_ids=batch(2)).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for p in part.parameters())
    assert all(torch.equal(p, kept[n]) for n, p in part.named_parameters())
    del part, base
    refs = [weakref.ref(m) for m in duplicate.modules()]
    optimizer.close()
    del duplicate, twin, state, original, optimizer, opt, model
    gc.collect()
    assert [r() for r in refs if r() is not None] == []
    assert modeling_llama.apply_rotary_pos_emb is before


# ----------------------------------------------------------------------------------------------------------------
# mixture of experts


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", sorted(MOE_BUILDERS))
def test_experts_modules_are_found_and_compute_transformers_maths(family, implementation):
    """Every experts module gets the fused forward whatever implementation the config selects; unplanned it is
    transformers' own forward (bit for bit), planned it is the eager maths (bit for bit against eager in fp32, to
    rounding against the grouped/batched GEMMs); unpatch restores the module tree."""
    model = MOE_BUILDERS[family](layers=2, experts_implementation=implementation)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids = batch(0)
    state = patched_state(bread_kernels.patch(model))
    assert [name for name, _ in state.fused_experts] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert [name for name, _ in state.expert_weights()] == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2)
                                                              for w in ("gate_up_proj", "down_proj")]
    with torch.no_grad():
        expected = loss_of(reference, ids)
    assert torch.equal(loss_of(model, ids).detach(), expected)  # no plans: transformers' forward
    state.apply_plans({name: WeightPlan(Role.FROZEN, name=name) for name, _ in state.expert_weights()})
    planned = loss_of(model, ids).detach()
    if implementation == "eager":
        assert torch.equal(planned, expected)
    else:
        torch.testing.assert_close(planned, expected, rtol=1e-6, atol=1e-6)
    bread_kernels.unpatch(model)
    assert list(model.state_dict()) == keys
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__ and not hasattr(module, "_bread_expert_plans"), name


@pytest.mark.parametrize("family", sorted(MOE_BUILDERS))
def test_every_linear_and_expert_weight_of_the_moe_families_is_fused(family):
    """fused_fraction: 100% of the linear and expert weights of the blocks are under a fused function, and the
    optimizer plans every expert weight (none takes the hook path); what is left is the norms and the routers'
    [E, H] weights (not nn.Linears: they take the hook path, a gradient of E·H elements)."""
    model = bread_kernels.patch(MOE_BUILDERS[family]())
    report = fused_fraction(model)
    assert report["fraction_of_linear_and_expert"] == 1.0
    assert all(name.endswith(("norm.weight", "mlp.gate.weight")) for name, _ in report["unfused"]), report["unfused"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           list(model.named_parameters()), sgd_mode="all", verbose=0)
    state = patched_state(model)
    for _, module in state.fused_experts:
        plans = module._bread_expert_plans
        assert all(isinstance(plans[w], WeightPlan) for w in ("gate_up_proj", "down_proj"))
    assert not any("experts" in name for name in opt.driver.hook_plans)
    opt.close()


def test_peft_lora_on_expert_parameters_is_refused_before_anything_is_installed():
    import peft

    model = peft.get_peft_model(MOE_BUILDERS["qwen3_moe"](layers=2), peft.LoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]))
    with pytest.raises(NotImplementedError, match=r"peft LoRA on parameters .*target_parameters"):
        bread_kernels.patch(model)
    assert patched_state(model) is None
    assert not any("forward" in module.__dict__ for _, module in model.named_modules())


def test_peft_all_linear_on_an_moe_model_is_refused_naming_the_linears_to_target():
    """peft's target_modules='all-linear' also wraps an MoE model's expert and router parameters (target_parameters
    filled in by peft): the refusal says so and names the linear layers a target_modules list should hold."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own about its rank and alpha patterns
        model = peft.get_peft_model(MOE_BUILDERS["qwen3_moe"](layers=2), peft.LoraConfig(
            r=4, target_modules="all-linear"))
    with pytest.raises(NotImplementedError, match=r"all-linear.*\['k_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        bread_kernels.patch(model)
    assert patched_state(model) is None


def test_a_lora_target_named_like_an_expert_weight_is_refused_naming_the_linears_peft_keeps_linear():
    """DeepSeek-V3: a target_modules entry down_proj (its dense and shared-expert MLPs' linear) makes peft wrap the
    experts' down_proj parameter instead (as gate_proj and up_proj their gate_up_proj); the refusal says so, and the
    names it suggests leave them out."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(models.deepseek_v3(), peft.LoraConfig(r=4, target_modules=["q_a_proj",
                                                                                             "down_proj"]))
    with pytest.raises(NotImplementedError, match=r"renames to an expert weight \(down_proj, gate, gate_proj, "
                                                  r"up_proj\).*\['kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj', "
                                                  r"'q_a_proj', 'q_b_proj'\]"):
        bread_kernels.patch(model)


def test_an_experts_module_of_another_layout_keeps_plain_autograd_and_is_named():
    model = MOE_BUILDERS["mixtral"](layers=2)
    model.model.layers[1].mlp.experts.is_transposed = True  # as a gpt-oss-style layout would say
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.1\.mlp\.experts .*is_transposed=True.*plain autograd"):
        state = patched_state(bread_kernels.patch(model))
    assert [name for name, _ in state.fused_experts] == ["model.layers.0.mlp.experts"]


def test_an_nn_linear_subclass_computing_a_linear_is_fused():
    """Falcon's FalconLinear (forward ``x @ Wᵀ + b``) is fused like nn.Linear: every linear weight of its blocks is
    under the fused function and takes the optimizer's plan (none the hook path, which materialises its dW)."""
    model = models.falcon()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        bread_kernels.patch(model, hook_update_numel=0)
    report = fused_fraction(model)
    linears = [m for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * len(model.transformer.h) and report["linear_and_expert"] == sum(
        p.numel() for m in linears for p in m.parameters())
    assert report["fraction_of_linear_and_expert"] == 1.0, report["unfused"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           list(model.named_parameters()), sgd_mode="all", verbose=0)
    assert all(isinstance(getattr(m, PLAN_ATTR), WeightPlan) for m in linears)
    assert not any("transformer.h." in name and "ln" not in name for name in opt.driver.hook_plans)
    opt.close()


def test_a_bf16_falcon_linear_with_a_bias_keeps_its_own_forward_and_is_named():
    """In bf16 FalconLinear's ``x @ Wᵀ + b`` rounds the product before adding the bias (F.linear rounds once): it
    keeps its own forward, so the patched model computes as the unpatched one, and patch says so."""
    model = models.falcon(dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    ids = batch(0)
    with pytest.warns(RuntimeWarning, match=r"nn\.Linear subclass .*FalconLinear; transformer\.h\.0\."):
        bread_kernels.patch(model)
    assert fused_fraction(model)["fused_linear_and_expert"] == 0
    assert torch.equal(loss_of(model, ids), loss_of(reference, ids))


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass that computes something else than ``x Wᵀ + b``."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_an_nn_linear_subclass_computing_something_else_keeps_plain_autograd_and_is_named():
    model = models.llama(layers=2)
    mlp = model.model.layers[1].mlp
    scaled = _ScaledLinear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    scaled.weight = mlp.up_proj.weight
    mlp.up_proj = scaled
    ids = batch(0)
    expected = loss_of(model, ids).item()
    with pytest.warns(RuntimeWarning, match=r"nn\.Linear subclass .*_ScaledLinear; model\.layers\.1\.mlp\.up_proj.*"
                                            r"plain autograd"):
        bread_kernels.patch(model)
    state = patched_state(model)
    assert "model.layers.1.mlp.up_proj" not in dict(state.fused_modules)
    assert "model.layers.0.mlp.up_proj" in dict(state.fused_modules)
    assert ("model.layers.1.mlp.up_proj.weight", scaled.weight.numel()) in fused_fraction(model)["unfused"]
    assert fused_fraction(model)["fraction_of_linear_and_expert"] < 1.0
    assert loss_of(model, ids).item() == pytest.approx(expected, rel=1e-6)



class _SetScaleLinear(nn.Linear):
    """An nn.Linear subclass whose forward reads a plain setting of the instance."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x):
        out = super().forward(x)
        return out if self.scale == 1.0 else out * self.scale


def test_the_subclass_probe_answers_per_setting_not_per_class():
    """The probe's answer is kept by class and the instance's plain settings: an instance of one class whose
    setting makes it compute something else is not fused because another instance of the class was."""
    model = models.llama(layers=2)
    for index, scale in ((0, 1.0), (1, 3.0)):
        mlp = model.model.layers[index].mlp
        layer = _SetScaleLinear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False, scale=scale)
        layer.weight = mlp.up_proj.weight
        mlp.up_proj = layer
    ids = batch(0)
    expected = loss_of(model, ids).item()
    with pytest.warns(RuntimeWarning, match=r"_SetScaleLinear; model\.layers\.1\.mlp\.up_proj"):
        bread_kernels.patch(model)
    fused = dict(patched_state(model).fused_modules)
    assert "model.layers.0.mlp.up_proj" in fused and "model.layers.1.mlp.up_proj" not in fused
    assert loss_of(model, ids).item() == pytest.approx(expected, rel=1e-6)


def _patch_recording_warnings(model: torch.nn.Module, naming: str) -> list[str]:
    """``bread_kernels.patch(model)``; the messages of the warnings it gave that contain ``naming``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bread_kernels.patch(model)
    return [str(w.message) for w in caught if naming in str(w.message)]


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_input_embedding_that_keeps_plain_autograd_is_named(tied):
    """Gemma3's scaled word embedding (a subclass whose forward multiplies the rows by embed_scale) is not fused:
    untied, its on-the-fly update materialised the whole [vocab, hidden] gradient, and nothing said so."""
    import transformers

    config = transformers.Gemma3TextConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=40,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    ids = batch(0)
    expected = loss_of(model, ids).item()
    named = _patch_recording_warnings(model, "input embedding model.embed_tokens")
    assert len(named) == (0 if tied else 1), named
    if not tied:
        assert "Gemma3TextScaledWordEmbedding" in named[0] and "keeps plain autograd" in named[0]
    assert "model.embed_tokens" not in dict(patched_state(model).fused_modules)
    assert loss_of(model, ids).item() == pytest.approx(expected, rel=1e-6)

def _embedding_llama(kind: str) -> torch.nn.Module:
    """A tiny Llama whose input embedding patch cannot fuse, for the reason ``kind``."""
    import peft

    model = models.llama(layers=2)
    if kind in ("max_norm", "scale_grad_by_freq"):
        option = {kind: 1.0 if kind == "max_norm" else True}
        model.set_input_embeddings(torch.nn.Embedding(models.VOCAB, model.config.hidden_size, **option))
    elif kind == "subclass":
        class Scaled(torch.nn.Embedding):
            def forward(self, ids):
                return super().forward(ids) * 2.0

        model.set_input_embeddings(Scaled(models.VOCAB, model.config.hidden_size))
    elif kind == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    elif kind == "modules_to_save":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                           modules_to_save=["embed_tokens"]))
    return model


UNFUSED_EMBEDDING_REASONS = {  # kind: what the warning must say
    "lora": "peft wraps it in a tuner layer", "modules_to_save": "peft wraps it in copies (modules_to_save)",
    "max_norm": "built with max_norm,", "scale_grad_by_freq": "built with scale_grad_by_freq,",
    "subclass": "a subclass of nn.Embedding with its own forward"}


@pytest.mark.parametrize("kind", list(UNFUSED_EMBEDDING_REASONS))
def test_an_unfused_input_embedding_is_named_with_its_reason(kind):
    """The warning for an input embedding that keeps plain autograd gave one reason for all ("its own forward,
    max_norm, scale_grad_by_freq or sparse"), which misled where peft wraps it (LoRA on embed_tokens,
    modules_to_save): it says the actual one, and none of the others."""
    model = _embedding_llama(kind)
    named = _patch_recording_warnings(model, "patch: the input embedding")
    assert len(named) == 1, named
    assert UNFUSED_EMBEDDING_REASONS[kind] in named[0] and "keeps plain autograd" in named[0]
    for other, reason in UNFUSED_EMBEDDING_REASONS.items():
        if other != kind:
            assert reason not in named[0], (other, named[0])
    assert "sparse" not in named[0]


@pytest.mark.parametrize("head", ["modules_to_save", "lora", "plain"])
def test_a_head_that_keeps_plain_autograd_is_named(head):
    """peft's modules_to_save=["lm_head"] (what peft recommends with added tokens) wraps the head in copies, which
    patch does not fuse: its on-the-fly update materialised the whole [vocab, hidden] gradient and the loss ran
    unfused, and nothing said so.  A LoRA head and a plain one are fused and named by nothing."""
    import peft

    targets = ["q_proj", "v_proj"] + (["lm_head"] if head == "lora" else [])
    config = peft.LoraConfig(r=4, target_modules=targets,
                             modules_to_save=["lm_head"] if head == "modules_to_save" else None)
    model = peft.get_peft_model(models.llama(layers=2), config)
    ids = batch(0)
    expected = loss_of(model, ids).item()
    named = _patch_recording_warnings(model, "output head base_model.model.lm_head")
    assert len(named) == (1 if head == "modules_to_save" else 0), named
    fused = dict(patched_state(model).fused_modules)
    if named:
        assert "ModulesToSaveWrapper" in named[0] and "keeps plain autograd" in named[0]
        assert not any("lm_head" in name for name in fused)
    else:
        assert "base_model.model.lm_head" in fused
    assert loss_of(model, ids).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("value", [-1, 2.5, "4096", True])
def test_a_bad_hook_update_numel_is_refused_before_anything_is_installed(value):
    model = models.llama()
    with pytest.raises(ValueError, match=r"hook_update_numel must be None \(the default\) or a number of weight "
                                         r"elements >= 0 \(0 fuses every on-the-fly update\), got"):
        bread_kernels.patch(model, hook_update_numel=value)
    assert patched_state(model) is None


def test_hook_update_numel_default_comes_from_the_environment_or_the_measured_constant(monkeypatch):
    monkeypatch.delenv("BREAD_HOOK_UPDATE_NUMEL", raising=False)
    model = bread_kernels.patch(models.llama())
    assert patched_state(model).hook_update_numel == DEFAULT_HOOK_UPDATE_NUMEL == 1 << 17
    monkeypatch.setenv("BREAD_HOOK_UPDATE_NUMEL", "300")
    assert patched_state(bread_kernels.patch(model)).hook_update_numel == 300  # patch() again: the values given
    assert patched_state(bread_kernels.patch(model, hook_update_numel=7)).hook_update_numel == 7
    monkeypatch.setenv("BREAD_HOOK_UPDATE_NUMEL", "lots")
    with pytest.raises(ValueError, match=r"BREAD_HOOK_UPDATE_NUMEL must be a number of elements >= 0 .*'lots'"):
        bread_kernels.patch(model)
    assert patched_state(model).hook_update_numel == 7  # a refusal changes nothing


def test_updates_in_hook_takes_only_a_blocks_small_plain_linears():
    """The head and the embedding (one fused call per step each) and peft LoRA layers stay fused at any size."""
    import peft
    lora = peft.get_peft_model(models.llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model = bread_kernels.patch(lora, hook_update_numel=1 << 30)
    state = patched_state(model)
    hooked = {name for name, module in state.fused_modules if state.updates_in_hook(module)}
    assert hooked and all(".layers." in n and "q_proj" not in n for n in hooked)
    assert any("q_proj" in n for n, _ in state.fused_modules)
    assert len(hooked) == len([n for n in state.fused_modules if ".layers." in n[0]]) - 4


@pytest.mark.parametrize("enabled", ["before", "after"])
def test_checkpointing_turned_off_by_the_engine_is_turned_back_on_by_unpatch(enabled):
    """HF's ``gradient_checkpointing_enable()``: before ``patch``, patch turns the layers' flag off; after it, the
    first forward does, with a warning (the stream's recompute replaces HF's).  Either way ``unpatch`` turns it back
    on: the unpatched model checkpoints as its owner asked."""
    model = BUILDERS["llama"]()
    if enabled == "before":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bread_kernels.patch(model)
    blocks = patched_state(model).blocks
    if enabled == "after":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with pytest.warns(RuntimeWarning, match="gradient checkpointing is replaced"):
            loss_of(model, batch(0)).backward()
    else:
        loss_of(model, batch(0)).backward()
    assert not any(block.gradient_checkpointing for block in blocks)
    bread_kernels.unpatch(model)
    assert all(block.gradient_checkpointing for block in blocks)
    assert not any("_bread_checkpointing_turned_off" in block.__dict__ for block in blocks)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("sgd_mode", ["all", "disabled"])
def test_a_dropped_patched_model_and_its_optimizer_are_freed_without_the_cycle_collector(family, sgd_mode):
    """``del model, optimizer`` after training frees the patched model at once (reference counting), as an
    unpatched one is: no installed forward, hook or plan holds its module strongly from the module itself, so
    ``del model; torch.cuda.empty_cache()`` gives a GPU model's memory back (a bound-method forward per patched
    module made a cycle, freed only when Python's cycle collector ran)."""
    model = (MOE_BUILDERS[family](layers=2) if family in MOE_BUILDERS else BUILDERS[family]())
    model = bread_kernels.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                                 list(model.named_parameters()), verbose=0, sgd_mode=sgd_mode,
                                                 switch_block_every=1)
    gc.collect()
    gc.disable()
    try:
        for step in range(2):  # a block switch between
            loss_of(model, batch(step)).backward()
            optimizer.step()
            optimizer.zero_grad()
        alive = [weakref.ref(m) for m in (model, *model.modules())] + [weakref.ref(optimizer)]
        del model, optimizer
        assert not [r() for r in alive if r() is not None][:3]
    finally:
        gc.enable()


class _ScaledLoss(nn.Module):
    """A model with a parameter of its own (a learned loss scale) around a Llama."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.lm = BUILDERS["llama"](layers=2)

    def forward(self, ids):
        return self.lm(input_ids=ids, labels=ids).loss * self.scale


def test_a_dropped_patched_model_with_a_parameter_of_its_own_is_freed_without_the_cycle_collector():
    """A patched model whose root module holds a parameter itself (a wrapper's learned scale), and its deep copy,
    are freed at once when dropped: the forward's check for parameters sharded since patch probed the first
    parameter of the model by its owning module — here the model itself, held by its own patch state (a cycle,
    freed only by Python's cycle collector)."""
    gc.collect()
    gc.disable()
    try:
        model = _ScaledLoss()
        bread_kernels.patch(model, blocks=model.lm.model.layers)
        optimizer = _block_optimizer(model, sgd_mode="all")
        for step in range(2):
            model(batch(step)).backward()
            optimizer.step()
            optimizer.zero_grad()
        duplicate = copy.deepcopy(model)
        duplicate(batch(2)).backward()
        alive = [weakref.ref(m) for m in (model, duplicate, *model.modules())] + [weakref.ref(optimizer)]
        del model, duplicate, optimizer
        assert not [r() for r in alive if r() is not None][:3]
    finally:
        gc.enable()


def test_a_scalar_parameter_outside_the_blocks_takes_its_on_the_fly_sgd_update():
    """A 0-D parameter (the wrapper's learned loss scale) with an on-the-fly role goes the hook path, whose write
    failed in the native epilogue ("apply_update_: param must be 1-D or 2-D, got 0-D"); it takes ``s - lr·dL/ds``
    of plain autograd's gradient, as the reference's hook writes it."""
    model = _ScaledLoss()
    reference = copy.deepcopy(model)
    reference(batch(0)).backward()
    expected = reference.scale.detach() - 1e-2 * reference.scale.grad
    bread_kernels.patch(model, blocks=model.lm.model.layers)
    optimizer = _block_optimizer(model, sgd_mode="all")
    model(batch(0)).backward()
    optimizer.step()
    torch.testing.assert_close(model.scale.detach(), expected, rtol=0, atol=1e-7)
    assert model.scale.dim() == 0
    optimizer.close()


def test_a_patched_modules_forward_held_alone_says_its_module_was_freed_and_a_module_held_alone_still_runs():
    """An installed forward holds its module weakly: called after its model was dropped it raises naming the remedy
    (not a NoneType error); a block or a linear held by the caller runs its patched forward as before."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    linear = model.model.layers[0].mlp.down_proj
    forward = model.model.layers[1].mlp.down_proj.forward
    x = torch.randn(3, linear.in_features)
    expected = torch.nn.functional.linear(x, linear.weight)
    del model
    gc.collect()
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="module was freed.*keep a reference"):
        forward(x)


def test_torch_export_reads_a_patched_modules_forward_as_a_bound_methods():
    """``torch.export`` (non-strict) reads ``module.forward.__code__``; an installed forward reads through to its
    function as a bound method does, so a patched module exports as it did."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    linear = model.model.layers[0].mlp.down_proj
    forward = linear.forward
    assert forward.__code__ is forward.__func__.__code__ and forward.__name__ == forward.__func__.__name__
    x = torch.randn(3, linear.in_features)
    with torch.no_grad():
        exported = torch.export.export(linear, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), torch.nn.functional.linear(x, linear.weight), rtol=0, atol=0)


def test_a_model_patched_before_peft_wrapped_it_is_unpatched_through_the_wrapper_and_patched_again():
    """patch(base), get_peft_model(base): the wrapper reads the inner model's patch state through (peft's
    __getattr__); unpatch(wrapper) failed half-way (the forwards gone, the state and registration left), and
    patch(wrapper) returned at once with the LoRA layers unfused."""
    base = bread_kernels.patch(models.llama())
    wrapper = models.with_lora(base, r=4)
    with pytest.raises(ValueError, match="patched before it was wrapped.*unpatch"):
        bread_kernels.patch(wrapper)
    assert bread_kernels.unpatch(wrapper) is wrapper  # `model = unpatch(model)` keeps the wrapper
    assert patched_state(base) is None and base not in patched_models()
    assert all("forward" not in module.__dict__ for module in base.modules())
    reference = copy.deepcopy(wrapper)
    bread_kernels.patch(wrapper)
    ids = batch(0)
    torch.testing.assert_close(loss_of(wrapper, ids), loss_of(reference, ids))
    opt = bread_kernels.BlockOptimizer(torch.optim.SGD(wrapper.parameters(), lr=0.1), list(wrapper.named_parameters()),
                                       lora_mode="all", verbose=0)
    loss_of(wrapper, ids).backward()
    opt.step()


class _ReadsItsLinear(nn.Module):
    """A block whose forward computes with ``read.weight`` itself (as Mamba's mixer does with ``dt_proj``), asks
    ``called.weight`` only for its dtype, and initialises both in ``__init__``."""

    def __init__(self):
        super().__init__()
        self.read, self.called = nn.Linear(8, 8), nn.Linear(8, 8)
        nn.init.zeros_(self.called.bias)

    def forward(self, x):
        x = self.called(x.to(self.called.weight.dtype))
        return x + x @ self.read.weight.t() + self.read.bias


def test_a_linear_whose_weight_the_model_computes_with_outside_its_forward_keeps_plain_autograd_and_is_named():
    """Its fused forward would never run (nor its on-the-fly update); a read of its weight's metadata, or one in an
    initialiser, fuses as before."""
    model = nn.Sequential(nn.ModuleList([_ReadsItsLinear(), _ReadsItsLinear()]))
    with pytest.warns(RuntimeWarning, match=r"computes with the weight of 2 linear layer\(s\).*0\.0\.read: "
                                            r"_ReadsItsLinear\.forward reads self\.read\.(weight|bias)"):
        bread_kernels.patch(model, blocks=model[0])
    assert sorted(name for name, _ in patched_state(model).fused_modules) == ["0.0.called", "0.1.called"]


def test_dbrx_experts_of_stacked_2d_weights_are_named_as_unfused_and_counted_as_expert_weights():
    """DBRX keeps each experts module's E matrices stacked into 2-D parameters (w1, v1, w2 [E·F, H]): no 3-D
    weight, no linear layer, so the fused experts do not compute it.  patch said nothing and fused_fraction reported
    100% of the linear and expert weights fused, while the bulk of the model took the hook path."""
    model = models.dbrx()
    with pytest.warns(RuntimeWarning, match=r"transformer\.blocks\.1\.ffn\.experts \(DbrxExperts\).*mlp\.w1, "
                      r"mlp\.v1, mlp\.w2.*plain autograd"):
        model = bread_kernels.patch(model)
    assert patched_state(model).fused_experts == []
    report = fused_fraction(model)
    experts = {f"transformer.blocks.{i}.ffn.experts.mlp.{w}" for i in range(2) for w in ("w1", "v1", "w2")}
    assert experts <= {name for name, _ in report["unfused"]}
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if n in experts)
    assert report["linear_and_expert"] - report["fused_linear_and_expert"] == expert_numel


def test_a_depthwise_convolution_is_neither_warned_about_nor_counted_as_an_experts_module():
    """Mamba's ``conv1d`` holds a 3-D weight [channels, 1, kernel]: a layer of its own (plain autograd, as a norm),
    not an experts module the fused experts fail to compute; fused_fraction counts only the linears' weights and
    biases (no expert weights here) as linear and expert weights."""
    model = models.mamba(layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bread_kernels.patch(model)
    assert not [w for w in caught if "3-D weights" in str(w.message)], [str(w.message) for w in caught]
    linears = sum(p.numel() for block in model.backbone.layers for m in block.modules() if isinstance(m, nn.Linear)
                  for p in m.parameters(recurse=False))
    assert fused_fraction(model)["linear_and_expert"] == linears


class _Named:
    """A plain mixin ahead of the module base class (not an ``nn.Module``)."""

    def describe(self) -> str:
        return type(self).__name__


class _ReadsInItsBase(nn.Module):
    """A mixer whose forward computes with ``read.weight`` itself, in a base class after a mixin."""

    def __init__(self):
        super().__init__()
        self.read, self.called = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.called(x)
        return x + x @ self.read.weight.t()


class _MixedInReader(_Named, _ReadsInItsBase):
    pass


class _ReadsThroughAProperty(nn.Module):
    """A mixer whose forward computes with ``read.weight`` through a property of its own."""

    def __init__(self):
        super().__init__()
        self.read, self.called = nn.Linear(8, 8), nn.Linear(8, 8)

    @property
    def doubled(self) -> torch.Tensor:
        return self.read.weight * 2

    def forward(self, x):
        x = self.called(x)
        return x + x @ self.doubled.t()


class _Stack(nn.Module):
    def __init__(self, block_cls):
        super().__init__()
        self.layers = nn.ModuleList([block_cls(), block_cls()])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("block_cls", [_MixedInReader, _ReadsThroughAProperty])
def test_a_weight_read_in_a_base_class_after_a_mixin_or_in_a_property_is_found(block_cls):
    """The scan reads every module base class of the block's modules (not only those before a plain mixin in the
    MRO) and properties as well as methods: the read linear keeps plain autograd, and BREAD-SGD (every inactive
    weight SGD-stepped at the base optimizer's lr) moves every parameter as one plain SGD step of the unpatched
    model does."""
    torch.manual_seed(0)
    reference = _Stack(block_cls)
    model = copy.deepcopy(reference)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bread_kernels.patch(model, blocks=model.layers)
    assert sorted(name for name, _ in patched_state(model).fused_modules) == ["layers.0.called", "layers.1.called"]
    optimizer = _block_optimizer(model, sgd_mode="all")
    model(x).square().mean().backward()
    optimizer.step()
    expected = torch.optim.SGD(reference.parameters(), lr=1e-2)
    reference(x).square().mean().backward()
    expected.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
