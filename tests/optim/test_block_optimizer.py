"""BlockOptimizer: bad input refused before any step, exact resume, the slow path, non-finite gradients."""

import copy
import math
import warnings

import pytest
import torch

import bread_kernels
from bread_kernels import Role
from bread_kernels.patch import patched_state
from tests import model_zoo as models
from tests.model_zoo import BUILDERS, batch, loss_of

from .reference_bcd import ReferenceBCD, block_prefixes


def make(model, **kwargs):
    kwargs.setdefault("verbose", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
                                            list(model.named_parameters()), **kwargs)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sgd_mode="some"), ValueError, "unknown sgd_mode 'some'; use one of disabled, all, partial"),
        (dict(switch_mode="zigzag"), ValueError, "unknown switch_mode 'zigzag'"),
        (dict(lora_mode="most"), ValueError, "unknown lora_mode 'most'"),
        (dict(block_prefix_list=[["model.layers.0."], ["decoder.blocks.9."]]), ValueError,
         "block prefix 'decoder.blocks.9.' matches no parameter name"),
        (dict(active_modules=["nothing_here"]), ValueError, "active_modules entry 'nothing_here' matches no"),
        (dict(switch_mode="fixed"), ValueError, "needs start_block|say which with start_block"),
        (dict(start_block=9), ValueError, "start_block=9 is outside the 4 blocks"),
        (dict(switch_block_every=0), ValueError, "switch_block_every must be a positive int"),
        (dict(init_avgsq_scale=1.0), NotImplementedError, "init_avgsq_scale is not implemented"),
        (dict(sgd_mode="all", sgd_lr_scaling=float("nan")), ValueError, "sgd_lr_scaling must be a finite number >= 0"),
        (dict(sgd_mode="all", sgd_lr_scaling=float("inf")), ValueError, "sgd_lr_scaling must be a finite number"),
        (dict(sgd_mode="all", sgd_lr_scaling=-0.5), ValueError, "sgd_lr_scaling must be a finite number >= 0"),
        (dict(sgd_lr_scaling="1"), ValueError, "sgd_lr_scaling must be a finite number"),
        (dict(rounding="up"), ValueError, "unknown rounding 'up'"),
        (dict(seed=-1), ValueError, "seed must be an int >= 0"),
        (dict(sgd_use_sign="yes"), TypeError, "sgd_use_sign must be True or False"),
        (dict(log_fn=3), TypeError, "log_fn must be None or a callable"),
        (dict(lr_warmup_step_afterswitch=2.5), ValueError, "lr_warmup_step_afterswitch must be None or a positive"),
        (dict(active_modules="model.norm"), TypeError, "active_modules must be a list of name prefixes"),
        # no peft adapter in the list: the base weights trained silently, as with lora_mode="all"
        (dict(lora_mode="adapter_only"), ValueError, "lora_mode='adapter_only' trains only .* holds none"),
    ],
    ids=["sgd_mode", "switch_mode", "lora_mode", "prefix", "active_modules", "fixed", "start", "every", "avgsq",
         "scale_nan", "scale_inf", "scale_negative", "scale_str", "rounding", "seed", "sign", "log_fn", "warmup",
         "active_modules_str", "adapter_only_without_adapters"],
)
def test_bad_arguments_are_refused_before_any_step(kwargs, error, match):
    model = bread_kernels.patch(BUILDERS["llama"]())
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        make(model, **kwargs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert patched_state(model).driver is None


def test_a_numpy_sgd_lr_scaling_is_a_number():
    """``np.float32(0.5)`` (a sweep's value) was refused as 'must be a finite number >= 0'."""
    import numpy as np

    opt = make(bread_kernels.patch(BUILDERS["llama"]()), sgd_mode="all", sgd_lr_scaling=np.float32(0.5))
    assert opt.update.scale == 0.5 and type(opt.update.scale) is float


def test_parameters_not_from_the_patched_model_are_refused():
    model = bread_kernels.patch(BUILDERS["llama"]())
    other = BUILDERS["llama"](seed=1)
    mixed = list(model.named_parameters())[:-1] + [("lm_head.weight", other.lm_head.weight)]
    with pytest.raises(ValueError, match="'lm_head.weight' is not a parameter of the LlamaForCausalLM"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters()), mixed, verbose=0)
    renamed = [("x." + n, p) for n, p in model.named_parameters()]
    with pytest.raises(ValueError, match="named 'x.model.embed_tokens.weight' is 'model.embed_tokens.weight'"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters()), renamed, verbose=0)
    wrapped = models.with_lora(model)  # patched before peft wrapped it: the message says the order that works
    with pytest.raises(ValueError, match=r"unpatch\(wrapper\), then patch\(wrapper\)"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(wrapped.parameters()), list(wrapped.named_parameters()),
                                     verbose=0)
    with pytest.raises(TypeError, match="list of \\(name, parameter\\) pairs"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.parameters()), verbose=0)


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_a_tied_weight_listed_under_both_names_is_refused(patched):
    """``named_parameters(remove_duplicate=False)`` lists GPT-2's tied embedding and head twice: unpatched it was
    taken, and the tied weight's two hooks and two roles trained it otherwise than the list with it once (patched, the
    refusal named a wrapper instead)."""
    model = BUILDERS["gpt2"]()
    if patched:
        bread_kernels.patch(model)
    named = list(model.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match="'transformer.wte.weight' and 'lm_head.weight' are one tensor"):
        make_from(model, named)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def make_from(model, named):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), named, verbose=0,
                                            sgd_mode="all")


def test_unpatched_model_takes_the_slow_path_and_says_so():
    import bread_kernels.optim.block_optimizer as bo

    bo._warned_slow_path = False
    model = BUILDERS["llama"]()
    with pytest.warns(UserWarning, match="not patched.*slow path"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()), verbose=0)


def _two_forwards_one_backward(model, step):
    a, b = batch(2 * step), batch(2 * step + 1)
    (loss_of(model, a) + 0.5 * loss_of(model, b)).backward()


@pytest.mark.parametrize("sgd_mode, sign", [("partial", False), ("partial", True), ("all", False), ("all", True)],
                         ids=["sgd-partial", "sign-partial", "sgd-all", "sign-all"])
def test_two_forwards_summed_into_one_backward_take_one_update_on_the_summed_gradient(sgd_mode, sign):
    """Two forwards, one backward of their summed losses (an auxiliary loss, two batches, chosen and rejected run
    apart): each on-the-fly weight (every linear fused: ``hook_update_numel=0``; the head in the fused loss; the
    embedding) takes one update for the summed gradient after every dX, as the reference's hook does after
    autograd sums it — not one per forward (a sign step each, dX from an updated weight, or autograd's error on
    the embedding's weight).  Reference: autograd's gradients of the summed loss, then each parameter's role's
    rule."""
    model = BUILDERS["llama"]()
    reference = copy.deepcopy(model)
    model = bread_kernels.patch(model, hook_update_numel=0)
    lr, scaling = 0.05, 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=lr), list(model.named_parameters()),
                                           switch_mode="ascending", switch_block_every=1, sgd_mode=sgd_mode,
                                           sgd_use_sign=sign, sgd_lr_scaling=scaling, verbose=0)
    for step in range(2):  # a block switch between
        roles = dict(opt.roles)
        assert any(r in (Role.SGD, Role.SIGN) for r in roles.values())
        _two_forwards_one_backward(model, step)
        opt.step()
        opt.zero_grad()
        reference.zero_grad()
        _two_forwards_one_backward(reference, step)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if roles[n] is Role.ACTIVE:
                    p -= lr * p.grad
                elif roles[n] in (Role.SGD, Role.SIGN):
                    p -= lr * scaling * (p.grad.sign() if roles[n] is Role.SIGN else p.grad)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    opt.close()


