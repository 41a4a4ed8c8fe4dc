"""BREAD (peft LoRA corrections) through patch + BlockOptimizer against the plain-autograd reference on peft's model.

The reference (:class:`~tests.optim.reference_bcd.ReferenceBCD` with ``lora_mode``) trains an unpatched copy of
the same peft model with ordinary autograd: peft's own LoRA forward/backward.  Adam runs with ``eps=1e-3`` here:
the fused adapter gradients sum the same products as peft's in a different order, and Adam turns a rounding
difference δ in a near-zero gradient into an update difference of up to lr·δ/(4·eps) (see ``ADAM_EPS`` in
test_equivalence); with eps=1e-3 that stays far below the 1e-5 relative tolerance, while the function-level tests
(tests/functions/test_lora.py) compare every gradient of A and B with peft's directly.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import bread_kernels
from bread_kernels.functions import linear as linear_module
from bread_kernels.functions import lora as lora_module
from bread_kernels.patch import patched_state

from tests import model_zoo as models
from .test_equivalence import SCALING, Case, run_case

LORA_EPS = dict(eps=1e-3)


def bread_case(family="llama", r=8, dropout=0.0, lora_mode="all", sgd_mode="disabled", sign=False, steps=7, **kw):
    return Case(family, steps=steps, optimizer_extra=LORA_EPS, lora=dict(r=r, lora_dropout=dropout),
                bcd=dict(switch_block_every=2, switch_mode="descending", lora_mode=lora_mode, sgd_mode=sgd_mode,
                         sgd_use_sign=sign, sgd_lr_scaling=SCALING), **kw)


@pytest.mark.parametrize("lora_mode", ["all", "partial"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "dropout"])
def test_bread_and_bread_partial_match_the_reference(lora_mode, dropout):
    run_case(bread_case(dropout=dropout, lora_mode=lora_mode))


@pytest.mark.parametrize("r", [1, 64])
def test_ranks(r):
    run_case(bread_case(r=r, steps=5))


def test_adapter_only():
    run_case(bread_case(lora_mode="adapter_only", steps=5))


@pytest.mark.parametrize("sgd_mode,sign,lora_mode", [("all", False, "all"), ("partial", True, "partial")],
                         ids=["sgd-all+bread", "sign-partial+bread-partial"])
def test_on_the_fly_sgd_together_with_lora(sgd_mode, sign, lora_mode):
    """Both corrections at once: inactive base weights take the on-the-fly update, adapters train with Adam."""
    run_case(bread_case(lora_mode=lora_mode, sgd_mode=sgd_mode, sign=sign, steps=5))


def test_gpt2_conv1d_lora():
    run_case(bread_case("gpt2", steps=5, dropout=0.1))


@pytest.mark.parametrize("sgd_mode", ["disabled", "all"])
def test_falcon_lora_over_its_linear_subclass(sgd_mode):
    """peft's LoRA over Falcon's FalconLinear (an nn.Linear subclass whose forward is x @ Wᵀ + b) is fused like
    LoRA over nn.Linear (patch refused it before, as a quantized base layer); the adapters' outputs are added into
    in place by the model (``mlp_output += attention_output``)."""
    run_case(bread_case("falcon", steps=5, sgd_mode=sgd_mode))


def _patched_lora_llama(**lora):
    model = bread_kernels.patch(models.with_lora(models.llama(), **lora))
    return model


def _optimizer(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3),
                                            list(model.named_parameters()), verbose=0, **kw)


@pytest.mark.parametrize("active", [1, 3])
def test_bread_partial_does_no_backward_work_below_the_active_block(monkeypatch, active):
    model = _patched_lora_llama()
    _opt = _optimizer(model, switch_mode="fixed", start_block=active, lora_mode="partial")
    calls = []
    for module in (linear_module.FusedLinearFunction, lora_module.FusedLoRALinearFunction):
        original = module.backward

        def counting(ctx, *grads, _original=original):
            calls.append(ctx.plan.name)
            return _original(ctx, *grads)

        monkeypatch.setattr(module, "backward", staticmethod(counting))
    state = patched_state(model)
    assert state.stream.cut == active
    models.loss_of(model, models.batches(1)[0]).backward()
    layers = {int(n.split(".")[4]) for n in calls if ".layers." in n}
    assert layers == set(range(active, 4)), f"backward ran in layers {sorted(layers)}"
    assert state.stream.kept == 1  # keep_top="auto": the top block keeps its activations under the fused loss
    assert set(state.stream.recomputes) == set(range(active, 3))
    for name, p in model.named_parameters():
        layer = int(name.split(".")[4]) if ".layers." in name else None
        if layer is not None and layer < active:
            assert p.grad is None, name


def test_bread_all_reaches_every_layer(monkeypatch):
    model = _patched_lora_llama()
    _opt = _optimizer(model, switch_mode="fixed", start_block=3, lora_mode="all")
    assert patched_state(model).stream.cut == 0
    models.loss_of(model, models.batches(1)[0]).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        elif ".layers.3." not in name:
            assert p.grad is None, name


def test_adapters_keep_their_adam_state_across_a_switch():
    model = _patched_lora_llama()
    opt = _optimizer(model, switch_block_every=1, lora_mode="all")
    adapter = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    for ids in models.batches(3):
        models.loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert opt.order.current == 0 and int(opt.base_optimizer.state[adapter]["step"]) == 3


def test_merge_and_unload_and_save_pretrained_give_the_trained_outputs(tmp_path):
    import transformers

    model = _patched_lora_llama(lora_dropout=0.1)
    opt = _optimizer(model, switch_block_every=2, lora_mode="all", sgd_mode="partial")
    for ids in models.batches(5):
        models.loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad()
    probe = models.batches(1, seed=7)[0]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    merged = bread_kernels.merge_and_unload(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, trained, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, trained, rtol=1e-5, atol=1e-5)


def test_peft_merge_and_unload_while_an_optimizer_drives_refuses_training_and_keeps_inference():
    """peft's own merge_and_unload() puts each LoRA layer's base layer in its place, which no plan reaches: the
    inactive base weights silently stopped taking their on-the-fly steps (the unpatched model's hooks go on).  Now a
    forward with grad is refused, naming bread_kernels.merge_and_unload; inference runs; once the optimizer lets go
    the merged model trains with plain autograd, and a new optimizer is refused until the model is patched again."""
    model = _patched_lora_llama()
    opt = _optimizer(model, switch_block_every=2, sgd_mode="all")
    ids = models.batches(2)
    models.loss_of(model, ids[0]).backward()
    opt.step()
    opt.zero_grad()
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged(input_ids=ids[1])
    with pytest.raises(ValueError, match=r"layers\.\d+\.\S+ was replaced after patch\(\).*while an optimizer drives"
                                         r".*bread_kernels\.merge_and_unload\(model\)"):
        models.loss_of(merged, ids[1])
    opt.close()
    models.loss_of(merged, ids[1]).backward()
    with pytest.raises(ValueError, match=r"was replaced after patch\(\).*so the optimizer's plans cannot reach"):
        _optimizer(model, sgd_mode="all")
    bread_kernels.unpatch(model)
    _optimizer(bread_kernels.patch(merged), sgd_mode="all").close()


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_the_model_peft_unloads_from_a_patched_peft_model_is_unpatched_by_its_own_name(unload):
    """peft's ``merge_and_unload()`` / ``unload()`` on a patched peft model returns the base model, whose modules
    carry the patch of the peft model around it: ``unpatch(merged)`` left them there, silently, and ``patch(merged)``
    failed in the first forward ("block 0's first argument is tuple, not hidden states").  ``patch(merged)`` is
    refused, naming the remedy; ``unpatch(merged)`` unpatches the peft model it came from, after which the merged
    model patches and trains (BREAD-SGD) as the unpatched merged model does under the plain-autograd reference."""

    reference = getattr(models.with_lora(models.llama()), unload)()
    model = _patched_lora_llama()
    merged = getattr(model, unload)()
    with pytest.raises(ValueError, match=r"block of the patched PeftModel, which this LlamaForCausalLM is part of"
                                         r".*bread_kernels\.unpatch\(model\)"):
        bread_kernels.patch(merged)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\) returns it: bread_kernels\.unpatch\(it\), then"):
        _optimizer(merged, sgd_mode="all")
    assert bread_kernels.unpatch(merged) is merged
    assert not _patch_leftovers(merged) and not _patch_leftovers(model) and patched_state(model) is None
    merged = bread_kernels.patch(merged.requires_grad_(True))
    reference.requires_grad_(True)
    models.assert_sgd_all_trains_as_the_reference(reference, merged)


def test_a_model_wrapped_by_peft_while_its_optimizer_drives_is_refused_naming_the_remedy_which_trains():
    """``peft.get_peft_model`` around a patched model whose optimizer drives it freezes the base weights the
    optimizer made trainable: the forward is refused (an ACTIVE weight's dW would be dropped), and the error named
    only ``requires_grad_(True)`` or ``Role.FROZEN``.  It names the change and the remedy, which trains BREAD as the
    plain-autograd reference trains the unpatched peft model."""

    model = bread_kernels.patch(models.llama(layers=2))
    opt = _optimizer(model, sgd_mode="all")
    wrapped = models.with_lora(model)
    with pytest.raises(ValueError, match=r"get_peft_model and add_adapter freeze the base weights.*"
                                         r"bread_kernels\.unpatch\(wrapper\), then patch\(wrapper\) and a new "
                                         r"optimizer"):
        models.loss_of(wrapped, models.batch(0))
    reference = models.with_lora(models.llama(layers=2))
    bread_kernels.patch(bread_kernels.unpatch(wrapped))
    assert opt.closed  # unpatch closed the optimizer driving the model
    models.assert_sgd_all_trains_as_the_reference(reference, wrapped)


def _patch_leftovers(model) -> list[str]:
    """The modules of ``model`` that still carry something patch installs (a forward, a plan, a block's stream)."""
    from bread_kernels.installed_forward import InstalledForward

    return [name for name, module in model.named_modules()
            if isinstance(module.__dict__.get("forward"), InstalledForward)
            or any(attr.startswith("_bread_") for attr in module.__dict__)]


def test_an_adapter_added_around_a_fused_layer_keeps_it_and_trains():
    """add_adapter on layers patch fused (no adapter there yet) wraps each in a LoRA layer: the fused layer stays
    in the model, inside its wrapper, so nothing is refused."""
    model = bread_kernels.patch(peft.get_peft_model(models.llama(), peft.LoraConfig(r=4, target_modules=["v_proj"])))
    opt = _optimizer(model, sgd_mode="all")
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert patched_state(model).find_lost() is None
    models.loss_of(model, models.batches(1)[0]).backward()
    opt.step()


def test_bread_initialisation():
    model = models.with_lora(models.llama())
    bread_kernels.init_bread_lora_(model)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert torch.count_nonzero(p) == 0, name
        elif "lora_B" in name:
            bound = 1 / p.shape[1] ** 0.5  # kaiming_uniform(a=√5) on [out, r]: U(-1/√r, 1/√r)
            assert 0 < p.abs().max() <= bound and p.std() > bound / 4, name
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        bread_kernels.init_bread_lora_(models.llama())


def test_unsupported_lora_configurations_are_refused_at_patch():
    with pytest.raises(NotImplementedError, match="DoRA"):
        bread_kernels.patch(models.with_lora(models.llama(), use_dora=True))
    with pytest.raises(NotImplementedError, match="lora_bias=True"):
        bread_kernels.patch(models.with_lora(models.llama(), lora_bias=True))


def test_two_active_adapters_are_refused_in_training():
    model = models.with_lora(models.llama())
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    model = bread_kernels.patch(model)
    _opt = _optimizer(model, lora_mode="all")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="2 active adapters"):
        models.loss_of(model, models.batches(1)[0])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    model.base_model.set_adapter("default")
    models.loss_of(model, models.batches(1)[0]).backward()


def test_an_adapter_added_after_patch_that_the_fused_function_does_not_compute_is_refused_in_training():
    """A DoRA or lora_bias adapter added to a patched model (add_adapter, load_adapter) was computed as plain LoRA."""
    for variant, match in ((dict(use_dora=True), "DoRA"), (dict(lora_bias=True), "lora_bias=True")):
        model = _patched_lora_llama()
        model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"], **variant))
        model.base_model.set_adapter("second")
        _opt = _optimizer(model, lora_mode="all")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(NotImplementedError, match=match):
            models.loss_of(model, models.batches(1)[0])
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        with torch.no_grad():  # evaluation is peft's own forward
            reference = models.loss_of(bread_kernels.unpatch(copy.deepcopy(model)), models.batches(1)[0])
            assert torch.equal(models.loss_of(model, models.batches(1)[0]), reference)


def _two_losses_one_backward(model, opt, second, steps=3):
    """Per step: a loss with the default adapter, a second loss with ``second`` ("b" through set_adapter, or None
    for the base model through disable_adapter()), one backward of their sum; the adapters' gradients."""
    grads = []
    for step, ids in enumerate(models.batches(2 * steps)[::2]):
        other = models.batches(2 * steps)[2 * step + 1]
        model.base_model.set_adapter("default")
        loss = models.loss_of(model, ids)
        if second is None:
            with model.disable_adapter():
                loss = loss + models.loss_of(model, other)
        else:
            model.base_model.set_adapter(second)
            loss = loss + models.loss_of(model, other)
            model.base_model.set_adapter("default")
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None})
        opt.step()
        opt.zero_grad()
    return grads


