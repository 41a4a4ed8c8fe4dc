"""TRL's SFTTrainer, DPOTrainer and KTOTrainer (1.16) on a patched tiny Llama under bread_kernels' BlockOptimizer,
against the same trainer run on an unpatched copy with the same optimizer (the hook path: autograd's dW, then the
update).

SFTTrainer computes its loss through TRL's own fused LM head (``model(**inputs, fused_lm_head=True)``), which reads
``lm_head.weight`` outside the head module: the engine must still carry out the head's Role."""

import copy
import tempfile
import warnings

import pytest
import torch

import bread_kernels

from .. import model_zoo as models

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

LR = 1e-2
EPS = 1e-3  # see tests/integrations/test_bcd.py: Adam's conditioning on ~0 gradients


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*bread_kernels.*unpatched.*")
        yield


def _tokenizer():
    """A word-level tokenizer over the zoo's vocabulary (no download): SFTTrainer needs a processing class."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, models.VOCAB)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _dataset(n: int = 6):
    """Already tokenized rows of :data:`~tests.model_zoo.SEQ` ids (no special ids)."""
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, models.VOCAB, (models.SEQ,), generator=gen).tolist()} for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def _trainer(model, steps: int, optimizer, callbacks=()):
    """An SFTTrainer of ``model`` for ``steps`` steps under ``optimizer``, with an evaluation set."""
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
                         disable_tqdm=True, log_level="error", bf16=False)  # SFTConfig defaults to bf16 autocast
    return trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(4),
                          processing_class=_tokenizer(), optimizers=(optimizer, None), callbacks=list(callbacks))


def _words(gen: torch.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in torch.randint(3, models.VOCAB, (n,), generator=gen).tolist()) + " "


def _preference_dataset(n: int = 4):
    """Rows of a prompt and a chosen and a rejected completion of unequal lengths (padding inside a batch)."""
    gen = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_list([{"prompt": _words(gen, 5), "chosen": _words(gen, 4 + i % 3),
                                        "rejected": _words(gen, 3 + i % 2)} for i in range(n)])


def _block_optimizer(model, **optimizer_settings):
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    return bread_kernels.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=1, verbose=0,
                                        **optimizer_settings)


def _dpo_trainer(model, ref_model, steps: int, optimizer, **config):
    """A DPOTrainer of ``model`` against ``ref_model`` (DPOConfig turns ``gradient_checkpointing`` on by default)."""
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
                         disable_tqdm=True, log_level="error", bf16=False, **config)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_preference_dataset(),
                          processing_class=_tokenizer(), optimizers=(optimizer, None))


def _kto_trainer(model, ref_model, steps: int, optimizer):
    """A KTOTrainer of ``model`` against ``ref_model`` on desirable and undesirable completions (with its KL term)."""
    gen = torch.Generator().manual_seed(1)
    rows = [{"prompt": _words(gen, 5), "completion": _words(gen, 3 + i % 3), "label": bool(i % 2)} for i in range(4)]
    args = trl.KTOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0,
                         disable_tqdm=True, log_level="error", bf16=False)
    return trl.KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=_tokenizer(), optimizers=(optimizer, None))


def _train(model, steps: int, **optimizer_settings) -> list[dict]:
    """``steps`` SFTTrainer steps of ``model`` under a bread_kernels BlockOptimizer (a switch every step); the
    logged loss, entropy and mean token accuracy of each step."""
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    optimizer = bread_kernels.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=1, verbose=0,
                                             **optimizer_settings)
    trainer = _trainer(model, steps, optimizer)
    trainer.train()
    keys = ("loss", "entropy", "mean_token_accuracy")
    return [{k: log[k] for k in keys} for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("sgd_use_sign", [False, True], ids=["sgd", "sign"])
def test_sft_trainer_updates_the_head_on_the_fly_as_the_unpatched_model(sgd_use_sign):
    """BREAD-SGD (and sign) under SFTTrainer: TRL's fused LM head computes the head from ``lm_head.weight`` outside
    the head module, whose fused forward would have carried out the head's SGD update; the head (and every other
    weight) must end where the unpatched model's hooks put it, and the logged metrics must agree."""
    original = models.llama(layers=2)
    reference, engine = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))
    settings = dict(sgd_mode="all", sgd_use_sign=sgd_use_sign)
    logged_reference = _train(reference, 2, **settings)
    logged_engine = _train(engine, 2, **settings)
    assert "lm_head.weight" in models.moved_parameters(original, reference)
    models.assert_same_parameters(reference, engine)
    for a, b in zip(logged_reference, logged_engine, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def _badam(model):
    import badam

    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    return badam.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=1, verbose=0)


@pytest.mark.parametrize("unpatched_by", ["callback", "unpatch"])
def test_sft_trainer_evaluates_after_the_engine_is_gone(unpatched_by):
    """``trainer.evaluate()`` after ``train()``, once the model is unpatched (by BreadCallback's on_train_end, or by
    ``unpatch``): TRL's fused LM head forward, installed on the model by SFTTrainer, must survive the unpatch (it
    was removed with the fused loss's forward, and the evaluation failed on ``outputs.log_probs``), and the metrics
    are the unpatched run's."""
    from bread_kernels.integrations.transformers import BreadCallback

    original = models.llama(layers=2)
    reference, engine = copy.deepcopy(original), copy.deepcopy(original)
    expected = _trainer(reference, 2, _badam(reference))
    expected.train()
    if unpatched_by == "callback":
        trainer = _trainer(engine, 2, _badam(engine), callbacks=[BreadCallback()])
    else:
        trainer = _trainer(bread_kernels.patch(engine), 2, _badam(engine))
    trainer.train()
    if unpatched_by == "unpatch":
        bread_kernels.unpatch(engine)
    models.assert_same_parameters(reference, engine)
    metrics, expected_metrics = trainer.evaluate(), expected.evaluate()
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5), key


