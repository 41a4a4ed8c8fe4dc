"""``torch.compile`` on a patched model trains to the eager engine's parameters.

Each block and each fused Function is a graph break (``torch.compiler.disable``): the blocks run eagerly under the
streaming backward, and dynamo compiles what lies between them (the embedding lookup's surroundings, the final
norm, the loss).  ``aot_eager`` runs the same aten ops as eager, so it must match bit for bit; inductor fuses the
loss and the norms into its own kernels, which round differently in the last bits.
"""

import contextlib
import copy
import warnings

import pytest
import torch

import bread_kernels
from tests import model_zoo as models

STEPS = 3


def _block_optimizer(model, **settings):
    """The tests' BlockOptimizer over ``model`` (AdamW, lr 1e-3; ``settings``: its other arguments), its warnings
    (a tiny model's unfused weights) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                            list(model.named_parameters()), verbose=0, **settings)


def train(model, compile_backend, arguments):
    bread_kernels.patch(model)
    opt = _block_optimizer(model, switch_block_every=2, switch_mode="descending", **arguments)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    losses = []
    for step in range(STEPS):
        ids = models.batch(step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    opt.close()
    return dict(model.named_parameters()), losses


VARIANTS = {
    "badam": (dict(sgd_mode="disabled"), False),
    "bread-sgd": (dict(sgd_mode="all"), False),
    "bread": (dict(lora_mode="all"), True),
}


def build(lora: bool):
    model = models.llama()
    return models.with_lora(model) if lora else model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_compiled_patched_model_trains_like_the_eager_engine(variant):
    torch._dynamo.reset()
    arguments, lora = VARIANTS[variant]
    eager, eager_losses = train(build(lora), None, arguments)
    compiled, compiled_losses = train(build(lora), "aot_eager", arguments)
    assert compiled_losses == eager_losses
    for name, p in eager.items():
        assert torch.equal(compiled[name], p), name


def test_inductor_trains_like_the_eager_engine_within_rounding():
    torch._dynamo.reset()
    arguments, _ = VARIANTS["bread-sgd"]
    eager, eager_losses = train(build(False), None, arguments)
    compiled, compiled_losses = train(build(False), "inductor", arguments)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, p in eager.items():
        torch.testing.assert_close(compiled[name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_patched_model_is_freed_when_dropped():
    """No cache of dynamo's keeps a compiled patched model alive: its modules are collected once it is dropped (the
    streamed blocks' forwards hold their originals in a closure: dynamo keeps a traced function's keyword defaults
    in a cache keyed weakly by the function, which a default reaching the block would keep alive), and with them
    goes the rotary dispatcher in transformers' module."""
    import gc
    import weakref

    from transformers.models.llama import modeling_llama

    from bread_kernels.functions.rotary import RotaryDispatch

    torch._dynamo.reset()
    gc.collect()  # models the tests before dropped in reference cycles
    before = modeling_llama.apply_rotary_pos_emb  # transformers' function, unless a live model elsewhere uses ours
    model = build(False)
    modules = [weakref.ref(m) for m in model.modules()]
    train(model, "aot_eager", VARIANTS["bread-sgd"][0])
    assert isinstance(modeling_llama.apply_rotary_pos_emb, RotaryDispatch)  # the model used the fused embedding
    del model
    gc.collect()
    assert not [r() for r in modules if r() is not None]
    assert modeling_llama.apply_rotary_pos_emb is before


def _sgd_plan():
    from bread_kernels.plan import OnTheFlyUpdate, Role, WeightPlan

    return WeightPlan(Role.SGD, OnTheFlyUpdate(lr=1e-2))


def _linear_call(x, weight, lora):
    """One SGD-updated linear call: the plain fused linear, or the LoRA one on frozen-base adapters ``lora``."""
    from bread_kernels.functions.linear import fused_linear
    from bread_kernels.functions.lora import fused_lora_linear

    plan = _sgd_plan()
    if lora is None:
        return lambda h: fused_linear(h, weight, None, plan).square().sum()
    a, b = lora
    return lambda h: fused_lora_linear(h, None, weight, None, a, b, 2.0, plan).square().sum()


