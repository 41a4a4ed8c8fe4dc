"""The Hugging Face Trainer end to end on a tiny Llama: BreadCallback under badam's BlockOptimizer and LisaCallback,
each against the same Trainer run without the engine (the library alone / LMFlow's LISA callback, written here
from its published code), with and without ``gradient_checkpointing=True``."""

import copy
import os
import warnings

import badam
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments

import bread_kernels
from bread_kernels.integrations.transformers import BreadCallback, BreadTrainerMixin, LisaCallback
from bread_kernels.patch import patched_state

from .. import model_zoo as models

STEPS = 5
LR = 1e-2
EPS = 1e-3  # see tests/integrations/test_bcd.py: Adam's conditioning on ~0 gradients


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*expect model to be loaded in fp16/bf16.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
        yield


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=2 * STEPS * 2):
        self.ids = [models.batch(i, shape=(models.SEQ,)) for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **extra):
    settings = dict(max_steps=STEPS, per_device_train_batch_size=2, learning_rate=LR, adam_epsilon=EPS,
                    weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_strategy="no",
                    save_strategy="no", report_to=[], use_cpu=True, seed=7, dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(output_dir=str(tmp_path), **{**settings, **extra})


class _CountingTrainer(Trainer):
    """Counts the FLOPs of every training step (forward and backward) and records the engine's cut."""

    flops: list
    cuts: list

    def training_step(self, model, inputs, *args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            loss = super().training_step(model, inputs, *args, **kwargs)
        self.flops.append(counter.get_total_flops())
        state = patched_state(model)
        self.cuts.append(state.cut if state is not None else None)
        return loss


def _run(model, args, callbacks=(), optimizers=(None, None)) -> _CountingTrainer:
    trainer = _CountingTrainer(model=model, args=args, train_dataset=_Data(), callbacks=list(callbacks),
                               optimizers=optimizers)
    trainer.flops, trainer.cuts = [], []
    trainer.train()
    return trainer


def _badam(model):
    torch.manual_seed(0)
    base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    return badam.BlockOptimizer(base, list(model.named_parameters()), switch_block_every=2, verbose=0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_bread_callback_under_badam(tmp_path, checkpointing):
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path, gradient_checkpointing=checkpointing)
    reference = _run(ref_model, args, optimizers=(_badam(ref_model), None))
    engine = _run(eng_model, args, callbacks=[BreadCallback()], optimizers=(_badam(eng_model), None))
    assert models.moved_parameters(original, ref_model)
    models.assert_same_parameters(ref_model, eng_model)
    # descending from the top block, a switch every 2 steps (badam's first block gets one step less)
    assert engine.cuts == [3, 2, 2, 1, 1]
    if checkpointing:  # HF's checkpointing makes the backward reach every layer; the engine's stops at the cut
        assert sum(engine.flops) < 0.8 * sum(reference.flops), (engine.flops, reference.flops)  # measured 0.74
    # without checkpointing the reference stops at the active block by itself and stores every activation; the
    # engine recomputes each block at or above the cut instead (measured 1.23x the FLOPs, for the memory)
    assert patched_state(eng_model) is None, "the callback unpatches the model it patched at the end"


def test_bread_trainer_mixin_outside_deepspeed_changes_nothing(tmp_path):
    """BreadTrainerMixin (which makes the Trainer's resume_from_checkpoint under ZeRO-3 resume: test_zero3) outside
    DeepSpeed: with badam's optimizer and a BreadCallback it trains as the callback does (through the engine, as the
    reference); with the Trainer's default AdamW and no callback it trains as the plain Trainer (it added a
    BreadCallback once, which refused AdamW at on_train_begin: a reviewer's find)."""

    class MixedTrainer(BreadTrainerMixin, _CountingTrainer):
        pass

    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path)
    _run(ref_model, args, optimizers=(_badam(ref_model), None))
    trainer = MixedTrainer(model=eng_model, args=args, train_dataset=_Data(), callbacks=[BreadCallback()],
                           optimizers=(_badam(eng_model), None))
    trainer.flops, trainer.cuts = [], []
    trainer.train()
    models.assert_same_parameters(ref_model, eng_model)
    assert trainer.cuts == [3, 2, 2, 1, 1]  # through the engine: the cut follows badam's active block
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR"
    plain_model, mixed_model = copy.deepcopy(original), copy.deepcopy(original)
    _run(plain_model, args)
    mixed = MixedTrainer(model=mixed_model, args=args, train_dataset=_Data())
    mixed.flops, mixed.cuts = [], []
    mixed.train()
    assert not any(isinstance(c, BreadCallback) for c in mixed.callback_handler.callbacks)
    assert mixed.cuts == [None] * STEPS  # never patched
    models.assert_same_parameters(plain_model, mixed_model)


def _reloaded(folder):
    """The trained model as a user reloads it: peft's adapters in ``folder`` over the base model saved beside them."""
    import peft
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base_model")),
                                          folder)


