"""A forward that starts below the patched model: a custom loss from ``model.model(...)`` and the head called apart
(or a peft model's inner model), which runs none of the model's own forward hooks.  The engine's once-per-forward
work (numbering the forward, the stale-graph guard, the DDP check, the loss scale's read) runs there too, once per
forward whichever module is entered first.  References: the same optimizer on the unpatched model (the
reference's hooks, plain autograd), and the full-model path's refusal."""

import copy
import gc
import threading
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import bread_kernels
from bread_kernels.patch import patched_state
from tests import model_zoo as models
from tests.model_zoo import batch, loss_of

STALE = "forward ran before an earlier backward updated the model's inactive weights on the fly"
REMEDY = "add the losses and call backward once"


def _causal_lm(model):
    """The causal LM inside ``model`` (itself, or a peft model's ``base_model.model``)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def loss_below_the_model(model, ids):
    """A custom loss from the decoder and the head called apart: ``model.model(...)``, then ``model.lm_head``."""
    lm = _causal_lm(model)
    hidden = lm.model(input_ids=ids).last_hidden_state
    logits = lm.lm_head(hidden).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _optimizer(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                            list(model.named_parameters()), verbose=0, **kwargs)


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _unchanged(model, snapshot):
    params, grads = snapshot
    now = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return all(torch.equal(p, params[n]) for n, p in model.named_parameters()) and now.keys() == grads.keys() and \
        all(torch.equal(now[n], grads[n]) for n in grads)


MODES = [dict(sgd_mode="all"), dict(sgd_mode="all", sgd_use_sign=True), dict(sgd_mode="partial", sgd_use_sign=True)]
MODE_IDS = ["sgd-all", "sign-all", "sign-partial"]


@pytest.mark.parametrize("modes, peft", [*((m, False) for m in MODES), (MODES[0], True)],
                         ids=[*MODE_IDS, "peft-sgd-all"])
def test_two_forwards_below_the_model_then_their_backwards_are_refused_as_the_models_are(modes, peft):
    """``model.model(...)`` twice, then the two backwards: the first writes the inactive weights in place, which the
    second graph saved.  Before, the second failed with autograd's in-place error at the head (written by the
    first); now it is refused as the full-model path refuses it, naming the remedy, before anything of the model
    is written or accumulated.  Training then goes on exactly as the run that never took the second forward, which
    equals the same optimizer on the unpatched model (plain autograd and the reference's hooks)."""
    base = models.with_lora(models.llama()) if peft else models.llama()
    settings = _settings(modes, peft)
    patched = bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0)
    _train_refusing_a_stale_second_forward(patched, settings, _full_model_loss(peft), True)  # the full model's path
    trained = bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0)
    _train_refusing_a_stale_second_forward(trained, settings, loss_below_the_model, True)
    reference = _train_refusing_a_stale_second_forward(copy.deepcopy(base), settings, loss_below_the_model, False)
    assert models.moved_parameters(base, reference)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)


def _settings(modes: dict, peft: bool) -> dict:
    return dict(switch_block_every=1, start_block=1, switch_mode="fixed", **modes,
                **({"lora_mode": "all"} if peft else {}))


def _full_model_loss(peft: bool):
    return loss_of if not peft else (lambda m, ids: m(input_ids=ids, labels=ids).loss)


def _train_refusing_a_stale_second_forward(model, settings, loss_fn, refused_second, before=None, second_loss=None,
                                           third_loss=None):
    """Two forwards, then their backwards: the second refused (its forward ran before the first's backward wrote),
    with nothing of the model written or accumulated; then a step, a forward and backward, a step.
    ``refused_second`` False: without the second forward (the unpatched reference).  ``before(model)`` runs once the
    optimizer is built; ``second_loss`` and ``third_loss`` compute the second and third forwards' losses (default
    ``loss_fn``).  Returns the model."""
    opt = _optimizer(model, **settings)
    if before is not None:
        before(model)
    first = loss_fn(model, batch(0))
    second = (second_loss or loss_fn)(model, batch(1)) if refused_second else None
    first.backward()
    if refused_second:
        snapshot = _snapshot(model)
        with pytest.raises(RuntimeError, match=f"{STALE}.*{REMEDY}"):
            second.backward()
        assert _unchanged(model, snapshot)
    opt.step()
    opt.zero_grad()
    (third_loss or loss_fn)(model, batch(2)).backward()  # a forward after the write trains
    opt.step()
    assert opt.skipped_updates == 0
    opt.close()
    return model


