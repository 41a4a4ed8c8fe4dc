"""BlockOptimizer under the torch.optim API an experienced user reaches for: hooks, param groups, schedulers that
write more than the lr, a base optimizer without an lr, groups laid out with the no-decay group first."""

import copy
import warnings

import pytest
import torch
from transformers.optimization import Adafactor

import bread_kernels
from tests import model_zoo as models
from tests.model_zoo import batch, loss_of

from .reference_bcd import ReferenceBCD, block_prefixes


def _build(base=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01), **kwargs):
    model = bread_kernels.patch(models.llama(layers=2))
    kwargs.setdefault("verbose", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(base(model.parameters()), list(model.named_parameters()), **kwargs)
    return model, opt


def _train(model, opt, steps, scheduler=None):
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()


def test_state_dict_and_load_state_dict_hooks_run_once_each_and_may_rewrite_the_state():
    """torch's four state-dict hooks: pre hooks see the optimizer, a post hook's return value is the state
    ``state_dict()`` gives, a load pre hook's return value is what is loaded; the load's own snapshot (its undo)
    runs none of them."""
    model, opt = _build(switch_block_every=2)
    _train(model, opt, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save_pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", sd.get("extra")))
                                          or {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.global_step)))
    saved = opt.state_dict()
    assert saved["extra"] == 1
    opt.load_state_dict(saved)
    assert calls == [("save_pre", True), ("load_pre", 1), ("load_post", 1)]


def test_a_param_group_added_after_construction_is_refused_with_nothing_changed():
    """The blocks, roles and hooks are built from ``named_parameters_list``: a group added later would never be
    trained (torch's ``add_param_group`` took it silently)."""
    model, opt = _build()
    extra = torch.nn.Parameter(torch.ones(3))
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="add_param_group.*never be trained.*named_parameters_list"):
        opt.add_param_group({"params": [extra], "lr": 0.1})
    assert [dict(g) for g in opt.param_groups] == groups


@pytest.mark.parametrize("base, key", [
    (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), "momentum"),
    (lambda params: torch.optim.AdamW(params, lr=1e-2), "betas"),
], ids=["sgd-momentum", "adamw-betas"])
def test_what_a_scheduler_writes_besides_the_lr_trains_the_active_block(base, key):
    """OneCycleLR cycles the momentum (SGD's ``momentum``, Adam's ``betas[0]``) in ``param_groups`` as it does the lr;
    the base optimizer steps with the values ``param_groups[0]`` holds at that step, across a switch too."""
    model, opt = _build(base, switch_block_every=2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    seen = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(({g[key] for g in o.param_groups}, {g["lr"] for g in o.param_groups})))
    expected = []
    for step in range(4):
        expected.append(({opt.param_groups[0][key]}, {opt.param_groups[0]["lr"]}))
        loss_of(model, batch(step)).backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
    assert seen == expected and len({next(iter(m)) for m, _ in expected}) == 4


def _train_as_the_reference(base_groups, weight_decay, steps=3, **bcd):
    """Train one tiny Llama with the engine whose base optimizer is AdamW built over ``base_groups(model)``, and
    check every step against ReferenceBCD (AdamW with ``weight_decay``) taken from the same weights.  Adam's eps is
    1e-3: an element's normalised step turns by ``lr·eps/(|g|+eps)²``, at most ``lr/eps``, times the rounding of its
    gradient, which the engine sums in another order (with eps 1e-5, a v_proj element whose g was 1.3e-5 against a
    typical 3e-2 lay 3e-6 off on a CPU with AVX-512 GEMM kernels)."""
    original = models.llama(layers=2)
    layer_prefixes, embedding_prefix = models.layout(original)
    reference, model = copy.deepcopy(original), copy.deepcopy(original)
    names = [n for n, _ in original.named_parameters()]
    ref = ReferenceBCD(reference, block_prefixes(names, layer_prefixes, embedding_prefix), loss_fn=loss_of,
                       optimizer_kwargs=dict(lr=1e-2, weight_decay=weight_decay, eps=1e-3), **bcd)
    model = bread_kernels.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(base_groups(model), lr=1e-2, eps=1e-3),
                                           list(model.named_parameters()), verbose=0, **bcd)
    for step in range(steps):
        with torch.no_grad():  # lock-step: rounding differences never compound through Adam's normalisation
            for p, q in zip(reference.parameters(), model.parameters()):
                p.copy_(q)
        ref.step(batch(step))
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        models.assert_same_parameters(reference, model)