@pytest.mark.parametrize("lora", [False, True], ids=["linear", "lora"])
def test_a_fused_linear_called_under_compile_breaks_the_graph_and_updates_as_in_eager(lora):
    """The fused linears are a graph break under ``torch.compile`` (dynamo runs the Function eagerly, outside its
    graph): the same output and the same SGD update of the weight as in eager; in eager they do not pass through
    ``torch.compiler.disable``'s wrapper (a few µs of host time a call)."""
    import sys

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen)
    weight = torch.randn(3, 7, generator=gen)
    adapters = (torch.randn(2, 7, generator=gen).requires_grad_(), torch.randn(3, 2, generator=gen).requires_grad_()) \
        if lora else None
    results = []
    for compiled in (False, True):
        w = weight.clone()
        pair = tuple(t.detach().clone().requires_grad_() for t in adapters) if lora else None
        fn = _linear_call(x, w, pair)
        if compiled:
            fn = torch.compile(fn, backend="eager")
        h = x.clone().requires_grad_()
        frames = []
        sys.setprofile(lambda frame, event, arg: frames.append(frame.f_code.co_filename) if event == "call" else None)
        try:
            loss = fn(h)
        finally:
            sys.setprofile(None)
        if not compiled:
            assert not [f for f in frames if "_dynamo" in f], "an eager fused call went through dynamo's wrapper"
        loss.backward()
        results.append((loss.detach(), w, h.grad, *(t.grad for t in pair or ())))
    # dynamo skips the fused call (it runs eagerly, before the graph) and traces what follows it
    graphs = torch._dynamo.explain(_linear_call(x, weight.clone(), adapters))(x.clone().requires_grad_()).graphs
    assert graphs and all("square" in g.code and "linear" not in g.code for g in graphs), [g.code for g in graphs]
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert not torch.equal(results[0][1], weight)  # the update happened