def _eval_logits(*models_to_run):
    """Each model's logits on one batch, in eval mode."""
    ids = models.batch(99)
    with torch.no_grad():
        return [m.eval()(input_ids=ids).logits for m in models_to_run]


@pytest.mark.parametrize("layout", ["lora", "trainable_tokens", "gpt2_tied"])
def test_the_mixins_save_model_of_a_peft_model_writes_the_trained_base_model(tmp_path, layout):
    """peft's save_pretrained (the Trainer's save_model of a peft model) writes the adapters alone, and BREAD trains
    the base weights too: BreadTrainerMixin's save_model also writes <output_dir>/base_model, which with the adapters
    reloads the trained model (the adapters over the initial base model give other logits).  With peft's trainable
    token indices the embedding sits one level deeper (token_adapter): it was written under a name the base model
    does not have, and reloaded at random (a reviewer's find).  GPT-2: its head tied to its embedding, Conv1D
    layers (fan_in_fan_out)."""
    import peft

    class MixedTrainer(BreadTrainerMixin, Trainer):
        pass

    extra = {"trainable_token_indices": {"embed_tokens": [1, 2, 3]}} if layout == "trainable_tokens" else {}
    make = models.gpt2 if layout == "gpt2_tied" else models.llama
    original = models.with_lora(make(), **extra)
    model = bread_kernels.patch(copy.deepcopy(original))
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS),
                                       list(model.named_parameters()), switch_block_every=1, sgd_mode="all",
                                       lora_mode="all", verbose=0)
    trainer = MixedTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_Data(), optimizers=(opt, None),
                           callbacks=[BreadCallback()])
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / "adapter_model.safetensors")
    adapters_only = peft.PeftModel.from_pretrained(make(), tmp_path / "saved")  # the initial base weights
    trained, reloaded, on_initial = _eval_logits(model, _reloaded(tmp_path / "saved"), adapters_only)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert (on_initial - trained).abs().max() > 1e-3  # the base weights the run trained matter
    trainer.save_base_model = "never"
    trainer.save_model(str(tmp_path / "adapters_only"))
    assert not os.path.exists(tmp_path / "adapters_only" / "base_model")
    trainer.save_base_model = "always"
    with pytest.raises(ValueError, match="save_base_model must be one of 'auto', 'every_save', 'final', 'never'"):
        trainer.save_model(str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")  # refused before the Trainer saved anything


def _bread_peft_model(make=models.llama):
    return bread_kernels.patch(models.with_lora(make()))


def _bread_optimizer(model):
    """A bread_kernels BlockOptimizer that trains the base weights too (BREAD-SGD with every adapter)."""
    return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS),
                                        list(model.named_parameters()), switch_block_every=1, sgd_mode="all",
                                        lora_mode="all", verbose=0)


def _bread_peft_trainer(output_dir, trainer_class=None, make=models.llama, callback=None, **extra):
    """A patched LoRA model (``make``'s) under :func:`_bread_optimizer` in a Trainer (BreadTrainerMixin's by default,
    with ``callback`` or a BreadCallback) that saves a checkpoint every 2 steps."""
    if trainer_class is None:
        class trainer_class(BreadTrainerMixin, Trainer):
            pass
    model = _bread_peft_model(make)
    args = _args(output_dir, save_strategy="steps", save_steps=2, **extra)
    evaluated = _Data(4) if "eval_strategy" in extra else None
    return model, trainer_class(model=model, args=args, train_dataset=_Data(), eval_dataset=evaluated,
                                optimizers=(_bread_optimizer(model), None), callbacks=[callback or BreadCallback()])


def _assert_equal_parameters(reference, model):
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