def test_an_on_the_fly_head_by_vocabulary_tiles_refuses_two_forwards_in_one_backward(monkeypatch):
    """The head whose dW does not fit the loss's budget is updated by vocabulary tiles, from one forward's logits:
    two forwards summed into one backward are refused, by the head's backward, which runs first — nothing is
    written; a backward per forward still trains."""
    from bread_kernels.functions import head_loss

    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * 97 * 4))
    tiled = []
    by_tiles = head_loss._update_by_tiles
    monkeypatch.setattr(head_loss, "_update_by_tiles", lambda *args: tiled.append(1) or by_tiles(*args))
    model = bread_kernels.patch(BUILDERS["llama"](), keep_top=0)  # no kept block: the loss's budget alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           list(model.named_parameters()), sgd_mode="all", verbose=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="vocabulary tiles.*one forward"):
        _two_forwards_one_backward(model, 0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not tiled
    opt.zero_grad()
    loss_of(model, batch(0)).backward()
    opt.step()
    assert tiled and not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    opt.close()


def _sgd_block_optimizer(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                            list(model.named_parameters()), verbose=0, **kwargs)


STALE = "forward ran before an earlier backward updated the model's inactive weights on the fly"


@pytest.mark.parametrize("sgd_mode, sign, retain", [("all", False, False), ("partial", True, False),
                                                    ("all", False, True)],
                         ids=["sgd-all", "sign-partial", "retain_graph"])
def test_a_backward_through_a_graph_older_than_an_on_the_fly_write_is_refused_before_anything_is_written(
        sgd_mode, sign, retain):
    """Two forwards, then their two backwards (or a second backward of one graph kept with ``retain_graph``): the
    first backward writes the inactive weights in place, which the second graph saved as its forward used them.
    The second is refused with a message that names the remedy, before any node of its graph runs: every weight
    and every gradient as the first backward left them (without the guard, autograd's in-place error where a fused
    function unpacked a written weight, or no error at all on the partial sign path).  The training goes on exactly as a run that never took the second
    forward: the reference, the same optimizer fed only the first."""
    def run(refused_second):
        model = bread_kernels.patch(BUILDERS["llama"](), hook_update_numel=1 << 17)  # the norms on the hook path
        opt = _sgd_block_optimizer(model, sgd_mode=sgd_mode, sgd_use_sign=sign, switch_block_every=1,
                                   start_block=1, switch_mode="fixed")
        first = loss_of(model, batch(0))
        second = first if retain else loss_of(model, batch(1)) if refused_second else None
        first.backward(retain_graph=retain)
        if refused_second:
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            assert grads  # the active block's
            with pytest.raises(RuntimeError, match=STALE + ".*add the losses and call backward once"):
                second.backward()
            assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
            assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
            assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        loss_of(model, batch(2)).backward()  # a forward after the write trains
        opt.step()
        assert opt.skipped_updates == 0
        opt.close()
        return model

    reference, trained = run(False), run(True)
    for (n, p), (_, q) in zip(reference.named_parameters(), trained.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("build, outputs", [
    ("llama", dict(output_hidden_states=True)),
    ("llama", dict(output_attentions=True)),
    ("qwen3_moe", dict(output_router_logits=True)),  # the load-balancing loss's way in
], ids=["hidden_states", "attentions", "router_logits"])
def test_outputs_a_backward_reaches_after_writing_pass_the_guard_of_their_forward(build, outputs):
    """Intermediate outputs (hidden states, attention weights, router logits) are reached partway through the
    backward, after the layers above them have been written: they pass with the forward's first output, which the
    backward reached before anything (before, such a forward's one backward was refused, the head already written).
    The run equals the one without those outputs (the same loss), or for the router logits trains; a second backward
    of the graph is still refused."""
    builder = models.MOE_BUILDERS[build] if build in models.MOE_BUILDERS else BUILDERS[build]

    def run(**extra):
        model = bread_kernels.patch(builder())
        opt = _sgd_block_optimizer(model, sgd_mode="all", switch_block_every=1)
        for step in range(2):
            ids = batch(step)
            loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward(retain_graph=step == 1 and bool(extra))
            opt.step()
            opt.zero_grad()
        if extra:
            with pytest.raises(RuntimeError, match=STALE):
                loss.backward()
        opt.close()
        return model

    trained = run(**outputs)
    if "output_router_logits" in outputs:
        assert not all(torch.equal(p, q) for p, q in zip(trained.parameters(), builder().parameters()))
        return
    for (n, p), (_, q) in zip(run().named_parameters(), trained.named_parameters()):
        assert torch.equal(p, q), n


def _head_on_hidden_states_loss(model, step, fused_loss):
    """The head called on the forward's last hidden states for a metric (with grad on, never backwarded), and a loss
    of the head called again on them (twice: a multi-token or an early-exit head's way) while the forward's own
    logits are held, unread, through the backward; or with ``fused_loss``, the forward's own loss (the fused loss's,
    patched) beside the metric's head call."""
    ids = batch(step)
    out = model(input_ids=ids, output_hidden_states=True, **(dict(labels=ids) if fused_loss else {}))
    hidden = out.hidden_states[-1]
    metric_logits = model.lm_head(hidden)
    if fused_loss:
        loss = out.loss
    else:
        loss = model.lm_head(hidden[:, :5]).logsumexp(-1).mean() + model.lm_head(hidden[:, 5:]).pow(2).mean()
    loss.backward()
    return out, metric_logits


@pytest.mark.parametrize("sgd_mode, sign, fused_loss", [("all", False, False), ("partial", True, False),
                                                        ("all", False, True)],
                         ids=["sgd-all", "sign-partial", "fused-loss"])
def test_a_head_use_the_loss_never_reads_holds_back_no_update(sgd_mode, sign, fused_loss):
    """A forward's use of an on-the-fly weight whose output the backward never reaches (the model's logits, a
    metric's head call, both held through the backward) contributes no gradient, as autograd gives the reference's
    hook none from it.  Before, the head's update waited for that use's backward, which never came, and the next
    forward dropped it as abandoned (the head never trained, with a warning of a dropped graph); the fused loss
    refused the metric's call as a second use of the head.  The head's write before the backward reaches the hidden
    states is this backward's own, which the stale-graph guard lets through.  Reference: the same optimizer on the
    unpatched model."""
    base = BUILDERS["llama"]()

    def run(model):
        opt = _sgd_block_optimizer(model, sgd_mode=sgd_mode, sgd_use_sign=sign, switch_block_every=2)
        for step in range(3):
            _head_on_hidden_states_loss(model, step, fused_loss)
            opt.step()
            opt.zero_grad()
        assert opt.skipped_updates == 0
        opt.close()
        return model

    reference = run(copy.deepcopy(base))
    trained = run(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0))
    assert not torch.equal(reference.lm_head.weight, base.lm_head.weight)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)


