"""A loss scaler's factor (``torch.amp.GradScaler``) is divided out of the on-the-fly updates: training with the loss
scaled by a power of two gives the parameters of training without it (the scaling and its undoing are exact in
binary floating point, so fp32 agrees to rounding), on the fused path and on the hook path."""

import copy
import warnings

import pytest
import torch

import bread_kernels

from .. import model_zoo as models

LR = 1e-2


def _train(model, steps, scaler=None, patched=True, loss_of=models.loss_of, **bcd):
    """``model`` trained ``steps`` steps by BlockOptimizer (``bcd``: its settings), its loss ``loss_of(model, ids)``
    scaled by ``scaler`` where one is given; returned unpatched."""
    if patched:
        bread_kernels.patch(model)
    opt = _optimizer(model, loss_scaler=scaler, **bcd)
    for step in range(steps):
        _backward_and_step(opt, scaler, loss_of(model, models.batch(step)))
    opt.close()
    return bread_kernels.unpatch(model)


def _optimizer(model, loss_scaler=None, **bcd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpatched model's slow-path warning
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-3, weight_decay=0.0),
                                            list(model.named_parameters()), switch_block_every=2, verbose=0,
                                            loss_scaler=loss_scaler, **bcd)


def _backward_and_step(opt, scaler, loss) -> None:
    """One step's backward and step, the loss scaled by ``scaler`` (None: not scaled), as torch's AMP recipe."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("patched", [True, False], ids=["fused", "hook-path"])
@pytest.mark.parametrize("sign", [False, True], ids=["sgd", "sign"])
def test_a_scaled_loss_trains_as_the_unscaled_one(patched, sign):
    original = models.llama()
    plain = _train(copy.deepcopy(original), 4, patched=patched, sgd_mode="all", sgd_lr_scaling=0.5,
                   sgd_use_sign=sign)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)  # the scale grows mid-run
    scaled = _train(copy.deepcopy(original), 4, scaler=scaler, patched=patched, sgd_mode="all",
                    sgd_lr_scaling=0.5, sgd_use_sign=sign)
    assert scaler.get_scale() > 2.0 ** 12, "the scale never changed: the test would not see a stale read"
    models.assert_same_parameters(plain, scaled, rtol=1e-5, atol=1e-6)


def test_without_undoing_the_scale_the_run_differs():
    """The check above can fail: the same scaled run with the scaler not given to the optimizer moves the
    on-the-fly weights 4096x too far."""
    original = models.llama()
    plain = _train(copy.deepcopy(original), 2, sgd_mode="all", sgd_lr_scaling=0.5)
    model = bread_kernels.patch(copy.deepcopy(original))
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-3, weight_decay=0.0),
                                       list(model.named_parameters()), switch_block_every=2, verbose=0,
                                       sgd_mode="all", sgd_lr_scaling=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for step in range(2):
        scaler.scale(models.loss_of(model, models.batch(step))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), model.parameters()))
    assert diff > 1e-2


@pytest.mark.parametrize("patched", [True, False], ids=["fused", "hook-path"])
def test_a_disabled_scaler_is_no_scale(patched):
    """``GradScaler(enabled=use_amp)`` with ``use_amp`` False (torch's AMP recipe) given as ``loss_scaler``: its
    ``scale()`` and ``step()`` pass through, and the run trains as without it.  (It failed at the optimizer's
    construction with torch's AttributeError: a disabled scaler keeps no scale tensor to read.)"""
    original = models.llama(layers=2)
    plain = _train(copy.deepcopy(original), 2, patched=patched, sgd_mode="all", sgd_lr_scaling=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    disabled = _train(copy.deepcopy(original), 2, scaler=scaler, patched=patched, sgd_mode="all", sgd_lr_scaling=0.5)
    models.assert_same_parameters(plain, disabled, rtol=0, atol=0)


def test_a_scaler_that_is_not_one_is_refused():
    model = bread_kernels.patch(models.llama())
    with pytest.raises(TypeError, match="loss_scaler must be a torch.amp.GradScaler"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                     verbose=0, sgd_mode="all", loss_scaler=2.0 ** 12)


def test_fp16_autocast_overflow_skips_every_update_of_the_step():
    """fp16 autocast with a scale that overflows fp16: GradScaler skips the base step, and every on-the-fly update
    of that backward is skipped (its scaled gradient is not finite) and reported, so no weight moves; once the
    scaler has backed off, the updates run."""
    model = bread_kernels.patch(models.llama())
    before = copy.deepcopy(model)
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                       verbose=0, sgd_mode="all", loss_scaler=None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)
    opt.driver.set_loss_scaler(scaler)

    def step(i):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = models.loss_of(model, models.batch(i))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    with pytest.warns(RuntimeWarning, match="skipped .* on-the-fly update"):
        step(0)
        opt.driver.end_step()
    for (name, a), (_, b) in zip(before.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), f"{name} moved in an overflowed step"
    assert scaler.get_scale() == 2.0 ** 10
    step(1)
    moved = models.moved_parameters(before, model)
    assert len(moved) > len(list(model.parameters())) // 2


def _loss_below_the_model(model, ids):
    """A custom loss that calls the decoder and the head apart (``model.model(...)``, ``model.lm_head``): no
    forward of the patched model itself runs (the engine reads the scale before the decoder's instead)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _loss_from_the_blocks(model, ids):
    """A custom loss that calls the embedding, each block, the norm and the head by hand: no forward of any module
    the engine reads the scale before."""
    decoder = model.model
    hidden = decoder.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = decoder.rotary_emb(hidden, positions)
    for layer in decoder.layers:
        out = layer(hidden, position_embeddings=rotary, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(decoder.norm(hidden)).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("loss_of", [_loss_below_the_model, _loss_from_the_blocks], ids=["decoder", "blocks"])
def test_a_forward_that_starts_below_the_model_divides_out_the_current_scale(loss_of):
    """The scale is read before each forward of the model, wherever it starts (``model.model(...)`` of a custom
    loss too); a loss that calls the blocks by hand runs no such forward, and its on-the-fly updates divided out the
    scale of the first read (the initial scale) while the scaler grew it every step.  The scale is read again
    wherever the scaler changed it."""
    original = models.llama()
    settings = dict(loss_of=loss_of, sgd_mode="all", sgd_lr_scaling=0.5)
    plain = _train(copy.deepcopy(original), 4, **settings)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)  # grows at every step
    scaled = _train(copy.deepcopy(original), 4, scaler, **settings)
    assert scaler.get_scale() == 2.0 ** 16, "the scale never changed: the test would not see a stale read"
    models.assert_same_parameters(plain, scaled, rtol=1e-5, atol=1e-6)


def test_the_scale_is_read_before_the_backward():
    """Reading the scale again where it changed costs no host sync in a backward whose forward read it (the
    model's forward, after the scaler's update), the first step's included (the scaler makes its scale's tensor
    after that read, in scale())."""
    from tests.test_backward_ops import OpCounter

    model = bread_kernels.patch(models.llama())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                       verbose=0, sgd_mode="all", loss_scaler=scaler)
    for step in range(2):
        loss = scaler.scale(models.loss_of(model, models.batch(step)))
        with OpCounter() as counter:
            loss.backward()
        assert counter.syncs == 0, f"step {step}: {counter.counts}"
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    opt.close()


# -- a loss scaler left out under fp16, or given and never used: refused before anything is written ----------------
def _mixed_precision_step(model, opt, scaler, step, dtype=torch.float16, inside_forward=False):
    """One step of a mixed-precision loop: the forward under ``torch.autocast(dtype)`` — around the loss, or, with
    ``inside_forward``, entered inside the model's forward, where accelerate's ``prepare`` (the Trainer's
    ``fp16=True``) puts it, after the forward pre-hooks ran — and the loss scaled by ``scaler`` (None: not scaled)."""
    ids = models.batch(step)
    if inside_forward:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with torch.autocast("cpu", dtype=dtype):
            loss = models.loss_of(model, ids)
    _backward_and_step(opt, scaler, loss)


def _autocast_inside_forward(model, dtype=torch.float16):
    """``model`` whose forward enters ``torch.autocast`` itself, as accelerate's ``prepare_model`` wraps it."""
    model.forward = torch.autocast("cpu", dtype=dtype)(model.forward)
    return model


@pytest.mark.parametrize("inside_forward", [False, True], ids=["autocast-around", "autocast-inside-forward"])
def test_fp16_without_a_loss_scaler_is_refused_before_anything_is_written(inside_forward):
    """fp16 autocast with the loss scaled by a GradScaler the optimizer was not given: the on-the-fly SGD updates
    took the scaled gradient, 65,536 times too large (the weights ~670x their norm away after two steps), silently.
    Refused at the first forward, nothing written; with the scaler given (the remedy) the run trains as the
    unpatched model's hook path does under the same loop."""
    original = models.llama(layers=2)

    def scaled_run(patched):
        model = copy.deepcopy(original)
        if patched:
            bread_kernels.patch(model)
        if inside_forward:
            _autocast_inside_forward(model)
        scaler = torch.amp.GradScaler("cpu")
        return model, _optimizer(model, loss_scaler=None if patched else scaler, sgd_mode="all"), scaler

    reference, ref_opt, ref_scaler = scaled_run(patched=False)
    model, opt, scaler = scaled_run(patched=True)
    with pytest.raises(RuntimeError, match=r"float16.*no loss scaler was given.*loss_scaler=scaler"):
        _mixed_precision_step(model, opt, scaler, 0, inside_forward=inside_forward)
    assert models.moved_parameters(original, model) == [], "a refused forward wrote weights"
    opt.zero_grad(set_to_none=True)
    opt.driver.set_loss_scaler(scaler)
    for step in range(2):
        _mixed_precision_step(reference, ref_opt, ref_scaler, step, inside_forward=inside_forward)
        _mixed_precision_step(model, opt, scaler, step, inside_forward=inside_forward)
    opt.close()
    ref_opt.close()
    models.assert_close_by_norm(reference, bread_kernels.unpatch(model), tol=1e-3)


@pytest.mark.parametrize("case", ["sign", "badam", "bf16-autocast", "fp16-weights", "disabled-scaler"])
def test_what_needs_no_loss_scaler_is_not_refused(case):
    """No false alarm: SIGN updates (``sign(S·g) = sign(g)``), BAdam (nothing updates on the fly), bf16 autocast,
    SGD weights in fp16 themselves (GradScaler cannot unscale their optimizer's fp16 gradients), or an unscaled loss
    said so with a disabled scaler; each trains as the unpatched model's hook path under the same loop."""
    original = models.llama(layers=2)
    if case == "fp16-weights":
        original = original.half()
    bcd = dict(sgd_mode="disabled") if case == "badam" else dict(sgd_mode="all", sgd_use_sign=case == "sign")
    dtype = torch.bfloat16 if case == "bf16-autocast" else torch.float16
    trained = []
    for patched in (False, True):
        model = copy.deepcopy(original)
        if patched:
            bread_kernels.patch(model)
        scaler = torch.amp.GradScaler("cpu", enabled=False) if case == "disabled-scaler" else None
        opt = _optimizer(model, loss_scaler=scaler, **bcd)
        for step in range(2):
            _mixed_precision_step(model, opt, None, step, dtype=dtype)
        opt.close()
        trained.append(bread_kernels.unpatch(model) if patched else model)
    assert models.moved_parameters(original, trained[1]), "nothing trained: the comparison would be empty"
    models.assert_close_by_norm(trained[0], trained[1], tol=1e-2 if case == "fp16-weights" else 1e-3)


@pytest.mark.parametrize("patched", [True, False], ids=["fused", "hook-path"])
def test_a_loss_scaler_that_scaled_no_loss_is_refused(patched):
    """A loss scaler given while the loss is not scaled (``loss.backward()``): the on-the-fly updates divided the
    scaler's initial scale out of unscaled gradients, 65,536 times too small, silently.  Refused at the first
    update, before it is written."""
    model = models.llama(layers=2)
    original = copy.deepcopy(model)
    if patched:
        bread_kernels.patch(model)
    scaler = torch.amp.GradScaler("cpu")  # kept: the optimizer holds it weakly
    opt = _optimizer(model, loss_scaler=scaler, sgd_mode="all")
    with pytest.raises(RuntimeError, match="has scaled no loss yet"):
        models.loss_of(model, models.batch(0)).backward()
    assert models.moved_parameters(original, model) == []
    opt.close()


def test_an_fp16_forward_in_another_thread_does_not_decide_for_the_training_forward():
    """What the blocks computed in is kept per thread, as the forwards are: a forward with grad under fp16 autocast
    in another thread, run between the training forward's last block and its end, is refused on its own, while the
    fp32 training forward (no scaler needed) trains as the unpatched model's hook path does."""
    import threading

    original = models.llama(layers=2)
    refusals = []

    def fp16_forward_elsewhere(model):
        def run():
            try:
                with torch.autocast("cpu", dtype=torch.float16):
                    model(input_ids=models.batch(9), labels=models.batch(9))
            except RuntimeError as error:
                refusals.append(str(error))

        def between_the_last_block_and_the_end(module, args):
            if threading.current_thread() is threading.main_thread():
                thread = threading.Thread(target=run)
                thread.start()
                thread.join()
        return model.model.norm.register_forward_pre_hook(between_the_last_block_and_the_end)

    trained = []
    for patched in (False, True):
        model = copy.deepcopy(original)
        if patched:
            bread_kernels.patch(model)
        opt = _optimizer(model, sgd_mode="all")
        handle = fp16_forward_elsewhere(model) if patched else None
        for step in range(2):
            _backward_and_step(opt, None, models.loss_of(model, models.batch(step)))
        if handle is not None:
            handle.remove()
        opt.close()
        trained.append(bread_kernels.unpatch(model) if patched else model)
    assert len(refusals) == 2 and all("no loss scaler was given" in r for r in refusals), refusals
    assert models.moved_parameters(original, trained[1])
    models.assert_close_by_norm(trained[0], trained[1], tol=1e-5)