def test_the_mixins_resume_of_a_peft_model_restores_the_trained_base_weights(tmp_path):
    """The Trainer's resume_from_checkpoint of a peft model loads the adapters alone; BREAD trains the base weights
    too, which a resumed run took from the model as built (every weight ended elsewhere: measured before the fix).
    With BreadTrainerMixin the checkpoints hold the base weights and its train() restores them: the resumed run ends
    where the uninterrupted one did, bit for bit (also with resume_from_checkpoint=True, the last checkpoint).
    Refused instead: a checkpoint saved with save_base_model = "final" (before anything loads), and a resume with
    BreadCallback but no mixin (the adapters alone loaded)."""
    model, trainer = _bread_peft_trainer(tmp_path / "run")
    trainer.train()
    for step in (2, 4):
        assert os.path.isfile(tmp_path / "run" / f"checkpoint-{step}" / "base_model" / "model.safetensors")
    resumed, trainer = _bread_peft_trainer(tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _assert_equal_parameters(model, resumed)
    for trained in [model, resumed]:
        assert models.moved_parameters(models.with_lora(models.llama()), trained)
    last, trainer = _bread_peft_trainer(tmp_path / "run")
    trainer.train(resume_from_checkpoint=True)  # checkpoint-5 (the last step's), from where nothing is left to run
    _assert_equal_parameters(model, last)

    class FinalOnly(BreadTrainerMixin, Trainer):
        save_base_model = "final"

    _, trainer = _bread_peft_trainer(tmp_path / "final_only", FinalOnly)
    trainer.train()
    assert not os.path.exists(tmp_path / "final_only" / "checkpoint-2" / "base_model")
    untouched, trainer = _bread_peft_trainer(tmp_path / "refused")
    before = copy.deepcopy(untouched)
    with pytest.raises(ValueError, match="without them .*nothing was loaded"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "final_only" / "checkpoint-2"))
    _assert_equal_parameters(before, untouched)
    _, trainer = _bread_peft_trainer(tmp_path / "no_mixin", Trainer)
    with pytest.raises(ValueError, match="loaded the adapters alone.*BreadTrainerMixin first"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _, trainer = _bread_peft_trainer(tmp_path / "no_mixin", Trainer)  # its checkpoints: adapters alone
    trainer.train()
    untouched, trainer = _bread_peft_trainer(tmp_path / "refused")
    with pytest.raises(ValueError, match="saved without BreadTrainerMixin.*nothing was loaded"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "no_mixin" / "checkpoint-2"))
    _assert_equal_parameters(before, untouched)
    trainer.train()  # a refused resume leaves nothing behind: the same Trainer trains afresh (a reviewer's find)
    _assert_equal_parameters(model, untouched)


def test_the_mixins_resume_loads_nothing_when_the_trainers_load_fails_and_leaves_no_stale_record(tmp_path):
    """The base weights are copied in once the Trainer's own load of the checkpoint succeeded (a checkpoint without
    its adapters: the Trainer refuses, the model is unchanged); a save that does not know the optimizer yet removes
    the record and base model an earlier save left in its folder; and BreadCallback(restores_base_weights=True)
    resumes after the user restored the base weights (here by load_trained_base_model) bit for bit."""
    import shutil

    from bread_kernels.integrations.peft_base_model import BASE_MODEL_RECORD, load_trained_base_model

    model, trainer = _bread_peft_trainer(tmp_path / "run")
    trainer.train()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "broken")
    os.remove(tmp_path / "broken" / "adapter_model.safetensors")
    untouched, trainer = _bread_peft_trainer(tmp_path / "refused")
    before = copy.deepcopy(untouched)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "broken"))
    _assert_equal_parameters(before, untouched)

    class MixedTrainer(BreadTrainerMixin, Trainer):
        pass

    MixedTrainer(model=_bread_peft_model(), args=_args(tmp_path / "fresh")).save_model(str(tmp_path / "broken"))
    assert not os.path.exists(tmp_path / "broken" / BASE_MODEL_RECORD)
    assert not os.path.exists(tmp_path / "broken" / "base_model")

    own = BreadCallback(restores_base_weights=True)
    resumed, trainer = _bread_peft_trainer(tmp_path / "own", Trainer, callback=own)
    load_trained_base_model(resumed, str(tmp_path / "run" / "checkpoint-2"))
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _assert_equal_parameters(model, resumed)