def test_graphs_kept_without_a_backward_and_backwards_without_on_the_fly_writes_are_not_refused():
    """What the guard leaves alone: BAdam (nothing written inside the backward) runs two forwards then two
    backwards as plain autograd does (the active block's gradients summed: the reference is autograd's over both
    losses); a graph of BREAD-SGD kept without a backward (a logged loss) holds back no later forward's
    backward."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    reference = copy.deepcopy(bread_kernels.unpatch(copy.deepcopy(model)))
    opt = _sgd_block_optimizer(model, sgd_mode="disabled", switch_block_every=1, start_block=1,
                               switch_mode="fixed")
    first, second = loss_of(model, batch(0)), loss_of(model, batch(1))
    first.backward()
    second.backward()
    (loss_of(reference, batch(0)) + loss_of(reference, batch(1))).backward()
    active = [n for n, p in model.named_parameters() if p.grad is not None]
    assert active and all(n.startswith("model.layers.1.") for n in active)
    grads = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-6, msg=n)
    opt.close()

    model = bread_kernels.patch(BUILDERS["llama"]())
    opt = _sgd_block_optimizer(model, sgd_mode="all", switch_block_every=1)
    logged = loss_of(model, batch(0))  # kept, never backwarded
    embedding = model.model.embed_tokens.weight
    for step in range(1, 3):
        before = embedding.detach().clone()
        loss_of(model, batch(step)).backward()
        assert not torch.equal(embedding, before)  # written on the fly
        opt.step()
        opt.zero_grad()
    assert logged.requires_grad
    opt.close()


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_a_step_spends_the_active_blocks_gradients_whatever_zero_grad_reaches(patched):
    """A base optimizer built over some parameters only (peft's ``AdamW(p for p in model.parameters() if
    p.requires_grad)``), with no ``zero_grad()`` between steps at all: each step drops the active block's gradients,
    as the reference's does, so the next step's are its own batch's, not a running sum.  Reference: plain SGD by
    autograd on the active block (the last, descending, for all three steps)."""
    model = BUILDERS["llama"]()
    reference = copy.deepcopy(model)
    if patched:
        model = bread_kernels.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.lm_head.parameters(), lr=0.1),
                                           list(model.named_parameters()), switch_block_every=10, verbose=0)
    prefix = "model.layers.3."
    active = [p for n, p in model.named_parameters() if n.startswith(prefix)]
    for step in range(3):
        loss_of(model, batch(step)).backward()
        opt.step()  # no zero_grad: the step itself leaves no gradient behind
        assert all(p.grad is None for p in active)
        reference.zero_grad()
        loss_of(reference, batch(step)).backward()
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if n.startswith(prefix):
                    p -= 0.1 * p.grad
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if n.startswith(prefix):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    opt.close()


@pytest.mark.parametrize("sgd_mode", ["disabled", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_resumes_a_run_exactly(sgd_mode, dtype):
    """Train 3 steps, save, train 4 more; versus: train 3, save, load into a fresh copy, train 4.  The block
    order (random), the step, the master weights and Adam's state all come back, so the results are identical."""
    base = BUILDERS["llama"](dtype=dtype)
    torch.manual_seed(3)
    model = bread_kernels.patch(copy.deepcopy(base))
    opt = make(model, switch_block_every=2, switch_mode="random", sgd_mode=sgd_mode)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 4, start=3)

    torch.manual_seed(99)  # a different RNG state: the saved order must not depend on it
    resumed = bread_kernels.patch(copy.deepcopy(base))
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed, switch_block_every=2, switch_mode="random", sgd_mode=sgd_mode)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 4, start=3)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert opt2.order.current == opt.order.current and opt2.global_step == opt.global_step == 7


def test_a_resume_draws_the_stochastic_rounding_bits_of_the_run_it_resumes():
    """bf16 BREAD-SGD rounds stochastically from ``(seed, draw)``.  The state saved the draw counter but not the
    seed, so a run built with ``seed=3`` and resumed by an optimizer built the way the README shows (no seed) went
    on with seed 0's bits: not the run it resumed, and silently.  The seed is part of the state."""
    base = BUILDERS["llama"](dtype=torch.bfloat16)
    model = bread_kernels.patch(copy.deepcopy(base))
    opt = make(model, switch_block_every=2, sgd_mode="all", seed=3)
    train(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 2, start=2)

    resumed = bread_kernels.patch(copy.deepcopy(base))
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed, switch_block_every=2, sgd_mode="all")
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 2, start=2)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert opt2.update.seed == 3


@pytest.mark.parametrize("hook_update_numel", [0, 1 << 20], ids=["fused", "hooked"])
def test_non_finite_gradient_skips_the_updates_and_is_reported_once_per_step(hook_update_numel):
    """Fused updates, or every block linear's update in the driver's hook (patch's hook_update_numel)."""
    model = bread_kernels.patch(BUILDERS["llama"](), hook_update_numel=hook_update_numel)
    opt = make(model, sgd_mode="all", switch_block_every=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = loss_of(model, batch(0)) * math.nan
    loss.backward()
    with pytest.warns(RuntimeWarning,
                      match=r"skipped \d+ on-the-fly update\(s\): \d+ because its gradient is not finite") as record:
        opt.step()
    assert len([w for w in record if "on-the-fly" in str(w.message)]) == 1
    inactive = [n for n in before if opt.roles[n] is not bread_kernels.Role.ACTIVE]
    for name in inactive:
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert opt.skipped_updates >= len(inactive) - 1


def test_tied_embedding_and_head_under_sign_sgd_take_the_sign_of_the_summed_gradient():
    """GPT-2 ties wte and lm_head: the one parameter gets -lr·s·sign(dW_head + dW_embedding) (invariant 2)."""
    model = bread_kernels.patch(BUILDERS["gpt2"]())
    assert model.lm_head.weight is model.transformer.wte.weight
    plain = copy.deepcopy(model)
    bread_kernels.unpatch(plain)
    opt = make(model, sgd_mode="all", sgd_use_sign=True, sgd_lr_scaling=0.5, switch_mode="fixed", start_block=0)
    ids = batch(0)
    loss_of(plain, ids).backward()
    lr = opt.param_groups[0]["lr"]
    expected = plain.transformer.wte.weight.detach() - lr * 0.5 * plain.transformer.wte.weight.grad.sign()
    loss_of(model, ids).backward()
    torch.testing.assert_close(model.transformer.wte.weight.detach(), expected, rtol=0, atol=1e-7)


def test_works_as_the_optimizer_of_a_hugging_face_trainer(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Ids(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = batch(i, shape=(13,))
            return {"input_ids": ids, "labels": ids}

    model = bread_kernels.patch(BUILDERS["llama"]())
    opt = make(model, switch_block_every=2, sgd_mode="partial")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Ids(), optimizers=(opt, scheduler)).train()
    assert opt.global_step == 4 and opt.order.current == 1  # descending from block 3, switched twice
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in changed if n.startswith("model.layers.3.")} and {n for n in changed if n.startswith("model.layers.2.")}
    assert not {n for n in changed if n.startswith("model.layers.0.")}
    assert patched_state(model).stream.cut == 1


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
def test_a_graph_kept_without_backward_does_not_hold_back_later_updates(recompute):
    """A loss kept alive without a backward (logging, a metric forward with grad on) belongs to its own forward: the
    next steps' on-the-fly updates still apply, and nothing is reported skipped."""
    base = BUILDERS["llama"]()
    models = [bread_kernels.patch(copy.deepcopy(base), recompute=recompute) for _ in range(2)]
    opts = [make(m, sgd_mode="all", switch_mode="fixed", start_block=1) for m in models]
    stale = loss_of(models[0], batch(99))
    train(models[0], opts[0], 2)
    train(models[1], opts[1], 2)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    assert opts[0].skipped_updates == 0
    del stale


# -- lifetime: hooks keep their handles, hold the optimizer weakly, and are removed ------------------------------
VARIANTS = {"badam": {}, "sgd_all": dict(sgd_mode="all"), "sgd_partial": dict(sgd_mode="partial"),
            "sign": dict(sgd_mode="all", sgd_use_sign=True), "bread": dict(lora_mode="all", sgd_mode="partial")}


def _hook_count(model) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


def _variant_model(variant, patched=True):
    from tests.model_zoo import with_lora

    model = BUILDERS["llama"]()
    if variant == "bread":
        model = with_lora(model, r=4)
    return bread_kernels.patch(model) if patched else model


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "slow_path"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_optimizer_and_blocks_are_collected_after_del(variant, patched):
    import gc
    import weakref

    model = _variant_model(variant, patched)
    opt = make(model, switch_block_every=1, **VARIANTS[variant])
    train(model, opt, 2)
    blocks = patched_state(model).blocks if patched else None
    refs = [weakref.ref(model), weakref.ref(opt)] + ([weakref.ref(b) for b in blocks] if patched else [])
    del model, opt, blocks
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_an_optimizer_or_driver_still_held_does_not_keep_the_dropped_model(closed):
    """A LisaCallback the user keeps holds its driver, a library optimizer that its own hooks leak holds its
    acceleration's: either kept the whole model, its weights and its patch alive (a torch optimizer keeps only the
    parameters), closed or not."""
    import gc
    import weakref

    from bread_kernels.optim.driver import EngineDriver
    from bread_kernels.patch import patched_models

    for build in (lambda m: make(m, switch_block_every=1, sgd_mode="all"),
                  lambda m: EngineDriver(list(m.named_parameters()))):
        model = bread_kernels.patch(BUILDERS["llama"]())
        held = build(model)
        if isinstance(held, bread_kernels.BlockOptimizer):
            train(model, held, 2)
        if closed:
            held.close()
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None, type(held).__name__
        assert patched_models() == []  # and its patch (the rotary dispatcher with it) went with it
        held.close()


def test_a_driver_whose_patched_model_was_freed_says_so_instead_of_writing_no_plans():
    """Held weakly, a model dropped while its parts are kept (``lm.model`` trained on) left the driver writing
    neither plans nor the cut: stale roles, and a backward that never reached the new active block."""
    import gc

    from bread_kernels.optim.driver import EngineDriver

    model = bread_kernels.patch(BUILDERS["llama"]())
    driver = EngineDriver(list(model.named_parameters()))
    body = model.model  # noqa: F841 - the parts a user kept
    names = list(driver.names)
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="the patched model it drives was freed .* keep a reference to the whole"):
        driver.set_roles({name: Role.FROZEN for name in names})
    driver.close()


