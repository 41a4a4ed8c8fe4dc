"""Several models in one process: a module shared between two models (a teacher's frozen embedding given to its
student, an embedding shared by two students), each model with its own optimizer."""

import warnings

import pytest
import torch

import bread_kernels
from bread_kernels.optim import driver as driver_module
from tests import model_zoo as models
from tests.model_zoo import batch, loss_of


def _two_llamas_sharing_the_embedding(patched: bool):
    teacher, student = models.llama(seed=0), models.llama(seed=1)
    student.model.embed_tokens = teacher.model.embed_tokens
    if patched:
        teacher = bread_kernels.patch(teacher, hook_update_numel=0)
        student = bread_kernels.patch(student, hook_update_numel=0)
    return teacher, student


def _optimizer(named, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow path's warning on the unpatched reference
        return bread_kernels.BlockOptimizer(torch.optim.SGD([p for _, p in named], lr=1e-2), named,
                                            switch_mode="ascending", switch_block_every=1, verbose=0, **kwargs)


@pytest.mark.parametrize("teacher_first", [True, False], ids=["teacher-first", "student-first"])
def test_an_optimizer_finds_its_own_model_where_another_patched_model_shares_a_parameter(monkeypatch, teacher_first):
    """A patched teacher that no optimizer drives shares its embedding with the patched student: the student's
    optimizer is the student's, whichever of the two patched models is found first (before, the first found that
    held any of the parameters was taken, and the student's own names were refused as 'not a parameter of the
    LlamaForCausalLM').  It trains the student as the unpatched pair is trained."""
    trained = []
    for patched in (True, False):
        teacher, student = _two_llamas_sharing_the_embedding(patched)
        if patched:
            order = [teacher, student] if teacher_first else [student, teacher]
            monkeypatch.setattr(driver_module, "patched_models", lambda: list(order))
        opt = _optimizer(list(student.named_parameters()), sgd_mode="all", include_embedding=True)
        assert opt.model is (student if patched else None)
        for step in range(3):
            with torch.no_grad():
                teacher(batch(step))
            loss_of(student, batch(step)).backward()
            opt.step()
            opt.zero_grad()
        trained.append(student)
        monkeypatch.undo()
    models.assert_same_parameters(trained[1], trained[0])


@pytest.mark.parametrize("student_first", [True, False], ids=["student-first", "teacher-first"])
def test_a_module_shared_with_a_model_another_optimizer_drives_is_refused_naming_the_remedies(student_first):
    """Two patched models sharing an embedding, each with an optimizer, one of which lists the embedding: each
    writes the plans of its own model's fused modules, so the other reset the embedding's plan at its switches and
    the shared weight silently stopped training.  Refused, in either order of construction, naming the remedies;
    the remedy of leaving the shared parameters out of both lists trains both models as the unpatched pair."""
    first, second = _two_llamas_sharing_the_embedding(patched=True)
    if not student_first:
        first, second = second, first
    owner = _optimizer(list(first.named_parameters()), sgd_mode="all", include_embedding=True)
    without = [(n, p) for n, p in second.named_parameters() if not n.startswith("model.embed_tokens.")]
    with pytest.raises(ValueError, match="shared between two models.*own copy.*out of both.*unpatch"):
        _optimizer(without, sgd_mode="all")
    assert not owner.closed
    owner.close()
    if not student_first:
        return

    trained = []
    for patched in (True, False):
        pair = _two_llamas_sharing_the_embedding(patched)
        opts = [_optimizer([(n, p) for n, p in m.named_parameters() if not n.startswith("model.embed_tokens.")],
                           sgd_mode="partial", sgd_use_sign=True) for m in pair]
        for step in range(3):
            for index, (model, opt) in enumerate(zip(pair, opts)):
                loss_of(model, batch(2 * step + index)).backward()
                opt.step()
                opt.zero_grad()
        trained.append(pair)
    for reference, model in zip(*reversed(trained)):
        models.assert_same_parameters(reference, model)


@pytest.mark.parametrize("sgd_mode, sign", [("all", False), ("partial", True)], ids=["sgd-all", "sign-partial"])
def test_an_optimizer_over_a_list_without_some_layers_makes_blocks_of_the_listed_ones_as_unpatched(sgd_mode, sign):
    """The bottom layer left out of the optimizer's list (kept frozen, or trained by another optimizer on a copy):
    the patched model's blocks are the listed layers, as the unpatched model's are (before, the patched stack's
    every layer became a block, and construction failed with "block prefix 'model.layers.0.' matches no parameter
    name"), and it trains as the unpatched model does."""
    trained = []
    for patched in (True, False):
        model = models.llama()
        if patched:
            model = bread_kernels.patch(model, hook_update_numel=0)
        named = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.layers.0.")]
        opt = _optimizer(named, sgd_mode=sgd_mode, sgd_use_sign=sign)
        assert opt.block_prefix_list == [[f"model.layers.{i}."] for i in (1, 2, 3)]
        for step in range(4):
            loss_of(model, batch(step)).backward()
            opt.step()
            opt.zero_grad()
        trained.append(model)
    models.assert_same_parameters(trained[1], trained[0])