def test_the_mixins_resume_of_a_moe_model_and_one_built_by_model_init(tmp_path):
    """A MoE's fused experts: save_pretrained writes them one by one by default (transformers 5's original format),
    which did not load back (a reviewer's find); the mixin writes the model's own layout.  With model_init the Trainer
    rebuilds the model inside train(), after anything done before it (the base weights come back into the rebuilt
    one).  Both resume bit for bit; a checkpoint written without a record but with base_model (before there were
    records) loads too."""
    import shutil

    model, trainer = _bread_peft_trainer(tmp_path / "run", make=models.qwen3_moe)
    trainer.train()
    resumed, trainer = _bread_peft_trainer(tmp_path / "resumed", make=models.qwen3_moe)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _assert_equal_parameters(model, resumed)

    class InitTrainer(BreadTrainerMixin, Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = _bread_optimizer(self.model)
            return self.optimizer

    def built_by_model_init(output_dir, checkpoint=None):
        built = []
        trainer = InitTrainer(model_init=lambda *_: built.append(_bread_peft_model()) or built[-1],
                              args=_args(output_dir, save_strategy="steps", save_steps=2), train_dataset=_Data(),
                              callbacks=[BreadCallback()])
        trainer.train(resume_from_checkpoint=checkpoint)
        assert len(built) == 2 and trainer.model is built[-1]  # built at __init__, and again inside train()
        return built[-1]

    model = built_by_model_init(tmp_path / "init")
    shutil.copytree(tmp_path / "init" / "checkpoint-2", tmp_path / "legacy")
    os.remove(tmp_path / "legacy" / "bread_base_model.json")
    _assert_equal_parameters(model, built_by_model_init(tmp_path / "init_resumed", str(tmp_path / "legacy")))


def test_the_mixins_load_best_model_at_end_of_a_peft_model_loads_the_best_base_weights(tmp_path):
    """load_best_model_at_end of a peft model loads the best checkpoint's adapters alone; with BreadTrainerMixin
    the model ends as the best checkpoint's base model under its adapters (the best here: the largest eval loss, so
    that it is not the last checkpoint), as peft reloads them.  With save_base_model = "final" the checkpoints would
    not hold the base weights: refused before the first step."""
    extra = {"eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
             "metric_for_best_model": "eval_loss", "greater_is_better": True}
    model, trainer = _bread_peft_trainer(tmp_path / "run", **extra)
    seen_at_train_end = []

    class Snapshot(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen_at_train_end.append(copy.deepcopy(model))

    trainer.add_callback(Snapshot())
    trainer.train()
    _assert_equal_parameters(model, seen_at_train_end[0])  # the best model already (a reviewer's find)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-5"), best
    ended, at_best, at_last = _eval_logits(model, _reloaded(best), _reloaded(tmp_path / "run" / "checkpoint-5"))
    torch.testing.assert_close(ended, at_best, rtol=1e-5, atol=1e-5)
    assert (at_last - at_best).abs().max() > 1e-3

    class FinalOnly(BreadTrainerMixin, Trainer):
        save_base_model = "final"

    untouched, trainer = _bread_peft_trainer(tmp_path / "refused", FinalOnly, **extra)
    before = copy.deepcopy(untouched)
    with pytest.raises(ValueError, match="load_best_model_at_end with save_base_model = 'final'.*nothing was loaded"):
        trainer.train()
    _assert_equal_parameters(before, untouched)
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="load_best_model_at_end with save_base_model = 'final'.*nothing was loaded"):
        trainer.train(resume_from_checkpoint=best)  # a checkpoint that holds them: refused before it loads
    _assert_equal_parameters(before, untouched)


def test_which_optimizers_train_a_peft_models_base_weights():
    """What decides whether the mixin writes and restores a peft model's base weights: bread_kernels' BlockOptimizer
    and Microsoft BlockOptimizers' (Adam in the active block unless lora_mode="adapter_only", the SGD hooks with
    sgd_mode) train them; badam's finds the adapters and trains them alone; a torch optimizer trains what requires
    grad (peft leaves the base weights off); nothing of a model without adapters counts."""
    from bread_kernels.integrations.peft_base_model import trains_peft_base_weights

    from .blockoptimizers_style import BlockOptimizersStyle

    def bread(model, **modes):
        base = torch.optim.AdamW(model.parameters(), lr=LR)
        return bread_kernels.BlockOptimizer(base, list(model.named_parameters()), verbose=0, **modes)

    def style(model, **modes):
        named = list(model.named_parameters())
        prefixes = [[f"layers.{i}."] for i in range(4)]
        return BlockOptimizersStyle(torch.optim.AdamW([p for _, p in named], lr=LR), named, prefixes, **modes)

    peft_model = _bread_peft_model()
    assert trains_peft_base_weights(peft_model, bread(peft_model))
    assert trains_peft_base_weights(peft_model, bread(peft_model, lora_mode="adapter_only", sgd_mode="all"))
    assert not trains_peft_base_weights(peft_model, bread(peft_model, lora_mode="adapter_only"))
    style_model = models.with_lora(models.llama())
    assert trains_peft_base_weights(style_model, style(style_model))  # lora_mode="all": the active block's weights
    adapters_only = style(models.with_lora(models.llama()))
    adapters_only.lora_mode = "adapter_only"
    assert not trains_peft_base_weights(peft_model, adapters_only)
    adapters_only.sgd_mode = "all"
    assert trains_peft_base_weights(peft_model, adapters_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        badam_model = models.with_lora(models.llama())
        assert not trains_peft_base_weights(badam_model, _badam(badam_model))
    assert not trains_peft_base_weights(peft_model, torch.optim.AdamW(peft_model.parameters(), lr=LR))
    plain = models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unpatched model: the slow path, which is beside the point here
        assert not trains_peft_base_weights(plain, bread(plain))


def test_the_trainer_internals_the_mixin_overrides_are_there():
    """Fails loudly when transformers changes the private Trainer methods BreadTrainerMixin overrides (the resume and
    best-model tests above would fail too, less plainly)."""
    from transformers import Trainer as HFTrainer

    from bread_kernels.integrations import trainer_internals

    assert trainer_internals.internals_problems() == []

    class Moved(HFTrainer):
        def _load_from_checkpoint(self, checkpoint, model=None):
            pass

    del_best = type("NoBest", (HFTrainer,), {"_load_best_model": None})
    assert trainer_internals.internals_problems(Moved) == [
        "Trainer._load_from_checkpoint takes ('checkpoint', 'model'), not ('resume_from_checkpoint', 'model')"]
    assert any("_load_best_model" in p for p in trainer_internals.internals_problems(del_best))


class _LMFlowLisa(TrainerCallback):
    """LMFlow's DynamicLayerActivationCallback (its published code, restated): at every ``interval_steps``-th
    step begin, freeze every layer and unfreeze ``n_layers`` drawn by ``np.random.choice`` without replacement.
    ``drop_state`` adds the state dropping of LisaCallback (LMFlow does not drop)."""

    def __init__(self, model, n_layers, interval_steps, seed, drop_state, optimizer_of):
        self.layers, self.n_layers, self.interval_steps = model.model.layers, n_layers, interval_steps
        self.rng = np.random.RandomState(seed)
        self.drop_state, self.optimizer_of = drop_state, optimizer_of

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.interval_steps == 0:
            for layer in self.layers:
                layer.requires_grad_(False)
            active = self.rng.choice(range(len(self.layers)), self.n_layers, replace=False)
            for i in active:
                self.layers[int(i)].requires_grad_(True)
            if self.drop_state:
                opt = self.optimizer_of()
                for layer_index, layer in enumerate(self.layers):
                    if layer_index not in active:
                        for p in layer.parameters():
                            opt.state.pop(p, None)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
@pytest.mark.parametrize("drop_state", [False, True], ids=["lmflow-state", "drop-state"])
def test_lisa_callback_trains_as_lmflow(tmp_path, checkpointing, drop_state):
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path, gradient_checkpointing=checkpointing)
    ref_trainer = _CountingTrainer(model=ref_model, args=args, train_dataset=_Data())
    ref_trainer.flops, ref_trainer.cuts = [], []
    ref_trainer.add_callback(_LMFlowLisa(ref_model, 2, 2, seed=3, drop_state=drop_state,
                                         optimizer_of=lambda: ref_trainer.optimizer.optimizer))
    ref_trainer.train()
    lisa = LisaCallback(n_layers=2, interval_steps=2, seed=3, drop_state=drop_state)
    eng_trainer = _CountingTrainer(model=eng_model, args=args, train_dataset=_Data(), callbacks=[lisa])
    eng_trainer.flops, eng_trainer.cuts = [], []
    eng_trainer.train()
    assert eng_trainer.cuts == [0] * STEPS, "LISA trains the embeddings: the backward reaches every block"
    if checkpointing:  # both recompute every block; the engine does nothing more
        assert sum(eng_trainer.flops) <= sum(ref_trainer.flops)
    else:  # the engine recomputes every block (one more forward, for the memory): measured 1.31x
        assert sum(eng_trainer.flops) <= 1.35 * sum(ref_trainer.flops)
    assert models.moved_parameters(original, ref_model)
    models.assert_same_parameters(ref_model, eng_model)
    if drop_state:
        held = {id(p) for p in eng_trainer.optimizer.optimizer.state}
        active = {id(p) for i in lisa.active_layers_indices for p in eng_model.model.layers[i].parameters()}
        layers = {id(p) for p in eng_model.model.layers.parameters()}
        assert held & layers == active, "the base optimizer holds only the active layers' state"


@pytest.mark.parametrize("resume_at", [2, 3], ids=["at-a-draw", "between-draws"])
def test_a_seeded_lisa_run_resumed_from_a_checkpoint_trains_as_the_uninterrupted_one(tmp_path, resume_at):
    """LisaCallback(seed=3) resumed at step 2 or 3: the private RNG started again from the seed, so the resumed run
    drew the uninterrupted run's first layers again (and between draws trained every layer until the next draw);
    it replays the draws made before the resumed step and trains the last one's layers."""
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path)
    ref_trainer = Trainer(model=ref_model, args=args, train_dataset=_Data())
    ref_trainer.add_callback(_LMFlowLisa(ref_model, 2, 2, seed=3, drop_state=False, optimizer_of=None))
    ref_trainer.train()  # uninterrupted, without the engine
    saving = _args(tmp_path / "run", save_strategy="steps", save_steps=resume_at)
    Trainer(model=copy.deepcopy(original), args=saving, train_dataset=_Data(),
            callbacks=[LisaCallback(n_layers=2, interval_steps=2, seed=3, drop_state=False)]).train()
    Trainer(model=eng_model, args=args, train_dataset=_Data(),
            callbacks=[LisaCallback(n_layers=2, interval_steps=2, seed=3, drop_state=False)]).train(
        resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{resume_at}"))
    assert models.moved_parameters(original, ref_model)
    models.assert_same_parameters(ref_model, eng_model)


def test_lisa_refuses_bad_settings():
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        LisaCallback(n_layers=0, interval_steps=2)
    with pytest.raises(ValueError, match="interval_steps"):
        LisaCallback(n_layers=1, interval_steps=1.5)


def test_bread_callback_refuses_a_block_optimizer_on_the_slow_path(tmp_path):
    model = models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR),
                                           list(model.named_parameters()), verbose=0)
    with pytest.raises(ValueError, match="call bread_kernels.patch\\(model\\) before building it"):
        _run(model, _args(tmp_path), callbacks=[BreadCallback()], optimizers=(opt, None))


