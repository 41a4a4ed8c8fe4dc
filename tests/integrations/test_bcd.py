"""bread_kernels.accelerate under other BCD libraries: the real ``badam`` package (BlockOptimizer, BlockOptimizerRatio)
and a BlockOptimizers-style optimizer written from that library's published semantics.  Each test trains two copies
of one model with the library's own optimizer, one with ``accelerate`` and one without (the reference: the library
alone, plain autograd), and compares every parameter after the steps; the work is counted with
``torch.utils.flop_counter``."""

import copy
import gc
import warnings
import weakref

import badam
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bread_kernels
from bread_kernels.integrations import bcd
from bread_kernels.patch import patched_state

from .. import model_zoo as models
from .blockoptimizers_style import BlockOptimizersStyle

RTOL, ATOL = 1e-5, 1e-6
LR = 1e-2
# Adam's eps: an element whose gradient is ~eps has an ill-conditioned Adam step (d step/d g = lr·eps/(|g|+eps)²,
# up to lr/(4·eps)), so fp32 gradients summed in another order (the engine's GEMM layouts) move a few elements by
# 1e-6 after three Adam steps with eps=1e-8 or 1e-5 (measured: 1e-6 and 4e-6 on this model) though nothing is
# wrong; with 1e-3 the runs agree to 1.2e-7, fp32 rounding.  The tests check who updates what, with which lr.
EPS = 1e-3
LAYERS = [f"model.layers.{i}." for i in range(4)]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        # badam warns that fp32 weights cost memory; the unaccelerated runs warn that the model is not patched
        warnings.filterwarnings("ignore", message=".*expect model to be loaded in fp16/bf16.*")
        warnings.filterwarnings("ignore", message=".*ds_zero3_enabled.*")
        yield


def _badam(model, seed=0, **kwargs):
    torch.manual_seed(seed)  # the random switch order draws from the global RNG
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    return badam.BlockOptimizer(base, list(model.named_parameters()), verbose=0, **kwargs)


def _ratio(model, seed=0, **kwargs):
    torch.manual_seed(seed)  # each parameter's mask seed is drawn from the global RNG
    return badam.BlockOptimizerRatio(model.parameters(), list(model.named_parameters()), lr=LR, eps=EPS,
                                     verbose=0, **kwargs)


def _style(model, **kwargs):
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    return BlockOptimizersStyle(base, list(model.named_parameters()), [[p] for p in LAYERS], **kwargs)


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        models.loss_of(model, models.batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


#: the model's own head and loss on the engine's side too: these tests compare the integration with the library, not
#: the fused loss's summation order (tests/optim/test_equivalence.py's fused-loss cases do)
OWN_LOSS = dict(patch_options=dict(fused_loss=False))


def _compare(make_optimizer, steps, settings=None, model=models.llama):
    original = model()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    ref_opt = make_optimizer(ref_model)
    eng_opt = make_optimizer(eng_model)
    assert bread_kernels.accelerate(eng_opt, eng_model, **{**OWN_LOSS, **(settings or {})}) is eng_opt
    _train(ref_model, ref_opt, steps)
    _train(eng_model, eng_opt, steps)
    assert models.moved_parameters(original, ref_model), \
        "the reference did not train anything: the comparison would prove nothing"
    models.assert_same_parameters(ref_model, eng_model, RTOL, ATOL)
    return ref_model, eng_model, eng_opt


@pytest.mark.parametrize("switch_mode", ["descending", "random"])
@pytest.mark.parametrize("include_embedding", [False, True])
def test_badam_block_optimizer_trains_the_same(switch_mode, include_embedding):
    """7 steps, a switch every 2: every block switch of badam is learnt (the cut moves with it)."""
    _, model, opt = _compare(lambda m: _badam(m, switch_block_every=2, switch_mode=switch_mode,
                                             include_embedding=include_embedding), steps=7)
    # the block trained in the last step (badam's current_block_idx already points at the next one)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    lowest = 0 if any("embed" in n for n in trained) else min(i for i, p in enumerate(LAYERS)
                                                               if any(n.startswith(p) for n in trained))
    assert patched_state(model).cut == lowest


def test_badam_block_optimizer_ratio_masks_keep_working():
    """Every parameter stays trainable; the sparse-mask hooks see the engine's dense dW as they see autograd's."""
    _compare(lambda m: _ratio(m, update_ratio=0.3, switch_every=2), steps=4)