def _stop_a_forward(model, exception: BaseException) -> None:
    """A forward of the whole model with grad that ``exception`` stops at its second decoder layer: a notebook cell
    interrupted (``KeyboardInterrupt``, after which torch calls no forward hook, ``always_call`` or not), or an error
    there (an out-of-memory, a shape error: torch calls the ``always_call`` hooks)."""
    def stop(module, args):
        raise exception

    handle = _causal_lm(model).model.layers[1].register_forward_pre_hook(stop)
    try:
        with pytest.raises(type(exception)):
            model(input_ids=batch(5), labels=batch(5))
    finally:
        handle.remove()


@pytest.mark.parametrize("exception, peft", [(KeyboardInterrupt, False), (KeyboardInterrupt, True),
                                             (RuntimeError, False)], ids=["interrupt", "peft-interrupt", "error"])
def test_a_forward_stopped_by_an_interrupt_leaves_no_forward_open_for_the_next_one_below_the_model(exception, peft):
    """A forward of the whole model stopped inside a decoder layer, then training from ``model.model(...)`` and the
    head: two forwards and their backwards are refused as always, and training goes on as the unpatched model's.
    Before, a ``KeyboardInterrupt`` left the model's forward open (torch calls no hook after one), so each later
    ``model.model(...)`` counted as nested in it until the next ``opt.step()``: it was neither numbered nor
    guarded, and the second backward failed with autograd's in-place error instead of the refusal."""
    base = models.with_lora(models.llama()) if peft else models.llama()
    settings = _settings(MODES[0], peft)

    def stop(model):
        _stop_a_forward(model, exception("stopped"))

    trained = _train_refusing_a_stale_second_forward(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0),
                                                     settings, loss_below_the_model, True, before=stop)
    reference = _train_refusing_a_stale_second_forward(copy.deepcopy(base), settings, loss_below_the_model, False,
                                                       before=stop)
    assert models.moved_parameters(base, reference)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)


def _with_an_evaluation_in_another_thread(loss_fn, evaluations: list):
    """``loss_fn``, during whose forward (at the second decoder layer) another thread runs a whole forward of the
    model under ``torch.no_grad()`` to its end while the training forward waits (a background evaluation); the
    evaluation's logits go to ``evaluations``."""
    def loss(model, ids):
        training = threading.get_ident()

        def evaluate():
            with torch.no_grad():
                evaluations.append(model(input_ids=batch(99)).logits)

        def meanwhile(module, args):
            if threading.get_ident() == training:
                thread = threading.Thread(target=evaluate)
                thread.start()
                thread.join()

        handle = _causal_lm(model).model.layers[1].register_forward_pre_hook(meanwhile)
        try:
            count = len(evaluations)
            value = loss_fn(model, ids)
        finally:
            handle.remove()
        assert len(evaluations) == count + 1  # the evaluation ran to its end
        return value
    return loss


@pytest.mark.parametrize("entry", ["model", "below"])
def test_an_evaluation_in_another_thread_during_a_training_forward_leaves_that_forward_guarded(entry):
    """A background evaluation (a whole forward under ``torch.no_grad()`` in another thread) in the middle of a
    training forward: the training forward is still one forward, numbered and guarded (two forwards and their
    backwards are refused), training equals the unpatched model's, and the evaluation gives its logits.  Before,
    the forwards of all threads shared one stack: the evaluation, starting at the model, forgot the training
    forward, whose end then ran no hook, so its output went unguarded and the second backward failed with
    autograd's in-place error (through the model's own forward; below it, the head's guard still caught it)."""
    base = models.llama()
    settings = _settings(MODES[0], False)
    loss_fn = loss_of if entry == "model" else loss_below_the_model

    def run(model, refused_second):
        evaluations = []
        meanwhile = _with_an_evaluation_in_another_thread(loss_fn, evaluations)
        _train_refusing_a_stale_second_forward(model, settings, loss_fn, refused_second, second_loss=meanwhile,
                                               third_loss=meanwhile)
        return model, evaluations[-1]  # the third forward's, after the same updates in both runs

    trained, evaluated = run(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0), True)
    reference, expected = run(copy.deepcopy(base), False)
    assert models.moved_parameters(base, reference)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(evaluated, expected, rtol=1e-4, atol=1e-5)