def test_each_patched_model_of_a_class_reuses_its_installed_forwards_class():
    """One class (one code object, for torch.compile's cache) per function and module class: the causal LM's
    forward, built afresh at each patch, took a new class every time, kept for the process."""
    classes = set()
    for _ in range(3):
        model = bread_kernels.patch(BUILDERS["llama"]())
        classes.add((type(model.forward), type(model.model.norm.forward)))
        bread_kernels.unpatch(model)
    assert len(classes) == 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_close_removes_every_hook_and_plan_and_step_then_raises(variant):
    model = _variant_model(variant)
    hooks = _hook_count(model)
    opt = make(model, **VARIANTS[variant])
    assert _hook_count(model) == hooks + len(list(model.parameters()))
    train(model, opt, 1)
    opt.close()
    opt.close()  # idempotent
    state = patched_state(model)
    assert _hook_count(model) == hooks
    assert state.driver is None and state.cut == 0
    assert all(getattr(m, "_bread_weight_plan") is None for _, m in state.fused_modules)
    with pytest.raises(RuntimeError, match="this optimizer was closed"):
        opt.step()
    loss_of(model, batch(5)).backward()  # the model trains with plain autograd again


def test_a_dropped_optimizer_removes_its_hooks_and_plans():
    import gc

    model = _variant_model("sgd_all")
    hooks = _hook_count(model)
    make(model, sgd_mode="all")  # not kept
    gc.collect()
    assert _hook_count(model) == hooks
    assert all(getattr(m, "_bread_weight_plan") is None for _, m in patched_state(model).fused_modules)


def test_a_second_optimizer_over_the_same_parameters_takes_them_over():
    model = _variant_model("sgd_all")
    hooks = _hook_count(model)
    first = make(model, sgd_mode="all")
    with pytest.warns(RuntimeWarning, match="belonged to a live BlockOptimizer.*it was closed"):
        second = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                              list(model.named_parameters()), verbose=0)
    assert first.closed and not second.closed
    assert _hook_count(model) == hooks + len(list(model.parameters()))  # one set of hooks: the second's
    assert patched_state(model).driver is second
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    # the second trains as if it were the only one: the same result as a fresh optimizer on a copy
    twin = _variant_model("sgd_all")
    twin.load_state_dict(model.state_dict())
    only = make(twin)
    train(model, second, 2)
    train(twin, only, 2)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_prefix_list=[["model.layers.0."], ["nothing."]]), "block prefix 'nothing.' matches no parameter"),
    (dict(active_modules=["nothing"]), "active_modules entry 'nothing' matches no parameter"),
    (dict(start_block=9), "start_block=9 is outside the 4 blocks"),
    (dict(switch_mode="fixed"), "say which with start_block"),
    (dict(block_prefix_list=[[], ["model.layers.0."]]), r"block 0: the block \[\] has no trainable parameter"),
], ids=["prefix", "active_modules", "start_block", "fixed", "empty_block"])
def test_a_second_optimizer_refused_for_its_blocks_leaves_the_first_one_driving(kwargs, match):
    """A re-run cell with a typo in the blocks is refused before the live optimizer over the same parameters is
    closed: the first one keeps its hooks and plans and trains on as if the refused one had never been built."""
    model, twin = _variant_model("sgd_all"), _variant_model("sgd_all")
    first, only = make(model, sgd_mode="all", switch_block_every=2), make(twin, sgd_mode="all", switch_block_every=2)
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match=match):
        make(model, sgd_mode="all", **kwargs)
    assert not first.closed and patched_state(model).driver is first
    assert _hook_count(model) == hooks
    train(model, first, 3)
    train(twin, only, 3)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("sign", [False, True], ids=["sgd", "sign"])
@pytest.mark.parametrize("patch", [False, True], ids=["unpatched", "patched"])
def test_a_gradient_probe_with_autograd_grad_moves_no_weight(patch, sign):
    """``torch.autograd.grad`` between steps (a gradient-norm probe, a penalty's gradient) fills no ``.grad``, so
    the reference's hooks fire for no weight: no inactive weight moves — fused (every update fused here) or hooked —
    and the run then trains exactly as one without the probe."""
    def run(probe):
        model = models.llama()
        if patch:
            model = bread_kernels.patch(model)
        opt = make(model, sgd_mode="all", sgd_use_sign=sign, switch_block_every=2)
        for step in range(3):
            if probe:
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                active = [p for p in model.parameters() if p.requires_grad]
                grads = torch.autograd.grad(loss_of(model, batch(step)), active)
                assert all(g is not None for g in grads)
                moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
                assert not moved, moved
            loss_of(model, batch(step)).backward()
            opt.step()
            opt.zero_grad()
        return model.state_dict()

    probed, plain = run(True), run(False)
    for name in plain:
        assert torch.equal(probed[name], plain[name]), name