def _two_adapter_model():
    model = models.with_lora(models.llama(layers=3), r=4)
    model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".b." in name and "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def test_a_recompute_replays_the_adapter_choice_of_its_forward():
    """A loss computed inside disable_adapter() and backpropagated after it: the recompute ran the blocks with the
    adapters back on (a CheckpointError); set_adapter() between two forwards of one backward recomputed with the
    adapter of the backward's time (wrong gradients, silently) and is refused now, naming recompute=False, which
    trains it as peft's autograd does."""
    base = _two_adapter_model()
    # adapter_only: leaving disable_adapter() turns requires_grad on for the adapters the optimizer froze (peft's
    # enable_adapters); their recompute rebuilds them as the forward saw them, frozen
    for second, patch_options, mode in ((None, {}, "all"), (None, {"keep_top": 0}, "all"), (None, {}, "adapter_only"),
                                        ("b", {"recompute": False}, "all")):
        reference = copy.deepcopy(base)
        expected = _two_losses_one_backward(reference, _optimizer(reference, lora_mode=mode, switch_block_every=1),
                                            second)
        model = bread_kernels.patch(copy.deepcopy(base), **patch_options)
        got = _two_losses_one_backward(model, _optimizer(model, lora_mode=mode, switch_block_every=1), second)
        for want, have in zip(expected, got):
            # adapter_only: the reference also fills .grad of adapters its optimizer does not train (peft made them
            # require grad); the trained ones' gradients, and every parameter after the steps, agree
            assert have.keys() <= want.keys() and (mode != "all" or want.keys() == have.keys())
            for name in have:
                torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    model = bread_kernels.patch(copy.deepcopy(base))
    with pytest.raises(RuntimeError, match="stopped requiring grad between this block's forward and its backward.*"
                                           "recompute=False"):
        _two_losses_one_backward(model, _optimizer(model, lora_mode="all", switch_block_every=1), "b", steps=1)