def _a_thread_that_stops_in_a_forward(model, exception: type[BaseException]) -> "weakref.ref[torch.Tensor]":
    """Run a forward of ``model`` with grad in a worker thread that ``exception`` stops inside its second decoder
    layer (``SystemExit``: a stop request raised there, after which torch calls no forward hook; ``RuntimeError``:
    an error, after which torch calls the ``always_call`` hooks) and that then ends, and wait for it; returns a weak
    reference to a tensor the thread's own frame held while its forward ran."""
    held = []

    def work():
        tensor = torch.ones(3)  # the thread's own data (a batch, the outputs it collected)
        held.append(weakref.ref(tensor))
        try:
            model(input_ids=batch(5), labels=batch(5))
        except exception:
            pass  # the worker stops

    def stop(module, args):
        raise exception("stopped")

    handle = _causal_lm(model).model.layers[1].register_forward_pre_hook(stop)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        handle.remove()
    return held[0]


@pytest.mark.parametrize("exception", [SystemExit, RuntimeError])
def test_a_thread_that_ended_in_the_middle_of_a_forward_leaves_nothing_held_and_training_goes_on(exception):
    """A worker thread whose forward a ``SystemExit`` (torch then calls no forward hook) or an error stopped, and
    which then ended: what its frames held is freed with it (as the unpatched model holds nothing of it), training
    in the main thread equals the unpatched model's, and ``del model, opt`` frees the model by reference counting.
    Before, the model kept the dead thread's open forward, with its frames and all they held, for its whole life:
    neither the main thread's forwards nor ``opt.step()`` dropped another thread's entries, and the model, in a
    cycle through them, waited for Python's cycle collector."""
    base = models.llama()
    settings = _settings(MODES[0], False)

    def run(model):
        opt = _optimizer(model, **settings)
        thread_data = _a_thread_that_stops_in_a_forward(model, exception)
        for step in range(2):
            loss_of(model, batch(step)).backward()
            opt.step()
            opt.zero_grad()
        gc.collect()
        assert thread_data() is None
        return model, opt

    reference, _ = run(copy.deepcopy(base))
    trained, opt = run(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0))
    assert models.moved_parameters(base, reference)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)
    gc.collect()
    gc.disable()
    try:
        alive = weakref.ref(trained)
        del trained, opt
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("grad", [True, False], ids=["train", "evaluate"])
def test_a_data_parallel_replica_of_a_patched_model_is_refused_before_it_runs(grad):
    """``nn.DataParallel`` on several devices runs replicas of the model (shallow copies whose hooks and installed
    forwards came along) in threads of their own: the replicas' fused layers are bound to the original modules, so
    they would compute with the first device's weights and write each replica's on-the-fly updates there, and no
    forward of a replica is numbered or guarded.  A replica's forward is refused before anything runs (before, it
    ran silently); the model itself then trains on as the unpatched model."""
    base = models.llama()
    settings = _settings(MODES[0], False)
    model = bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0)

    def replica_refused(model):
        replica = model._replicate_for_data_parallel()  # what DataParallel's replicate() makes of it per device
        before = _snapshot(model)
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="DataParallel.*DistributedDataParallel"):
            replica(input_ids=batch(0), labels=batch(0))
        assert _unchanged(model, before)

    trained = _train_refusing_a_stale_second_forward(model, settings, loss_of, True, before=replica_refused)
    reference = _train_refusing_a_stale_second_forward(copy.deepcopy(base), settings, loss_of, False)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("modes", [MODES[0], MODES[1]], ids=MODE_IDS[:2])
def test_the_head_called_apart_on_a_stale_forwards_hidden_states_is_refused_before_it_writes(modes):
    """Two forwards of ``model.model(...)``, the second's loss (head included) backward, and only then the head
    called on the first's hidden states and that loss's backward: the head's output belongs to the first forward,
    whose graph the writes made stale, so the backward is refused before the head's own backward writes it (the
    head moved, then the refusal came, before); the model and its gradients are as the first backward left them."""
    model = bread_kernels.patch(models.llama(), hook_update_numel=0)
    opt = _optimizer(model, switch_block_every=1, start_block=1, switch_mode="fixed", **modes)
    first = model.model(input_ids=batch(0)).last_hidden_state
    second = model.model(input_ids=batch(1)).last_hidden_state
    _head_loss(model, second, batch(1)).backward()
    before = _snapshot(model)
    loss = _head_loss(model, first, batch(0))
    with pytest.raises(RuntimeError, match=f"{STALE}.*{REMEDY}"):
        loss.backward()
    assert _unchanged(model, before)
    opt.close()