# -- mixed precision: TrainingArguments(bf16=True) runs the forward under torch.autocast(bfloat16) ----------------
# fp32 weights: the engine's GEMMs run in bf16 as the unpatched model's do under autocast, in other layouts (chunked
# dW, recompute), so a gradient may differ in its last bf16 bit (2^-8 relative); after 5 steps that stays below 1e-3
# of a parameter's norm.  bf16 weights: the parameters themselves are bf16 and badam's fp32 copies round back to
# bf16 after each step, so one-ulp flips of single elements (2^-8 relative) are expected: 1e-2 of the norm.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_bread_callback_under_trainer_bf16(tmp_path, dtype, tol):
    original = models.llama(dtype=dtype)
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path, bf16=True, gradient_checkpointing=True)
    seen = []
    # inside the model's forward (which accelerate wraps in autocast); a hook on the model itself runs before it
    eng_model.model.norm.register_forward_pre_hook(lambda m, inputs: seen.append(torch.is_autocast_enabled("cpu")))
    _run(ref_model, args, optimizers=(_badam(ref_model), None))
    _run(eng_model, args, callbacks=[BreadCallback()], optimizers=(_badam(eng_model), None))
    assert seen and all(seen), "the Trainer did not run the forward under autocast: the test would prove nothing"
    assert models.moved_parameters(original, ref_model)
    models.assert_close_by_norm(ref_model, eng_model, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_lisa_callback_under_trainer_bf16(tmp_path, dtype, tol):
    original = models.llama(dtype=dtype)
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path, bf16=True)
    ref_trainer = Trainer(model=ref_model, args=args, train_dataset=_Data())
    ref_trainer.add_callback(_LMFlowLisa(ref_model, 2, 2, seed=3, drop_state=True,
                                         optimizer_of=lambda: ref_trainer.optimizer.optimizer))
    ref_trainer.train()
    Trainer(model=eng_model, args=args, train_dataset=_Data(),
            callbacks=[LisaCallback(n_layers=2, interval_steps=2, seed=3)]).train()
    assert models.moved_parameters(original, ref_model)
    models.assert_close_by_norm(ref_model, eng_model, tol)