def test_a_resumed_run_keeps_the_blocks_the_run_it_resumes_kept():
    """keep_top="auto" keeps an unmeasured top block in the first forward after new plans, and none once measured
    where the loss's budget is small; the fused loss chunks (and rounds the bf16 head's dW) by what is kept.  A
    resumed run started unmeasured: 11-26 tensors differed from the uninterrupted run (bf16 BREAD-SGD)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()

    def build():
        model = bread_kernels.patch(copy.deepcopy(base))
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2),
                                           list(model.named_parameters()), switch_block_every=4, sgd_mode="all",
                                           verbose=0)
        return model, opt

    def steps(model, opt, start, stop):
        kept = []
        for step in range(start, stop):
            ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            kept.append(patched_state(model).stream.kept)
            opt.step()
            opt.zero_grad()
        return kept

    model, opt = build()
    assert steps(model, opt, 0, 3) == [1, 0, 0]  # the case: the first step after new plans keeps another count
    interrupted, opt2 = build()
    steps(interrupted, opt2, 0, 1)
    saved = copy.deepcopy({"model": interrupted.state_dict(), "opt": opt2.state_dict()})
    resumed, opt3 = build()
    resumed.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    assert steps(resumed, opt3, 1, 3) == [0, 0]
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_state_saved_with_other_blocks_is_refused_with_nothing_changed():
    """An IndexError from deep inside, and an optimizer left half-loaded (its order outside its blocks, the saved
    counters, no base state), when the resumed run forgot include_embedding / n_layer_per_block."""
    def run(**kwargs):
        model = bread_kernels.patch(BUILDERS["llama"]())
        return model, make(model, switch_block_every=2, **kwargs)

    model, opt = run(include_embedding=True, include_lm_head=True)
    train(model, opt, 3)
    saved_with_more_blocks = opt.state_dict()
    model, opt = run(n_layer_per_block=2)
    train(model, opt, 3)
    saved_with_pairs = opt.state_dict()
    model, opt = run()
    train(model, opt, 3)
    saved_plain = opt.state_dict()  # its indices fit an optimizer with the embedding first: each a block lower
    without_blocks = {k: v for k, v in saved_with_more_blocks.items() if k != "blocks"}  # a state saved before them
    broken = copy.deepcopy(saved_plain)  # another base optimizer's groups: fails in the middle of the load
    broken["base_optimizer"]["param_groups"].append(copy.deepcopy(broken["base_optimizer"]["param_groups"][0]))
    other = "are not this optimizer's"
    for saved, kwargs, match in ((saved_with_more_blocks, {}, other), (saved_with_pairs, {"include_embedding": True},
                                                                      other),
                                 (saved_plain, {"include_embedding": True}, other),
                                 (without_blocks, {}, "block order .* does not fit"), (broken, {}, "does not fit")):
        model, opt = run(**kwargs)
        train(model, opt, 1)
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(saved)
        after = opt.state_dict()
        assert after["order"] == before["order"] and after["global_step"] == before["global_step"] == 1
        assert after["block_step"] == before["block_step"]
        assert str(after["base_optimizer"]) == str(before["base_optimizer"])
        train(model, opt, 1, start=1)  # and it trains on


def _refused_and_trains_on_as_untouched(saved: dict, build, match: str) -> None:
    """``build()`` -> (model, optimizer), trained one step.  Loading ``saved`` into one is refused with ``match``
    and leaves it as a twin that never tried: one more step of each gives the same parameters, bit for bit."""
    model, opt = build()
    twin, twin_opt = build()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    train(model, opt, 1, start=1)
    train(twin, twin_opt, 1, start=1)
    for (name, a), (_, b) in zip(twin.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_state_saved_from_another_model_or_base_optimizer_is_refused_at_the_load_with_nothing_changed():
    """A fp32 state saved from a model of other sizes (the same parameter names) loaded without a word, and the next
    step failed inside AdamW ("The size of tensor a (32) must match ..."); an AdamW state loaded into an optimizer over
    SGD with momentum failed at the step with KeyError 'momentum'."""
    import transformers

    def narrow():
        config = transformers.LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=40,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).train()

    def build(base_optimizer=None, make_model=BUILDERS["llama"]):
        model = bread_kernels.patch(make_model())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = (base_optimizer or torch.optim.AdamW)(model.parameters(), lr=1e-2)
            opt = bread_kernels.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=2, verbose=0)
        train(model, opt, 1)
        return model, opt

    model, opt = build(make_model=narrow)
    train(model, opt, 2, start=1)
    _refused_and_trains_on_as_untouched(opt.state_dict(), build,
                                        r"model.embed_tokens.weight is \[97, 32\], this model's is \[97, 64\]")
    model, opt = build()
    train(model, opt, 2, start=1)
    _refused_and_trains_on_as_untouched(
        opt.state_dict(), lambda: build(lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)),
        "the saved run's variant \\(base_optimizer='AdamW'.* is not this optimizer's \\(base_optimizer='SGD'")
    # the same keys in its groups, another state: Adam's loaded into Adamax failed at the step with KeyError 'exp_inf'
    model, opt = build(torch.optim.Adam)
    train(model, opt, 2, start=1)
    _refused_and_trains_on_as_untouched(opt.state_dict(), lambda: build(torch.optim.Adamax),
                                        "the saved run's variant \\(base_optimizer='Adam'.* is not this optimizer's")


@pytest.mark.parametrize("saved_with, loaded_with", [(dict(sgd_mode="all"), dict()),
                                                     (dict(), dict(sgd_mode="partial")),
                                                     (dict(sgd_mode="all"), dict(sgd_mode="all", sgd_use_sign=True))],
                         ids=["bread-sgd_into_badam", "badam_into_partial", "sgd_into_sign"])
def test_a_state_saved_by_another_variant_is_refused_with_nothing_changed(saved_with, loaded_with):
    """A BREAD-SGD state loaded into a BAdam optimizer (or the other way, or SGD into sign) was taken without a word:
    the run went on as another algorithm than the one saved."""
    def build(**kwargs):
        model = bread_kernels.patch(BUILDERS["llama"]())
        opt = make(model, switch_block_every=2, **kwargs)
        train(model, opt, 1)
        return model, opt

    model, opt = build(**saved_with)
    _refused_and_trains_on_as_untouched(opt.state_dict(), lambda: build(**loaded_with),
                                        "the saved run's variant .* is not this optimizer's")


def test_a_badam_state_resumes_whatever_its_unused_sign_flag():
    """sgd_use_sign means nothing where nothing is updated on the fly (sgd_mode="disabled"): a BAdam run saved with
    it set resumes into one without, exactly as into its twin."""
    def build(**kwargs):
        model = bread_kernels.patch(BUILDERS["llama"]())
        opt = make(model, switch_block_every=2, **kwargs)
        train(model, opt, 1)
        return model, opt

    _, saved = build(sgd_use_sign=True)
    state = copy.deepcopy(saved.state_dict())
    resumed = [build(sgd_use_sign=flag) for flag in (True, False)]
    for model, opt in resumed:
        opt.load_state_dict(copy.deepcopy(state))
        train(model, opt, 2, start=1)
    for (name, p), (_, q) in zip(resumed[0][0].named_parameters(), resumed[1][0].named_parameters()):
        assert torch.equal(p, q), name


def test_an_optimizer_does_not_pickle_or_copy_and_says_what_to_save():
    """torch.save(opt) wrote an object without the block order, the base optimizer's state or the masters, whose
    first step after torch.load failed with AttributeError '_closed'; copy.deepcopy(opt) failed with AttributeError
    'order'."""
    import io
    import pickle

    model = bread_kernels.patch(BUILDERS["llama"]())
    opt = make(model, switch_block_every=2, sgd_mode="all")
    train(model, opt, 1)
    for what in (lambda: torch.save(opt, io.BytesIO()), lambda: pickle.dumps(opt), lambda: copy.deepcopy(opt)):
        with pytest.raises(TypeError, match=r"BlockOptimizer does not pickle or copy.*state_dict\(\)"):
            what()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # what to save instead
    train(model, opt, 1, start=1)  # and the optimizer trains on


#: Microsoft BlockOptimizers' ``BlockOptimizer.__init__`` arguments after ``named_parameters_list``, in its order
REFERENCE_POSITIONAL = ("block_prefix_list", "switch_block_every", "start_block", "switch_mode", "active_modules",
                        "include_embedding", "include_lm_head", "verbose", "lora_mode", "n_layer_per_block",
                        "lr_warmup_step_afterswitch", "sgd_mode", "sgd_lr_scaling", "sgd_use_sign")


def test_a_positional_call_written_for_the_reference_means_what_it_means_there():
    """The first release's log_fn and init_avgsq_scale stood between these: a full positional call for the
    reference got sgd_mode=True refused, and a shorter one took its lora_mode for log_fn."""
    values = dict(block_prefix_list=None, switch_block_every=3, start_block=1, switch_mode="ascending",
                  active_modules=["model.norm"], include_embedding=False, include_lm_head=False, verbose=0,
                  lora_mode="partial", n_layer_per_block=2, lr_warmup_step_afterswitch=4, sgd_mode="partial",
                  sgd_lr_scaling=2.5, sgd_use_sign=True)
    model = bread_kernels.patch(BUILDERS["llama"]())
    positional = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                              list(model.named_parameters()),
                                              *(values[name] for name in REFERENCE_POSITIONAL))
    for name in ("switch_block_every", "switch_mode", "verbose", "lora_mode", "lr_warmup_step_afterswitch",
                 "sgd_mode", "sgd_use_sign"):
        assert getattr(positional, name) == values[name], name
    assert positional.update.scale == values["sgd_lr_scaling"]
    assert positional.block_prefix_list == [["model.layers.0.", "model.layers.1."], ["model.layers.2.",
                                                                                     "model.layers.3."]]
    assert positional.order.current == 1
    positional.close()
    with pytest.raises(TypeError, match="positional argument"):  # no init_avgsq_scale or log_fn among them
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters()), list(model.named_parameters()),
                                     *(values[name] for name in REFERENCE_POSITIONAL), False)


def test_unpatched_gpt2_finds_its_embedding_block_as_the_patched_one_does():
    blocks = []
    for patched in (False, True):
        model = BUILDERS["gpt2"]()
        if patched:
            model = bread_kernels.patch(model)
        opt = make(model, include_embedding=True)
        blocks.append(opt.block_prefix_list)
        opt.close()
    assert blocks[0] == blocks[1]
    assert blocks[0][0] == ["transformer.wte."]


def test_a_base_optimizers_state_dict_is_refused_with_the_reason_and_nothing_changed():
    """What the reference's and badam's state_dict() return: the base optimizer's alone."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    opt = make(model, switch_block_every=2)
    train(model, opt, 3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="this is a torch optimizer's state_dict .* resume from a bread_kernels"):
        opt.load_state_dict(opt.base_optimizer.state_dict())
    after = opt.state_dict()
    assert (after["order"], after["global_step"], after["block_step"]) == (before["order"], 3, before["block_step"])
    assert str(after["base_optimizer"]) == str(before["base_optimizer"])