def test_a_merged_adapter_disabled_in_training_gives_the_base_model():
    """peft unmerges a merged adapter when the adapters are disabled; the patched forward used the merged W."""
    model = _patched_lora_llama()
    _opt = _optimizer(model, lora_mode="all")
    ids = models.batches(1)[0]
    reference = bread_kernels.unpatch(copy.deepcopy(model))
    with reference.disable_adapter():
        expected = models.loss_of(reference, ids)
    model.base_model.merge_adapter()
    with model.disable_adapter():
        loss = models.loss_of(model, ids)
    torch.testing.assert_close(loss, expected)


def test_two_active_adapters_evaluate_as_peft_does():
    model = models.with_lora(models.llama())
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        expected = models.loss_of(model, models.batches(1)[0])
    model = bread_kernels.patch(model)
    _opt = _optimizer(model, lora_mode="all")
    with torch.no_grad():
        torch.testing.assert_close(models.loss_of(model, models.batches(1)[0]), expected)


def test_state_dict_resumes_a_bread_run_exactly():
    """Adapters carry Adam state across switches; a resumed run must carry it too."""
    def train(model, opt, steps, start):
        for ids in models.batches(start + steps)[start:]:
            models.loss_of(model, ids).backward()
            opt.step()
            opt.zero_grad()

    base = models.with_lora(models.llama(), lora_dropout=0.1)
    model = bread_kernels.patch(copy.deepcopy(base))
    opt = _optimizer(model, switch_block_every=2, lora_mode="partial", sgd_mode="partial")
    train(model, opt, 3, 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    train(model, opt, 3, 3)

    resumed = bread_kernels.patch(copy.deepcopy(base))
    resumed.load_state_dict(saved_model)
    opt2 = _optimizer(resumed, switch_block_every=2, lora_mode="partial", sgd_mode="partial")
    opt2.load_state_dict(saved_opt)
    torch.set_rng_state(rng)  # the dropout masks of steps 3..5
    train(resumed, opt2, 3, 3)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