def test_bread_callback_with_gradient_accumulation(tmp_path):
    """Two micro-batches per step under a BlockOptimizers-style BREAD-SGD optimizer: the on-the-fly updates run in
    every micro-batch's backward, as the library's hooks do, and the active block's gradients accumulate."""
    from .blockoptimizers_style import BlockOptimizersStyle

    def make(model):
        base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
        return BlockOptimizersStyle(base, list(model.named_parameters()), [[f"model.layers.{i}."] for i in range(4)],
                                    switch_block_every=2, sgd_mode="partial", sgd_lr_scaling=0.5)

    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path, gradient_accumulation_steps=2)
    _run(ref_model, args, optimizers=(make(ref_model), None))
    _run(eng_model, args, callbacks=[BreadCallback(sgd_lr_scaling=0.5, sgd_use_sign=False)],
         optimizers=(make(eng_model), None))
    assert models.moved_parameters(original, ref_model)
    models.assert_same_parameters(ref_model, eng_model)


def test_a_lisa_run_again_after_an_interrupted_one_trains_through_the_engine(tmp_path):
    """A Trainer interrupted with LisaCallback (no on_train_end), then a new run with a new LisaCallback on the same
    model: the new callback found the model patched, then closing the old one unpatched it, and every step ran
    plain autograd (silently: the results matched, nothing of the engine was used)."""
    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    args = _args(tmp_path)
    interrupted = LisaCallback(n_layers=2, interval_steps=2, seed=1)
    interrupted.on_train_begin(args, None, None, model=eng_model)  # a Trainer stopped before its first step ends
    ref_trainer = _CountingTrainer(model=ref_model, args=args, train_dataset=_Data())
    ref_trainer.flops, ref_trainer.cuts = [], []
    ref_trainer.add_callback(_LMFlowLisa(ref_model, 2, 2, seed=3, drop_state=False,
                                         optimizer_of=lambda: ref_trainer.optimizer.optimizer))
    ref_trainer.train()
    with pytest.warns(RuntimeWarning, match="takes them over"):
        lisa = LisaCallback(n_layers=2, interval_steps=2, seed=3, drop_state=False)
        trainer = _run(eng_model, args, callbacks=[lisa])
    assert trainer.cuts == [0] * STEPS  # patched at every step (None: plain autograd)
    models.assert_same_parameters(ref_model, eng_model)