@pytest.mark.parametrize("sgd_mode,sign", [("disabled", False), ("all", False), ("partial", False),
                                           ("all", True), ("partial", True)],
                         ids=["badam", "sgd-all", "sgd-partial", "sign-all", "sign-partial"])
def test_blockoptimizers_style_trains_the_same(sgd_mode, sign):
    """BlockOptimizers' SGD hooks run on the parameters outside the fused modules, the engine fuses the rest; each
    parameter gets its update exactly once.  The sign cases leave sgd_lr_scaling / sgd_use_sign out: they are read
    from the library's hooks."""
    settings = dict(sgd_lr_scaling=0.5, sgd_use_sign=sign) if sgd_mode != "disabled" and not sign else {}
    _compare(lambda m: _style(m, switch_block_every=3, sgd_mode=sgd_mode, sgd_lr_scaling=0.5, sgd_use_sign=sign),
             steps=5, settings=settings)


def test_own_block_optimizer_is_returned_unchanged():
    model = bread_kernels.patch(models.llama())
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                       verbose=0)
    assert bread_kernels.accelerate(opt, model) is opt and not opt.closed
    with pytest.raises(ValueError, match="leave them out"):
        bread_kernels.accelerate(opt, model, sgd_lr_scaling=1.0)


def _backward_flops(model, optimizer, step=0):
    loss = models.loss_of(model, models.batch(step))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_the_accelerated_backward_does_less_work_under_gradient_checkpointing():
    """As badam's users run it (Hugging Face gradient checkpointing, which makes the embeddings' output require
    grad), the backward recomputes and differentiates every layer; accelerated, it stops at the active block."""
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    for model in (ref_model, eng_model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ref_opt, eng_opt = _badam(ref_model, switch_block_every=1), _badam(eng_model, switch_block_every=1)
    bread_kernels.accelerate(eng_opt, eng_model)
    # the first block trained is the top one (descending): the engine's backward reaches one layer of four
    reference, engine = _backward_flops(ref_model, ref_opt), _backward_flops(eng_model, eng_opt)
    assert engine < 0.6 * reference, (engine, reference)


def test_unaccelerate_restores_the_library():
    """accelerate, 3 steps, unaccelerate, 3 more steps: the same as the library alone for 6, the model unpatched
    and the library's own requires_grad flags back (BlockOptimizers' SGD targets included)."""
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    make = lambda m: _style(m, switch_block_every=2, sgd_mode="all", sgd_lr_scaling=0.5)  # noqa: E731
    ref_opt, eng_opt = make(ref_model), make(eng_model)
    bread_kernels.accelerate(eng_opt, eng_model, sgd_lr_scaling=0.5, sgd_use_sign=False, **OWN_LOSS)
    assert bcd.accelerated(eng_opt) is not None
    _train(ref_model, ref_opt, 3)
    _train(eng_model, eng_opt, 3)
    assert not all(p.requires_grad for p in eng_model.parameters()), "the engine fuses the weights' updates"
    bread_kernels.unaccelerate(eng_opt)
    assert bcd.accelerated(eng_opt) is None and "switch_trainable_params" not in eng_opt.__dict__
    assert patched_state(eng_model) is None
    assert all(p.requires_grad for p in eng_model.parameters()), "sgd_mode='all': the library keeps every flag on"
    _train(ref_model, ref_opt, 3, start=3)
    _train(eng_model, eng_opt, 3, start=3)
    # 6 steps at lr 1e-2, twice the others': the rounding drifts further (measured 8.6e-7 with torch's 2 threads,
    # 1.1e-6 with 1, each on one element of layer 0's v_proj; a wrong lr or owner moves a weight by ~lr)
    models.assert_same_parameters(ref_model, eng_model, RTOL, 2 * ATOL)


def test_dropping_the_optimizer_frees_the_acceleration():
    model = models.llama()
    opt = _badam(model)
    bread_kernels.accelerate(opt, model)
    acceleration = weakref.ref(bcd.accelerated(opt))
    driver = weakref.ref(acceleration().driver)
    state = patched_state(model)
    assert state.cut == 3
    del opt
    gc.collect()
    assert acceleration() is None and driver() is None
    assert state.cut == 0, "the plans and cut of a dropped optimizer are removed"


def test_bad_input_is_refused_before_anything_is_touched(monkeypatch):
    model = models.llama()
    with pytest.raises(TypeError, match="not a supported BCD optimizer.*badam.BlockOptimizer.*EngineDriver"):
        bread_kernels.accelerate(torch.optim.AdamW(model.parameters(), lr=LR), model)
    other = models.llama(seed=1)
    opt = _badam(model)
    with pytest.raises(ValueError, match="is not a parameter of the LlamaForCausalLM"):
        bread_kernels.accelerate(opt, other)
    with pytest.raises(ValueError, match="pass the model"):
        bread_kernels.accelerate(opt)
    with pytest.raises(TypeError, match="unknown setting"):
        bread_kernels.accelerate(opt, model, lr=1.0)
    with pytest.raises(ValueError, match="no on-the-fly update"):
        bread_kernels.accelerate(opt, model, sgd_lr_scaling=1.0)
    style = _style(other, sgd_mode="all", sgd_lr_scaling=0.5)
    with monkeypatch.context() as unreadable:  # hooks whose closures cannot be read (another library, another torch)
        unreadable.setattr(bcd, "_hook_settings", lambda optimizer: None)
        with pytest.raises(ValueError, match="sgd_lr_scaling and sgd_use_sign live only in its hooks' closures, "
                                             "which could not be read"):
            bread_kernels.accelerate(style, other)
    for m in (model, other):
        assert patched_state(m) is None, "a refused accelerate patched the model"
    assert "switch_trainable_params" not in opt.__dict__ and "switch_trainable_params" not in style.__dict__


@pytest.mark.parametrize("settings, error, match", [
    (dict(patch_options={"keep_top": -1}), ValueError, "accelerate: keep_top must be 'auto' or an int >= 0"),
    (dict(patch_options={"fused_los": False}), TypeError, r"unknown patch option\(s\) \['fused_los'\]"),
    (dict(patch_options=["recompute"]), TypeError, "patch_options must be a dict of bread_kernels.patch's keywords"),
    (dict(patch_options={"recompute": "no"}), TypeError, "accelerate: recompute must be True or False"),
], ids=["keep_top", "typo", "not_a_dict", "recompute"])
def test_bad_patch_options_leave_the_live_acceleration_and_its_patch_in_place(settings, error, match):
    """A re-run cell whose patch options ``patch`` refuses: refused before the acceleration that owns the parameters
    is closed, which unpatched the model it had patched, so the first optimizer trains on accelerated."""
    model = models.llama()
    first = _badam(model)
    bread_kernels.accelerate(first, model)
    state = patched_state(model)
    with pytest.raises(error, match=match):
        bread_kernels.accelerate(_badam(model), model, **settings)
    assert bcd.accelerated(first) is not None and patched_state(model) is state


def test_the_badam_internals_read_are_there():
    """Fails loudly when a badam release changes what the integration reads."""
    import importlib.metadata
    assert importlib.metadata.version("badam") == bcd.TESTED_BADAM, \
        "a new badam: check bread_kernels/integrations/bcd.py against it and update TESTED_BADAM"
    model = models.llama()
    assert bcd.internals_problems(_badam(model)) == []
    assert bcd.internals_problems(_ratio(models.llama())) == []
    assert bcd.internals_problems(_style(models.llama())) == []


def test_unpatch_of_an_accelerated_model_closes_the_acceleration():
    model = models.llama()
    opt = _badam(model)
    bread_kernels.accelerate(opt, model)
    bread_kernels.unpatch(model)
    assert patched_state(model) is None and bcd.accelerated(opt) is None
    assert "switch_trainable_params" not in opt.__dict__
    _train(model, opt, 2)  # the library alone again


def test_badam_lora_mode_trains_the_same():
    """badam on a peft LoRA model trains only the active block's adapters: the base weights there get the LORA
    plan (no dW), the adapters' gradients land in .grad."""
    _compare(lambda m: _badam(m, switch_block_every=2), steps=5,
             model=lambda: models.with_lora(models.llama(), r=4))


def test_accelerate_under_a_loss_scaler_undoes_the_scale_on_the_fused_weights():
    """BlockOptimizers-style sgd_mode='partial' with a GradScaler: accelerated, the fused SGD steps divide the scale
    out — the run equals the unscaled library run on the fused weights; the library's own hooks (the norms) still
    step with the scaled gradient, as it does alone, and accelerate warns about them."""
    original = models.llama()
    plain_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    make = lambda m: _style(m, switch_block_every=3, sgd_mode="partial", sgd_lr_scaling=0.5)  # noqa: E731
    plain_opt, eng_opt = make(plain_model), make(eng_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    with pytest.warns(RuntimeWarning, match="with the scaled gradient"):
        bread_kernels.accelerate(eng_opt, eng_model, sgd_lr_scaling=0.5, sgd_use_sign=False, loss_scaler=scaler)
    before = copy.deepcopy(original)
    models.loss_of(plain_model, models.batch(0)).backward()
    plain_opt.step()
    scaler.scale(models.loss_of(eng_model, models.batch(0))).backward()
    scaler.step(eng_opt)
    scaler.update()
    # the top block is active (descending), so the partial SGD reaches the final norm (library hook) and the head
    # (fused); one step, so both runs start every update from the same weights
    torch.testing.assert_close(eng_model.lm_head.weight, plain_model.lm_head.weight, rtol=RTOL, atol=ATOL)
    norm = lambda m: m.model.norm.weight - before.model.norm.weight  # noqa: E731
    # the plain delta (~1e-6 on weights ~1) carries the fp32 rounding of W + δ: 2^-23 each, times the scale
    torch.testing.assert_close(norm(eng_model), 2.0 ** 8 * norm(plain_model), rtol=1e-3, atol=2.0 ** 8 * 2.0 ** -22)


def test_a_re_run_cell_accelerates_the_new_optimizer_on_its_own_block():
    """A second badam optimizer accelerated on a model still accelerated (a notebook cell run again, a Trainer run
    again after Ctrl-C): closing the first gave back its own flags over the new optimizer's, so the engine planned
    the old block and badam's first step failed (its active weights had no gradient)."""
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    for model, accelerated in ((ref_model, False), (eng_model, True)):
        first = _badam(model, switch_block_every=2)
        if accelerated:
            bread_kernels.accelerate(first, model, **OWN_LOSS)
        _train(model, first, 3)  # past a switch: the first optimizer's block is not the new one's
        second = _badam(model, switch_block_every=2)
        if accelerated:
            with pytest.warns(RuntimeWarning, match="takes them over"):
                bread_kernels.accelerate(second, model, **OWN_LOSS)
        _train(model, second, 4, start=10)
    models.assert_same_parameters(ref_model, eng_model, RTOL, ATOL)


@pytest.mark.parametrize("given", [dict(sgd_lr_scaling=1.0, sgd_use_sign=False),
                                   dict(sgd_lr_scaling=0.5, sgd_use_sign=True)], ids=["scale", "sign"])
def test_sgd_settings_other_than_the_library_hooks_are_refused(given):
    """BlockOptimizers' sgd_lr_scaling / sgd_use_sign live in its hooks' closures and accelerate takes them again:
    other values were accepted, and the fused weights then took another step than the library's hooks give the
    norms (and than the library alone gives them), silently.  They are read from the closures and compared."""
    model = models.llama()
    opt = _style(model, sgd_mode="partial", sgd_lr_scaling=0.5, sgd_use_sign=False)
    assert bcd._hook_settings(opt) == (0.5, False)
    with pytest.raises(ValueError, match="hooks hold sgd_lr_scaling=0.5, sgd_use_sign=False"):
        bread_kernels.accelerate(opt, model, **given)
    assert patched_state(model) is None and "switch_trainable_params" not in opt.__dict__
    assert bread_kernels.accelerate(opt, model, sgd_lr_scaling=0.5, sgd_use_sign=False) is opt


def test_a_second_acceleration_refused_for_its_patch_options_leaves_the_first_driving():
    """A notebook cell re-run with patch options the model cannot take (``keep_top`` past its blocks,
    ``fused_loss=True`` for a model the fused loss cannot match): the refusal came from ``patch``, after the live
    acceleration of the same parameters had been closed and had unpatched the model.  Refused before anything
    changes: the first acceleration drives on, its model patched."""
    model = models.llama()
    first = bread_kernels.accelerate(_badam(model), model)
    acceleration = bcd.accelerated(first)
    for options in ({"keep_top": 99}, {"blocks": torch.nn.ModuleList([torch.nn.Linear(2, 2)])}):
        with pytest.raises(ValueError, match="keep_top must be 'auto' or an int in|blocks= is not a submodule"):
            bread_kernels.accelerate(_badam(model), model, patch_options=options)
        assert bcd.accelerated(first) is acceleration and not acceleration.closed
        assert patched_state(model) is not None and patched_state(model).driver is acceleration
    with pytest.raises(ValueError, match="fused_loss=True needs transformers' own forward"):
        with pytest.MonkeyPatch.context() as monkeypatch:  # a forward the fused loss cannot match
            monkeypatch.setattr(type(model), "forward", lambda self, *args, **kwargs: None)
            bread_kernels.accelerate(_badam(model), model, patch_options={"fused_loss": True})
    assert not acceleration.closed and patched_state(model).driver is acceleration