def _head_loss(model, hidden, ids):
    logits = model.lm_head(hidden[:, :-1]).float()  # a view of the forward's output, as losses slice it
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("modes", [MODES[0], MODES[2]], ids=[MODE_IDS[0], MODE_IDS[2]])
def test_accumulated_forwards_below_the_model_train_as_the_unpatched_model_and_a_metric_without_grad_changes_nothing(
        modes):
    """Gradient accumulation from below the model (two forward+backward pairs a step), with a metric's
    ``model.model(...)`` under ``torch.no_grad()`` between a forward and its backward: equal to the same optimizer on
    the unpatched model, and the no-grad calls change nothing (bit for bit the run without them)."""
    base = models.llama()

    def run(model, metric):
        opt = _optimizer(model, switch_block_every=2, **modes)
        for step in range(3):
            for micro in range(2):
                loss = loss_below_the_model(model, batch(10 * step + micro)) / 2
                if metric:
                    with torch.no_grad():
                        _causal_lm(model).model(input_ids=batch(99)).last_hidden_state.sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
        assert opt.skipped_updates == 0
        opt.close()
        return model

    reference = run(copy.deepcopy(base), metric=True)
    trained = run(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0), metric=True)
    quiet = run(bread_kernels.patch(copy.deepcopy(base), hook_update_numel=0), metric=False)
    assert models.moved_parameters(base, reference)
    models.assert_same_parameters(reference, trained, rtol=1e-4, atol=1e-5)
    models.assert_same_parameters(quiet, trained, rtol=0, atol=0)


def test_a_forward_counts_once_whichever_module_it_starts_at():
    """The model's forward calling ``model.model`` is one forward (its hooks run once), as is ``model.model(...)``
    alone, or a peft model's ``base_model(...)`` and its inner decoder's call; a forward that raised leaves none open,
    and one a ``KeyboardInterrupt`` stopped (torch then calls no hook) is dropped at the next forward;
    ``unpatch`` removes every hook, and a copy's forwards run its own state's hooks, not the original's."""
    model = bread_kernels.patch(models.llama())
    state = patched_state(model)
    seen = []
    handle = state.add_forward_hooks(lambda module, args: seen.append(("before", module)),
                                     lambda module, args, output: seen.append(("after", module)))
    ids = batch(0)
    model(input_ids=ids)
    assert seen == [("before", model), ("after", model)]
    seen.clear()
    hidden = model.model(input_ids=ids).last_hidden_state
    model.lm_head(hidden)  # called apart: its output is guarded as the forward's
    assert seen == [("before", model.model), ("after", model.model), ("after", model.lm_head)]
    seen.clear()
    with pytest.raises(Exception):
        model.model(input_ids=ids.float())
    assert state.entered == [] and seen == [("before", model.model), ("after", model.model)]
    seen.clear()
    _stop_a_forward(model, KeyboardInterrupt())  # torch calls no forward hook: the model's forward stays open ...
    assert state.entered == [0, 1] and seen == [("before", model)]
    seen.clear()
    model.model(input_ids=ids)  # ... until the next forward finds its frame gone
    assert state.entered == [] and seen == [("before", model.model), ("after", model.model)]
    seen.clear()
    duplicate = copy.deepcopy(model)
    duplicate.model(input_ids=ids)
    assert seen == []
    bread_kernels.unpatch(duplicate)  # removes the copy's hooks, not the original's
    model.model(input_ids=ids)
    assert seen == [("before", model.model), ("after", model.model)]
    handle.remove()
    bread_kernels.unpatch(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())

    wrapped = bread_kernels.patch(models.with_lora(models.llama()))
    state = patched_state(wrapped)
    state.add_forward_hooks(lambda module, args: seen.append(module))
    for start in (wrapped, wrapped.base_model, wrapped.base_model.model, wrapped.base_model.model.model):
        seen.clear()
        start(input_ids=ids)
        assert seen == [start]