def test_under_compiled_autograd_a_fused_backward_runs_eagerly_and_updates_as_in_eager():
    """Compiled autograd traces the backward with dynamo; a fused function's backward stops the trace where it asks
    whether the backward accumulates (``plan.backward_accumulates`` raises under tracing) and runs eagerly, so every
    step makes the eager engine's update (traced, the answer was fixed into the graph and no update was written)."""
    from torch._dynamo import compiled_autograd

    from bread_kernels import OnTheFlyUpdate, Role, WeightPlan
    from bread_kernels.functions.linear import fused_linear
    from bread_kernels.plan import begin_forward

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    weight0 = torch.randn(4, 4, generator=gen)
    inputs = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    results = []
    for compiled in (False, True):
        weight, plan = weight0.clone(), WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1))
        steps = []
        for x in inputs:
            before = weight.clone()
            begin_forward()
            loss = fused_linear(x.clone().requires_grad_(), weight, None, plan).square().sum()
            with compiled_autograd._enable(torch.compile(backend="eager")) if compiled else contextlib.nullcontext():
                loss.backward()
            steps.append(weight - before)
        results.append(steps)
        assert not plan._pending and not plan._uses
    for eager, compiled in zip(*results):
        assert eager.abs().max() > 0
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compiled_autograd_over_a_whole_patched_model_trains_as_eager():
    """Compiled autograd over the backward of a patched 2-layer Llama under BREAD-SGD (embedding, blocks, fused
    head+loss, hook-path norms): the parameters after a step are the eager engine's, bit for bit (by hand also 3
    steps with a switch at each on 4 layers, for BREAD-SGD, partial, partial sign and BAdam).  Its graph sums the
    gradients that reach the backward trigger, which every fused function returned as None: ``add(): argument
    'input' must be Tensor, not NoneType`` (``plan.trigger_gradient`` gives a zero there, reading compiled
    autograd's private running flag, checked here)."""
    from torch._dynamo import compiled_autograd

    assert isinstance(getattr(compiled_autograd, "in_compiled_autograd_region", None), bool)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = bread_kernels.patch(models.llama(layers=2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                               list(model.named_parameters()), switch_block_every=1, verbose=0,
                                               sgd_mode="all")
            for step in range(1):  # the failure came in the first backward; each backward compiles for ~20 s
                ids = models.batch(step)
                loss = model(input_ids=ids, labels=ids).loss
                with compiled_autograd._enable(torch.compile(backend="eager")) if compiled else \
                        contextlib.nullcontext():
                    loss.backward()
                opt.step()
                opt.zero_grad()
        opt.close()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    eager, compiled = results
    from bread_kernels.plan import BACKWARD_TRIGGER

    assert BACKWARD_TRIGGER.grad is not None and BACKWARD_TRIGGER.grad.item() == 0.0  # the zeros it was given
    BACKWARD_TRIGGER.grad = None
    assert any(not torch.equal(eager[n], p) for n, p in models.llama(layers=2).named_parameters())
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_a_training_loop_with_evaluations_stays_within_dynamos_recompile_limit():
    """dynamo caches a frame's graphs by its code object, at most ``recompile_limit`` (8) of them.  Every forward
    ``patch`` installs (norms, blocks, embedding, the causal LM) shared one ``__call__``: this loop (sequence lengths
    that vary, an evaluation under no_grad every other step) hit the limit there, and from then on ran eagerly."""
    torch._dynamo.reset()
    model = bread_kernels.patch(models.with_lora(models.llama()))
    opt = _block_optimizer(model, switch_block_every=1)
    forward = torch.compile(model, backend="aot_eager")
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a hit raises instead of running eagerly
        for step, seq in enumerate((13, 9, 17, 11)):
            model.train()
            ids = models.batch(step, (2, seq))
            forward(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 2:
                model.eval()
                with torch.no_grad():
                    forward(input_ids=ids, labels=ids)
    opt.close()
    codes = {type(m): m.forward.__call__.__code__ for m in model.modules() if "forward" in m.__dict__}
    assert len(set(codes.values())) == len(codes) >= 3  # one per module class, as an unpatched model's forwards


def _logits_loss(forward, ids):
    """A custom loss from the logits of a forward without labels (the causal LM's own forward runs, not the fused
    loss)."""
    logits = forward(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _evaluate_then_train(patched: bool, compile_backend):
    """Each step an evaluation under ``no_grad`` (with labels: the model's own loss), then a training step on a
    loss from the logits; returns the evaluation losses and the trained parameters."""
    model = models.llama(layers=2)
    if patched:
        bread_kernels.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           list(model.named_parameters()), switch_block_every=1, sgd_mode="all",
                                           verbose=0)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    evaluations = []
    for step in range(2):
        with torch.no_grad():
            ids = models.batch(100 + step)
            evaluations.append(forward(input_ids=ids, labels=ids).loss)
        _logits_loss(forward, models.batch(step)).backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return torch.stack(evaluations), {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_compiled_patched_model_evaluates_under_no_grad_and_trains_on_its_logits():
    """A forward that is not the fused loss's (no labels, or no grad: the causal LM's own forward, which breaks the
    graph at its blocks) hit a RecursionError under ``torch.compile``: dynamo resumed the call of the class's forward,
    bound with ``type(self).forward.__get__(self)``, as the instance's ``self.forward`` (the fused-loss forward
    again).  An evaluation under ``no_grad`` before training, and training on a loss from the logits, now give the
    eager engine's results bit for bit, and the unpatched model's within rounding."""
    torch._dynamo.reset()
    reference_evaluations, reference = _evaluate_then_train(False, None)
    eager_evaluations, eager = _evaluate_then_train(True, None)
    compiled_evaluations, compiled = _evaluate_then_train(True, "aot_eager")
    torch.testing.assert_close(compiled_evaluations, eager_evaluations, rtol=0, atol=0)
    torch.testing.assert_close(compiled_evaluations, reference_evaluations)
    assert any(not torch.equal(p, reference[n]) for n, p in models.llama(layers=2).named_parameters())
    for name, p in eager.items():
        torch.testing.assert_close(compiled[name], p, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(compiled[name], reference[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss", ["model", "below-the-model"])
def test_accelerates_regional_compilation_of_a_patched_model_trains_as_the_eager_engine(loss):
    """accelerate's ``compile_regions`` (``use_regional_compilation=True``) shallow-copies the model and compiles
    copies of its blocks, which keep the patched forwards bound to the original modules: it compiles nothing there,
    and BREAD-SGD trains to the eager engine's parameters bit for bit, through the copy's full forward or a loss
    that calls the copy's ``model.model(...)`` and ``lm_head`` apart (the README's claim)."""
    from accelerate.utils import compile_regions

    def run(regional: bool):
        torch._dynamo.reset()
        model = bread_kernels.patch(models.llama(layers=3))
        opt = _block_optimizer(model, switch_block_every=2, sgd_mode="all")
        forward = compile_regions(model, backend="aot_eager") if regional else model
        losses = []
        for step in range(STEPS):
            ids = models.batch(step)
            if loss == "model":
                value = forward(input_ids=ids, labels=ids).loss
            else:
                hidden = forward.model(input_ids=ids).last_hidden_state
                logits = forward.lm_head(hidden[:, :-1]).float()
                value = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                          ids[:, 1:].reshape(-1))
            value.backward()
            opt.step()
            opt.zero_grad()
            losses.append(value.item())
        opt.close()
        return dict(model.named_parameters()), losses

    eager, eager_losses = run(False)
    regional, regional_losses = run(True)
    assert regional_losses == eager_losses
    for name, p in eager.items():
        assert torch.equal(regional[name], p), name
    initial = dict(models.llama(layers=3).named_parameters())
    unmoved = [n for n, p in eager.items() if "layers." in n and torch.equal(p, initial[n])]
    assert not unmoved, f"SGD on every inactive layer left these untouched: {unmoved}"


def test_a_loss_below_the_regionally_compiled_copy_is_a_forward_of_the_patched_model():
    """The copy ``compile_regions`` makes shares the model's hooks; a forward of its ``model.model`` is one of the
    patched model's, with the per-forward hooks: here the refusal of an fp16 forward whose on-the-fly SGD updates
    would take a loss scaler's factor (none was given), before the backward writes anything.  (The copy's
    ``model.model`` was not known as an entry of the model: the forward ran none of them, and trained silently.)"""
    from accelerate.utils import compile_regions

    torch._dynamo.reset()
    model = bread_kernels.patch(models.llama(layers=2))
    opt = _block_optimizer(model, switch_block_every=2, sgd_mode="all")
    regional = compile_regions(model, backend="aot_eager")
    assert regional.model is not model.model  # a copy, sharing the hooks
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="no loss scaler was given"):
        regional.model(input_ids=models.batch(0))
    opt.close()


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


class _Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss


def _bread_sgd_step(model, opt, step):
    ids = models.batch(step)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _trains_as_a_twin_run_without(capture) -> None:
    """A patched 3-layer Llama trained three BREAD-SGD steps, ``capture(model, ids)`` called in eval mode after the
    first (``ids``: one batch of 11 tokens), ends bit for bit where a twin run without the capture does."""
    runs = []
    for captured in (True, False):
        model = bread_kernels.patch(models.llama(layers=3))
        opt = _block_optimizer(model, switch_block_every=1, switch_mode="descending", sgd_mode="all")
        _bread_sgd_step(model, opt, 0)
        if captured:
            model.eval()
            capture(model, models.batch(7, shape=(1, 11)))
            model.train()
        for step in (1, 2):
            _bread_sgd_step(model, opt, step)
        opt.close()
        runs.append(dict(model.named_parameters()))
    for name, p in runs[1].items():
        assert torch.equal(runs[0][name], p), name


def test_torch_export_of_a_patched_model_mid_training_gives_its_logits_and_the_training_goes_on():
    """``torch.export.export`` (non-strict, with grad enabled, as it is called) of a patched model whose optimizer
    lives: export swaps fake tensors into the parameters while it traces, which the optimizer's check of the
    parameters it holds would take for a model whose parameters were replaced (``load_state_dict(...,
    assign=True)``), and a loss given labels, which the fused loss would compute, would fail inside it on a
    data-dependent guard (its label check reads the labels on the host).  The exported programs give the eager
    logits and the unpatched model's loss, and the training goes on as in a twin run that exported nothing."""
    def export(model, ids):
        program = torch.export.export(_Logits(model), (ids,))
        with torch.no_grad():
            assert torch.equal(program.module()(ids), model(input_ids=ids).logits)
        model.train()
        unpatched = bread_kernels.unpatch(copy.deepcopy(model))
        assert torch.equal(torch.export.export(_Loss(model), (ids,)).module()(ids), _Loss(unpatched)(ids))

    _trains_as_a_twin_run_without(export)


def test_torch_jit_trace_of_a_driven_patched_model_is_refused_with_grad_and_traces_the_logits_without():
    """``torch.jit.trace`` of a patched model whose optimizer lives, with grad enabled (``model.eval()`` alone, as
    traces are often taken): its graph would run plain autograd with the plans and cut of that step, never the
    engine's updates (and the tracer would fail inside the first fused function on the backward trigger, a constant
    that requires grad).  It is refused, before anything runs, naming ``torch.no_grad()``; under
    ``torch.no_grad()`` the traced module gives the unpatched model's logits, and the training goes on as in a twin
    run that traced nothing."""
    def trace(model, ids):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.no_grad\(\)"):
            torch.jit.trace(_Logits(model), (ids,), check_trace=False)
        with torch.no_grad():
            traced = torch.jit.trace(_Logits(model), (ids,), check_trace=False)
            unpatched = bread_kernels.unpatch(copy.deepcopy(model))
            assert torch.equal(traced(ids), unpatched(input_ids=ids).logits)

    _trains_as_a_twin_run_without(trace)