@pytest.mark.parametrize("given", [None, "checkpoint/optimizer.pt"], ids=["none", "path"])
def test_a_state_that_is_no_dict_is_refused_naming_what_to_pass(given):
    """A path (torch.load not called) or None failed with ``argument of type 'NoneType' is not iterable``, or with a
    missing key found by a substring test of the path."""
    model = bread_kernels.patch(BUILDERS["llama"]())
    opt = make(model)
    with pytest.raises(TypeError, match=r"expected the dict BlockOptimizer.state_dict\(\) returned \(torch.load"):
        opt.load_state_dict(given)


def _encoder_decoder(name):
    import transformers

    torch.manual_seed(0)
    if name == "bart":
        config = transformers.BartConfig(
            vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2)
        return transformers.BartForConditionalGeneration(config).train()
    # T5's stacks are encoder.block and decoder.block, which the reference's patterns do not find; the decoder is
    # the larger, the one patch streams
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config).train()


@pytest.mark.parametrize("sgd_mode", ["disabled", "all"])
@pytest.mark.parametrize("name", ["bart", "t5"])
def test_every_block_stack_of_an_encoder_decoder_is_a_block_and_trains_as_unpatched(name, sgd_mode):
    """patch streams one stack (the larger); the optimizer's blocks are still every stack's layers, in parameter
    order — the reference's patterns' where they find them (BART), every stack found structurally where they do
    not (T5) — and each trains as the unpatched model given the same blocks.  (SGD with momentum: Adam would turn
    the rounding noise of BART's key biases, whose gradient is zero in exact arithmetic, into full steps.)"""
    initial = _encoder_decoder(name)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    models, blocks = [], []
    for patched in (True, False):
        model = copy.deepcopy(initial)
        if patched:
            bread_kernels.patch(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = bread_kernels.BlockOptimizer(
                torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), list(model.named_parameters()),
                block_prefix_list=blocks[0] if blocks else None, switch_block_every=1, switch_mode="ascending",
                sgd_mode=sgd_mode, verbose=0)
        if patched:  # the encoder's blocks train through plain autograd and hooks, and the user is told
            assert any("2 of the" in str(w.message) and "lie outside the block stack patch streams" in str(w.message)
                       for w in caught)
        blocks.append(opt.block_prefix_list)
        for _ in range(len(opt.block_prefix_list) + 1):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        models.append(model)
    stacks = {"bart": ("model.encoder.layers", "model.decoder.layers"), "t5": ("encoder.block", "decoder.block")}[name]
    layers = {"bart": (2, 2), "t5": (2, 3)}[name]
    assert blocks[0] == [[f"{stack}.{i}."] for stack, n in zip(stacks, layers) for i in range(n)]
    if name == "bart":
        unpatched = bread_kernels.BlockOptimizer(torch.optim.SGD(initial.parameters(), lr=1e-2),
                                                 list(initial.named_parameters()), verbose=0)
        assert unpatched.block_prefix_list == blocks[0]  # the reference's own partition
        unpatched.close()
    reference = dict(models[1].named_parameters())
    start = dict(initial.named_parameters())
    for n, p in models[0].named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)
        if any(n.startswith(f"{stack}.") for stack in stacks) and "relative_attention_bias" not in n:
            assert not torch.equal(p, start[n]), f"{n} was never trained"


@pytest.mark.parametrize("sgd_mode, sign", [("partial", True), ("all", False)], ids=["sign-partial", "sgd-all"])
@pytest.mark.parametrize("name", list(models.MIXED_STACK_BUILDERS))
def test_a_stack_of_transformers_layers_of_several_classes_is_streamed_and_trains_as_unpatched(name, sgd_mode, sign):
    """Jamba's attention and Mamba layers, Mllama's self- and cross-attention layers: one ModuleList of two layer
    classes.  patch took only a list of one class for a stack, so it found none in Jamba (an error) and streamed
    Mllama's vision tower, its language model training on the slow path; the mixed stack is now the one patch
    streams, and every block trains as the unpatched model (every linear fused: hook_update_numel=0)."""
    initial = models.MIXED_STACK_BUILDERS[name]()
    if name == "mllama":
        loss_fn, stack = models.mllama_loss_of, "model.language_model.layers"
    else:
        loss_fn, stack = (lambda model, step: loss_of(model, batch(step))), "model.layers"
    trained = []
    for patched in (True, False):
        model = copy.deepcopy(initial)
        if patched:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Jamba's dt_proj kept unfused; its conv1d named
                bread_kernels.patch(model, hook_update_numel=0)
            assert patched_state(model).blocks_name == stack
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Mllama's vision layers train outside the streamed stack
            opt = bread_kernels.BlockOptimizer(
                torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), list(model.named_parameters()),
                block_prefix_list=[[f"{stack}.{i}."] for i in range(4)], switch_block_every=1,
                switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign, verbose=0)
        for step in range(3):  # blocks 3, 2 and 1 active: the lowest one's cut leaves block 0 below it
            loss_fn(model, step).backward()
            opt.step()
            opt.zero_grad()
        trained.append(model)
    reference = dict(trained[1].named_parameters())
    for n, p in trained[0].named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)
    keys = list(initial.state_dict())
    bread_kernels.unpatch(trained[0])
    assert list(trained[0].state_dict()) == keys