class _Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt (Ctrl-C) at the end of step ``at``, once: the Trainer then calls no on_train_end."""

    def __init__(self, at: int):
        self.at, self.armed = at, True

    def on_step_end(self, args, state, control, **kwargs):
        if self.armed and state.global_step == self.at:
            self.armed = False
            raise KeyboardInterrupt("Ctrl-C")


@pytest.mark.parametrize("again", ["same_trainer", "new_trainer_and_callback"])
def test_bread_callback_trains_again_after_an_interrupted_train(tmp_path, again):
    """A train() stopped by Ctrl-C at step 2 leaves badam's optimizer accelerated (the Trainer calls no
    on_train_end); training again, as a re-run notebook cell does, raised "this optimizer is already accelerated".
    Now the next on_train_begin undoes it: both runs end where the same two runs of the library alone end, every step
    of the second through the engine; an optimizer the user accelerated, and a second BreadCallback in one train(),
    are refused, with the remedy."""
    original = models.llama()
    results = {}
    for engine in (False, True):
        model = copy.deepcopy(original)
        opt = _badam(model)
        callbacks = [_Interrupt(2)] + ([BreadCallback()] if engine else [])
        trainer = _CountingTrainer(model=model, args=_args(tmp_path / str(engine)), train_dataset=_Data(),
                                   callbacks=callbacks, optimizers=(opt, None))
        trainer.flops, trainer.cuts = [], []
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        if again == "new_trainer_and_callback":
            trainer = _CountingTrainer(model=model, args=_args(tmp_path / str(engine)), train_dataset=_Data(),
                                       callbacks=[BreadCallback()] if engine else [], optimizers=(opt, None))
        trainer.flops, trainer.cuts = [], []
        trainer.train()
        results[engine] = model
        if engine:
            assert len(trainer.cuts) == STEPS and None not in trainer.cuts  # patched at every step
            assert patched_state(model) is None  # on_train_end unpatched it
    assert models.moved_parameters(original, results[False])
    models.assert_same_parameters(results[False], results[True])
    model = copy.deepcopy(original)
    opt = bread_kernels.accelerate(_badam(model), model)
    trainer = Trainer(model=model, args=_args(tmp_path / "user"), train_dataset=_Data(), callbacks=[BreadCallback()],
                      optimizers=(opt, None))
    with pytest.raises(ValueError, match="already accelerated .* give the Trainer the library's optimizer as it is"):
        trainer.train()
    bread_kernels.unaccelerate(opt)
    trainer = Trainer(model=model, args=_args(tmp_path / "two"), train_dataset=_Data(),
                      callbacks=[BreadCallback(), BreadCallback()], optimizers=(opt, None))
    with pytest.raises(ValueError, match="another BreadCallback of this train\\(\\) already accelerated"):
        trainer.train()
    bread_kernels.unaccelerate(opt)


def _causal_lm_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


class _LossBelowTheModelTrainer(Trainer):
    """A custom ``compute_loss`` from the decoder and the head called apart (``model.model(...)``,
    ``model.lm_head``): no forward of the model itself runs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
        loss = _causal_lm_loss(model.lm_head(hidden), inputs["labels"])
        return (loss, None) if return_outputs else loss