def test_sft_trainer_under_blockoptimizers_class_and_bread_callback_updates_the_head():
    """Microsoft BlockOptimizers' class (sgd_mode="all": its own hooks update what the engine does not fuse) with
    BreadCallback under SFTTrainer: the head, computed by TRL's fused LM head outside its module, must get the
    library's hook update, as on the unpatched model."""
    from bread_kernels.integrations.transformers import BreadCallback

    from .blockoptimizers_style import BlockOptimizersStyle

    def optimizer(model):
        base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
        blocks = [[prefix] for prefix in models.layout(model)[0]]
        return BlockOptimizersStyle(base, list(model.named_parameters()), blocks, switch_block_every=1,
                                    sgd_mode="all", sgd_lr_scaling=0.5)

    original = models.llama(layers=2)
    reference, engine = copy.deepcopy(original), copy.deepcopy(original)
    _trainer(reference, 2, optimizer(reference)).train()
    _trainer(engine, 2, optimizer(engine), callbacks=[BreadCallback(sgd_lr_scaling=0.5, sgd_use_sign=False)]).train()
    assert "lm_head.weight" in models.moved_parameters(original, reference)
    models.assert_same_parameters(reference, engine)


def test_an_on_the_fly_head_under_trls_fused_head_is_refused_where_updates_write_shards():
    """Under ZeRO-3 the driver's update target writes the weights' shards and no hook path serves the head, so an
    SGD head that TRL's fused LM head computes outside its module would silently never move: the forward is refused,
    naming the remedy (a frozen head is not)."""
    from bread_kernels import OnTheFlyUpdate, Role
    from bread_kernels.optim.driver import EngineDriver
    from bread_kernels.update import LocalTarget

    class ShardWriter(LocalTarget):
        """A stand-in for the ZeRO-3 integration's target (it writes the tensors here)."""

    model = bread_kernels.patch(models.llama(layers=2))
    trl.trainer.utils.add_fused_lm_head(model)
    driver = EngineDriver(list(model.named_parameters()), update=OnTheFlyUpdate(lr=LR), update_target=ShardWriter())
    names = [n for n, _ in model.named_parameters()]
    ids = models.batch(0)
    try:
        driver.set_roles({n: Role.SGD if n == "lm_head.weight" else Role.FROZEN for n in names})
        with pytest.raises(RuntimeError, match="computed outside its module by TRL's fused LM head.*sgd_mode="):
            model(input_ids=ids, labels=ids, fused_lm_head=True)
        driver.set_roles({n: Role.ACTIVE if n == "lm_head.weight" else Role.FROZEN for n in names})
        model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
        assert model.lm_head.weight.grad is not None
    finally:
        driver.close()


@pytest.mark.parametrize("settings, ref_model", [(dict(sgd_mode="all"), "unpatched_copy"),
                                                 (dict(sgd_mode="disabled"), "patched_copy")],
                         ids=["sgd-unpatched_ref", "badam-patched_ref"])
def test_dpo_trainer_trains_as_the_unpatched_model(settings, ref_model):
    """DPOTrainer (gradient checkpointing on, its default) with an explicit reference model: the reference forward
    runs between the policy's loss and its backward inside TRL's ``disable_gradient_checkpointing(model)``, which
    turns HF's checkpointing back on as it exits, and the backward failed in the blocks' recompute ("A different
    number of tensors was saved"). The policy must end where the unpatched model trained alike ends, with the same
    logged metrics, and the reference model (a copy of the unpatched or of the patched model) must not move."""
    original = models.llama(layers=2)
    reference, engine = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))
    ref_of_reference = copy.deepcopy(original)
    ref_of_engine = copy.deepcopy(original if ref_model == "unpatched_copy" else engine)
    runs = []
    for model, ref in ((reference, ref_of_reference), (engine, ref_of_engine)):
        trainer = _dpo_trainer(model, ref, 2, _block_optimizer(model, **settings))
        trainer.train()
        runs.append([log for log in trainer.state.log_history if "loss" in log])
    moved = models.moved_parameters(original, reference)
    assert ("lm_head.weight" in moved) == (settings["sgd_mode"] == "all") and moved
    models.assert_same_parameters(reference, engine)
    assert models.moved_parameters(original, ref_of_engine) == []
    for a, b in zip(*runs, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_kto_trainer_trains_as_the_unpatched_model():
    """KTOTrainer (BREAD-signSGD) computes its reference log-probabilities inside TRL's
    ``disable_gradient_checkpointing(model)`` too, between the policy's loss and its backward: it failed alike in
    the recompute. Parameters and logged metrics as the unpatched run's; the reference model unmoved."""
    original = models.llama(layers=2)
    reference, engine = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original))
    ref_of_engine = copy.deepcopy(original)
    runs = []
    for model, ref in ((reference, copy.deepcopy(original)), (engine, ref_of_engine)):
        trainer = _kto_trainer(model, ref, 2, _block_optimizer(model, sgd_mode="all", sgd_use_sign=True))
        trainer.train()
        runs.append([log for log in trainer.state.log_history if "loss" in log])
    assert "lm_head.weight" in models.moved_parameters(original, reference)
    models.assert_same_parameters(reference, engine)
    assert models.moved_parameters(original, ref_of_engine) == []
    for a, b in zip(*runs, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