@pytest.mark.parametrize("sgd_mode, sign", [("all", False), ("partial", True)], ids=["sgd-all", "sign-partial"])
def test_a_vision_tower_trained_alone_gets_its_blocks_where_the_patterns_find_no_layer(sgd_mode, sign):
    """Qwen2-VL's vision layers are ``model.visual.blocks`` (the reference's patterns find ``layers``/``h``), and
    patch streams its language model.  Training the vision tower alone (the language model frozen and left out of
    the optimizer's list) on the patched model, the default blocks came from the patterns, which found no layer,
    and the optimizer refused, saying to patch the model — which was patched.  Now the stacks found structurally
    serve, as where the patterns miss the patched stack: one block per vision layer, trained as the unpatched model
    with those blocks given."""
    initial = models.qwen2_vl()
    vision = [[f"model.visual.blocks.{i}."] for i in range(2)]
    trained = []
    for patched in (True, False):
        model = copy.deepcopy(initial)
        if patched:
            bread_kernels.patch(model, hook_update_numel=0)
        listed = [(n, p) for n, p in model.named_parameters() if n.startswith("model.visual.")]
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("model.visual."))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the vision layers train outside the streamed stack
            opt = bread_kernels.BlockOptimizer(
                torch.optim.SGD([p for _, p in listed], lr=1e-2, momentum=0.9), listed,
                block_prefix_list=None if patched else vision, switch_block_every=1, switch_mode="descending",
                sgd_mode=sgd_mode, sgd_use_sign=sign, verbose=0)
        assert opt.block_prefix_list == vision
        for step in range(3):
            models.qwen2_vl_loss_of(model, step).backward()
            opt.step()
            opt.zero_grad()
        trained.append(model)
    reference, start = dict(trained[1].named_parameters()), dict(initial.named_parameters())
    for n, p in trained[0].named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)
        if n.startswith("model.visual.blocks.") or not n.startswith("model.visual."):  # trained, or left out
            assert torch.equal(p, start[n]) != n.startswith("model.visual."), n


def test_a_patched_wrapper_without_get_input_embeddings_finds_the_embedding_block_as_unpatched():
    import transformers
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=2)
            self.backbone = transformers.LlamaModel(config)
            self.head = nn.Linear(32, 4)

        def forward(self, ids):
            return self.head(self.backbone(input_ids=ids).last_hidden_state[:, -1])

    blocks = []
    for patched in (False, True):
        model = Classifier()
        if patched:
            bread_kernels.patch(model)
        opt = make(model, include_embedding=True, include_lm_head=True)
        blocks.append(opt.block_prefix_list)
        opt.close()
    assert blocks[0] == blocks[1]
    assert blocks[0][0] == ["backbone.embed_tokens."]


def test_adapter_only_leaves_out_the_inferred_blocks_without_adapters():
    """LoRA on the decoder alone: the default blocks are every stack's layers, and adapter_only would train nothing
    in the encoder's, so those are left out (a warning says so) and the decoder's adapters train."""
    import peft

    model = bread_kernels.patch(peft.get_peft_model(
        _encoder_decoder("bart"), peft.LoraConfig(r=4, target_modules=r".*decoder.*\.(q_proj|v_proj)")))
    with pytest.warns(UserWarning, match="adapter_only' leaves out the 2 blocks that hold no LoRA adapter"):
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2),
                                           list(model.named_parameters()), lora_mode="adapter_only", verbose=0)
    assert opt.block_prefix_list == [[f"base_model.model.model.decoder.layers.{i}."] for i in range(2)]
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.close()



def _sgd_all_optimizer(model):
    """BREAD-SGD over plain SGD (Adam would turn a rounding difference in a near-zero gradient into a whole step:
    see ADAM_EPS in test_equivalence)."""
    return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                        sgd_mode="all", switch_block_every=2, verbose=0)


def test_an_assign_load_after_the_optimizer_was_built_is_refused_before_anything_changes():
    """``load_state_dict(sd, assign=True)`` puts new parameters in the model while the optimizer, its hooks and plans
    hold the old ones: BREAD-SGD silently stopped training (a 2-layer Llama under AdamW: 19 of 21 parameters
    unchanged after two steps, the inactive ones only gathering ``.grad``).  The next forward with grad and the next step refuse it, before anything
    is written; a forward without grad (evaluating the loaded weights) runs; an optimizer built after the load
    trains the loaded parameters."""
    model = bread_kernels.patch(models.llama(layers=2), fused_loss=False)
    opt = _sgd_all_optimizer(model)
    saved = models.llama(seed=1, layers=2).state_dict()
    loss_of(model, batch(0)).backward()  # a backward before the load: its step is refused too
    model.load_state_dict(saved, assign=True)
    with torch.no_grad():
        loss_of(model, batch(1))
    with pytest.raises(RuntimeError, match=r"model.embed_tokens.weight is no longer the tensor .* Refused before "
                                           r"this step changed anything. Build the optimizer .* after the load, or "
                                           r"load without assign=True"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"assign=True.* Refused before this forward changed anything"):
        loss_of(model, batch(1))
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert opt.global_step == 0 and not opt.base_optimizer.state
    opt.close()
    fresh = _sgd_all_optimizer(model)
    loss_of(model, batch(1)).backward()
    fresh.step()
    assert len(models.moved_parameters(models.llama(seed=1, layers=2), model)) == len(list(model.parameters()))


def test_a_load_without_assign_keeps_training_as_the_reference():
    """``load_state_dict(sd)`` copies into the parameters the optimizer holds: training goes on as an unpatched
    model given the same load, trained by the plain-autograd reference."""
    saved = models.llama(seed=1, layers=2).state_dict()
    reference, engine = models.llama(layers=2), bread_kernels.patch(models.llama(layers=2), fused_loss=False)
    opt = _sgd_all_optimizer(engine)
    engine.load_state_dict(saved)
    reference.load_state_dict(saved)
    layers, embedding = models.layout(reference)
    expected = ReferenceBCD(reference, block_prefixes([n for n, _ in reference.named_parameters()], layers, embedding),
                            loss_fn=loss_of, optimizer_cls=torch.optim.SGD, optimizer_kwargs=dict(lr=0.1),
                            sgd_mode="all", switch_block_every=2)
    assert opt.block_prefix_list == expected.blocks
    for ids in models.batches(3):
        expected.step(ids)
        loss_of(engine, ids).backward()
        opt.step()
        opt.zero_grad()
    assert len(models.moved_parameters(models.llama(seed=1, layers=2), engine)) == len(list(engine.parameters()))
    models.assert_same_parameters(reference, engine)