@pytest.mark.parametrize("loss", ["compute_loss_func", "below_the_model"])
def test_bread_callback_with_a_custom_loss(tmp_path, loss):
    """BREAD-SGD (BlockOptimizers' class, two micro-batches a step) with the Trainer's ``compute_loss_func`` (the
    model's forward, a loss of its own on the logits) or a ``compute_loss`` that starts below the model: trains as
    the same Trainer on the unpatched model."""
    from .blockoptimizers_style import BlockOptimizersStyle

    def make(model):
        base = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
        return BlockOptimizersStyle(base, list(model.named_parameters()), [[f"model.layers.{i}."] for i in range(4)],
                                    switch_block_every=2, sgd_mode="all", sgd_lr_scaling=0.5)

    def run(model, callbacks):
        trainer_class = _LossBelowTheModelTrainer if loss == "below_the_model" else Trainer
        extra = {"compute_loss_func": lambda outputs, labels, **_: _causal_lm_loss(outputs.logits, labels)} \
            if loss == "compute_loss_func" else {}
        trainer_class(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=_Data(),
                      callbacks=callbacks, optimizers=(make(model), None), **extra).train()

    original = models.llama()
    ref_model, eng_model = copy.deepcopy(original), copy.deepcopy(original)
    run(ref_model, [])
    run(eng_model, [BreadCallback(sgd_lr_scaling=0.5, sgd_use_sign=False)])
    assert models.moved_parameters(original, ref_model)
    models.assert_same_parameters(ref_model, eng_model)


class _SparseGradientsTrainer(Trainer):
    """badam's BlockOptimizerRatio leaves sparse gradients, whose norm torch does not compute, and transformers 5's
    Trainer takes the gradients' norm at every step (for its logs, max_grad_norm=0 too): left out here (its private
    ``_get_grad_norm``), in the runs with and without the engine alike.  Records the engine's cut at each step."""

    cuts: list

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        state = patched_state(model)
        self.cuts.append(state.cut if state is not None else None)
        return loss


def _badam_ratio(model):
    torch.manual_seed(0)  # each parameter's mask seed is drawn from the global RNG
    return badam.BlockOptimizerRatio(model.parameters(), list(model.named_parameters()), lr=LR, eps=EPS, verbose=0,
                                     update_ratio=0.3, switch_every=4)


def test_bread_callback_under_badam_ratio_with_accumulation_and_a_resume(tmp_path):
    """badam's BlockOptimizerRatio under the Trainer, two micro-batches a step: the run saved at step 2, and a new
    Trainer, optimizer and callback resuming it, end where the same two runs without the engine end.  The checkpoint
    comes before Ratio's first state reset (``switch_every``), after which its state holds ``defaultdict``s that the
    Trainer's ``torch.load(weights_only=True)`` refuses, with or without the engine."""
    original = models.llama()
    results = {}
    for engine in (False, True):
        out = tmp_path / str(engine)
        runs = []
        for resume in (None, str(out / "checkpoint-2")):
            model = copy.deepcopy(original)
            saves = dict(save_strategy="steps", save_steps=2) if resume is None else {}
            trainer = _SparseGradientsTrainer(
                model=model, args=_args(out, gradient_accumulation_steps=2, max_grad_norm=0.0, **saves),
                train_dataset=_Data(), callbacks=[BreadCallback()] if engine else [],
                optimizers=(_badam_ratio(model), None))
            trainer.cuts = []
            trainer.train(resume_from_checkpoint=resume)
            # every micro-batch through the engine: Ratio trains every block, so the cut is the lowest, 0
            assert trainer.cuts == [0 if engine else None] * (2 * (STEPS - (2 if resume else 0)))
            runs.append(model)
        results[engine] = runs
    assert models.moved_parameters(original, results[False][0])
    # Ratio's own step counter is not in its state: the resumed run resets its state at another step
    assert models.moved_parameters(results[False][0], results[False][1])
    for reference, model in zip(results[False], results[True]):
        models.assert_same_parameters(reference, model)


@pytest.mark.parametrize("build, error, match", [
    (lambda: BreadCallback({"keep_top": -1}), ValueError, "BreadCallback: keep_top must be 'auto' or an int >= 0"),
    (lambda: BreadCallback({"fused_los": False}), TypeError, r"unknown patch option\(s\) \['fused_los'\]"),
    (lambda: BreadCallback(rounding_mode="nearest"), TypeError, r"unknown setting\(s\) \['rounding_mode'\]"),
    (lambda: BreadCallback(rounding="up"), ValueError, "BreadCallback: unknown rounding 'up'"),
    (lambda: BreadCallback(sgd_lr_scaling=-1.0), ValueError, "sgd_lr_scaling must be a finite number >= 0"),
    (lambda: LisaCallback(2, 5, patch_options={"recompute": 0}), TypeError, "LisaCallback: recompute must be True"),
], ids=["keep_top", "patch_typo", "setting_typo", "rounding", "scale", "lisa_recompute"])
def test_callback_settings_refused_whatever_the_model_are_refused_when_the_callback_is_built(build, error, match):
    """Not at on_train_begin, after the Trainer was built, a checkpoint perhaps loaded, and the run started."""
    with pytest.raises(error, match=match):
        build()