def test_a_no_decay_group_given_first_keeps_the_weight_decay_of_the_decayed_group():
    """LLaMA-Factory's BAdam builds ``[dict(params=nodecay, weight_decay=0.0), dict(params=decay,
    weight_decay=wd)]``: the weights train with ``wd`` (the first group's 0 would drop it silently)."""
    def groups(model):
        named = list(model.named_parameters())
        no_decay = [p for n, p in named if "norm" in n or n.endswith("bias")]
        return [dict(params=iter(no_decay), weight_decay=0.0),
                dict(params=(p for n, p in named if not ("norm" in n or n.endswith("bias"))), weight_decay=0.5)]

    _train_as_the_reference(groups, weight_decay=0.5, switch_block_every=2, sgd_mode="all")


def test_an_adafactor_with_relative_steps_trains_the_active_block_as_adafactor_alone():
    """Adafactor(lr=None, relative_step=True) computes its own step size: BAdam trains the active block exactly as
    that Adafactor over the block's parameters alone (the block's weights, then its norms: the two groups)."""
    def adafactor(params):
        return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=False)

    original = models.llama(layers=2)
    reference, model = copy.deepcopy(original), copy.deepcopy(original)
    model, opt = bread_kernels.patch(model), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(adafactor(model.parameters()), list(model.named_parameters()),
                                           verbose=0, switch_block_every=5)
    block = [(n, p) for n, p in reference.named_parameters() if n.startswith("model.layers.1.")]
    for _, p in reference.named_parameters():
        p.requires_grad_(False)
    for _, p in block:
        p.requires_grad_(True)
    plain = adafactor([{"params": [p for n, p in block if "norm" not in n]},
                       {"params": [p for n, p in block if "norm" in n]}])
    for step in range(3):
        for m, o in ((reference, plain), (model, opt)):
            loss_of(m, batch(step)).backward()
            o.step()
            o.zero_grad()
    models.assert_same_parameters(reference, model)
    assert opt.param_groups[0]["lr"] is None


@pytest.mark.parametrize("kwargs", [dict(sgd_mode="all"), dict(sgd_mode="partial", sgd_use_sign=True),
                                    dict(lr_warmup_step_afterswitch=2)], ids=["sgd", "sign", "warmup"])
def test_a_base_optimizer_without_an_lr_is_refused_where_one_is_needed(kwargs):
    """The on-the-fly step ``lr·s·dW`` and the after-switch warm-up scale the scheduled lr: a base optimizer whose lr
    is None (Adafactor with relative steps) is refused when the optimizer is built, naming the remedy."""
    model = bread_kernels.patch(models.llama(layers=2))
    base = Adafactor(model.parameters(), lr=None, relative_step=True)
    with pytest.raises(ValueError, match="lr is None.*relative_step=False"):
        bread_kernels.BlockOptimizer(base, list(model.named_parameters()), verbose=0, **kwargs)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("relative_step", [False, True], ids=["lr", "relative-step"])
def test_a_state_of_an_adafactor_resumes_the_run_exactly(relative_step):
    """A base optimizer whose defaults lack ``differentiable`` (transformers' Adafactor; torch's load adds it to
    the defaults, not to the groups) resumes from its state_dict, into a fresh optimizer and into itself."""
    def adafactor(params):
        return Adafactor(params, lr=None if relative_step else 1e-2, relative_step=relative_step, warmup_init=False)

    original = models.llama(layers=2)
    model, opt = _build(adafactor, switch_block_every=2)
    with torch.no_grad():
        for p, q in zip(model.parameters(), original.parameters()):
            p.copy_(q)
    _train(model, opt, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.load_state_dict(copy.deepcopy(saved))
    resumed, opt2 = _build(adafactor, switch_block_every=2)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (resumed, opt2)):
        for step in range(3, 6):
            loss_of(m, batch(step)).backward()
            o.step()
            o.zero_grad()
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