def _sgd_all_on(model):
    """``_sgd_all_optimizer``, quietly on the slow path (an unpatched model), whose warning is tested above."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*slow path.*")
        return _sgd_all_optimizer(model)


def test_an_assign_load_on_the_slow_path_is_refused_at_the_step():
    """The slow path knows no model, so the identity probes of a patched model's check had nothing to probe:
    ``load_state_dict(sd, assign=True)`` after the optimizer was built trained nothing, silently (BAdam and BREAD-SGD
    on a 2-layer Llama: 0 of 21 parameters moved in two steps).  torch's parameter-registration hook, through which the
    load sets each parameter anew, now tells the optimizer; its step is refused with nothing changed, and an optimizer
    built after the load trains the loaded parameters."""
    model = models.llama(layers=2)
    opt = _sgd_all_on(model)
    saved = models.llama(seed=1, layers=2).state_dict()
    model.load_state_dict(saved, assign=True)
    loss_of(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"model.embed_tokens.weight is no longer the tensor .* Refused before "
                                           r"this step changed anything. Build the optimizer .* after the load, or "
                                           r"load without assign=True"):
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert opt.global_step == 0 and not opt.base_optimizer.state
    opt.close()
    model.zero_grad(set_to_none=True)
    fresh = _sgd_all_on(model)
    loss_of(model, batch(1)).backward()
    fresh.step()
    assert len(models.moved_parameters(models.llama(seed=1, layers=2), model)) == len(list(model.parameters()))


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "slow_path"])
def test_a_parameter_set_anew_outside_the_probed_sample_is_refused_before_anything_is_written(patched):
    """``model.model.norm.weight = nn.Parameter(...)`` after the optimizer was built: the final norm (none of the
    parameters a patched model's check samples) silently stopped training while the rest trained on.  Refused before
    any write: by a patched model's next forward with grad, on the slow path at the backward's first on-the-fly update
    (the hooks' writes); with the optimizer's own parameter put back, training goes on as the reference's."""
    model = models.llama(layers=2)
    reference = copy.deepcopy(model)
    if patched:
        bread_kernels.patch(model, fused_loss=False)
    opt = _sgd_all_on(model)
    norm = model.model.norm
    held = norm.weight
    norm.weight = torch.nn.Parameter(held.detach().clone())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"model.norm.weight is no longer the tensor .* Refused before this "
                                           r"(forward|backward's on-the-fly updates) changed anything"):
        loss_of(model, batch(0)).backward()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    model.zero_grad(set_to_none=True)
    norm.weight = held
    models.assert_sgd_all_trains_as_the_reference(reference, model, opt, steps=2)


@pytest.mark.parametrize("images", [False, True], ids=["text-batches", "image-batches"])
def test_a_step_whose_batch_never_reached_the_active_block_says_so(images):
    """Qwen2-VL's vision layer 0 as the active block under BREAD-SGD: a text-only batch never reaches it, so only
    the on-the-fly updates train and the step leaves the block as it is — as the unpatched model's (the reference's
    slow path) — and says so, naming the block; image batches reach it and nothing is said."""
    initial = models.qwen2_vl()
    blocks = [["model.visual.blocks.0."], ["model.language_model.layers.0."], ["model.language_model.layers.1."]]
    trained = []
    for patched in (True, False):
        model = copy.deepcopy(initial)
        if patched:
            bread_kernels.patch(model, hook_update_numel=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the slow path of the unpatched model; the vision tower's hook path
            opt = bread_kernels.BlockOptimizer(
                torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                block_prefix_list=blocks, switch_block_every=5, switch_mode="ascending", sgd_mode="all", verbose=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                inputs = models.qwen2_vl_inputs(step, images=images)
                model(**inputs, labels=inputs["input_ids"].masked_fill(
                    inputs["input_ids"] >= models.QWEN2_VL_IMAGE, -100)).loss.backward()
                opt.step()
                opt.zero_grad()
        said = [str(w.message) for w in caught if "has a gradient at this step" in str(w.message)]
        assert len(said) == (0 if images else 2), said
        assert all("['model.visual.blocks.0.']" in message for message in said)
        trained.append(model)
    reference, start = dict(trained[1].named_parameters()), dict(initial.named_parameters())
    for n, p in trained[0].named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)
        if n.startswith("model.visual.blocks.0."):
            assert torch.equal(p, start[n]) != images, n


@pytest.mark.parametrize("sgd_mode, name", [("disabled", "model.layers.1.mlp.up_proj.weight"),
                                            ("all", "model.layers.0.self_attn.k_proj.weight"),
                                            ("partial", "model.layers.0.input_layernorm.weight")],
                         ids=["badam_active", "sgd_inactive", "partial_below_the_cut"])
def test_a_partial_functional_call_swap_with_grad_is_refused_before_anything_is_written(sgd_mode, name):
    """``torch.func.functional_call(model, {name: w}, ...)`` with grad (a MAML inner step) on a patched model: the
    blocks are recomputed in the backward after functional_call has put the model's own parameters back, so every
    gradient and on-the-fly update of a block holding ``w`` came from weights the forward never used (2-layer
    Llama: the active block's .grad, the SGD steps of layer 0 and the embedding all differed from the unpatched
    model's), and below the cut ``w`` got no gradient.  Refused at the forward, nothing written; under
    ``torch.no_grad()``, and with the model's own parameters, it runs as the unpatched model does."""
    reference = models.llama(layers=2)
    model = bread_kernels.patch(copy.deepcopy(reference), fused_loss=False)
    opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                       sgd_mode=sgd_mode, verbose=0)
    ids = batch(0)
    swapped = (model.get_parameter(name).detach() + 0.01).requires_grad_(True)
    before = {n: value.clone() for n, value in model.state_dict().items()}

    def loss(w):
        return torch.func.functional_call(model, {name: w}, (), dict(input_ids=ids, labels=ids)).loss

    with pytest.raises(RuntimeError, match=r"functional_call .* in place of " + name.replace(".", r"\.") +
                       r".* Refused before this forward changed anything. Run functional_call under "
                       r"torch.no_grad\(\) .*copy.deepcopy\(model\)"):
        loss(swapped).backward()
    with pytest.raises(RuntimeError, match=r"in place of " + name.replace(".", r"\.")):
        torch.func.grad(loss)(swapped.detach())
    for n, value in model.state_dict().items():
        assert torch.equal(value, before[n]), n
    assert swapped.grad is None and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        got = torch.func.functional_call(model, {name: swapped}, (ids,)).logits
        expected = torch.func.functional_call(reference, {name: swapped}, (ids,)).logits
    torch.testing.assert_close(got, expected)
    own = torch.func.functional_call(model, dict(model.named_parameters()), (), dict(input_ids=ids, labels=ids))
    torch.testing.assert_close(own.loss, loss_of(reference, ids))
    own.loss.backward()
    opt.step()


@pytest.mark.parametrize("sgd_mode", ["disabled", "all"])
def test_a_functional_call_swap_with_grad_on_a_copy_no_optimizer_drives_gives_the_unpatched_gradients(sgd_mode):
    """The remedy the refusal above names: ``torch.func.functional_call`` with grad and tensors of the caller's in
    place of some parameters, on a deep copy of the driven model (no optimizer drives it).  The copy's blocks were
    recomputed in the backward after functional_call had put the copy's own parameters back: where BAdam had left a
    block's parameters frozen the recompute saved other tensors than the forward (``CheckpointError``), elsewhere
    the gradients of the embedding, a norm and a projection came from weights the forward never used.  The loss and
    every gradient are the unpatched copy's."""
    model = bread_kernels.patch(models.llama(layers=3), keep_top=0)
    opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                                       sgd_mode=sgd_mode, verbose=0)
    loss_of(model, batch(0)).backward()
    opt.step()
    opt.zero_grad()
    copied = copy.deepcopy(model)
    reference = bread_kernels.unpatch(copy.deepcopy(model))
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.2.self_attn.q_proj.weight"]
    ids, results = batch(1), []
    for run in (reference, copied):
        swapped = {n: (run.get_parameter(n).detach() + 0.3).requires_grad_(True) for n in names}
        loss = torch.func.functional_call(run, swapped, (), dict(input_ids=ids, labels=ids)).loss
        loss.backward()
        results.append((loss.detach(), {n: w.grad for n, w in swapped.items()},
                        {n: p.grad for n, p in run.named_parameters()}))
    (expected_loss, expected, expected_own), (loss, got, got_own) = results
    torch.testing.assert_close(loss, expected_loss)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    for n, grad in expected_own.items():
        assert (got_own[n] is None) == (grad is None), n
        if grad is not None:
            torch.testing.assert_close(got_own[n], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_a_functional_call_swap_of_a_parameter_the_optimizer_leaves_out_is_refused_too():
    """An optimizer over some of a patched model's parameters (here: all but the norms), and
    ``torch.func.functional_call`` with grad swapping a norm weight of the active block: the block's recompute read
    the model's own norm weight, so the active block's gradients and the swapped tensor's were off by up to half
    their size, and nothing was refused (only the optimizer's parameters were probed).  Refused before anything is
    written, as a swap of one of the optimizer's parameters is."""
    model = bread_kernels.patch(models.llama(layers=3))
    named = [(n, p) for n, p in model.named_parameters() if "norm" not in n]
    opt = bread_kernels.BlockOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), named, sgd_mode="disabled",
                                       switch_mode="ascending", verbose=0)
    name = "model.layers.0.post_attention_layernorm.weight"
    swapped = (model.get_parameter(name).detach() + 0.3).requires_grad_(True)
    ids = batch(0)
    with pytest.raises(RuntimeError, match=r"in place of " + name.replace(".", r"\.") +
                       r".* Refused before this forward changed anything"):
        torch.func.functional_call(model, {name: swapped}, (), dict(input_ids=ids, labels=ids))
    assert swapped.grad is None and all(p.grad is None for p in model.parameters())
    opt.close()
