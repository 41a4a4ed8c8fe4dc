"""Hugging Face ``Trainer`` callbacks: :class:`BreadCallback` (the engine under the Trainer's BCD optimizer) and
:class:`LisaCallback` (LISA on the engine); and :class:`BreadTrainerMixin`, a Trainer base that connects
``BreadCallback`` early enough for ``resume_from_checkpoint`` under DeepSpeed ZeRO-3.

Both patch the model at ``on_train_begin`` (unless it is patched already) and are thin users of the engine's
protocol (:class:`~bread_kernels.optim.driver.EngineDriver`).  With ``TrainingArguments(gradient_checkpointing=True)``
the Trainer turns Hugging Face's checkpointing on before ``on_train_begin`` (and, in transformers 5, makes the
embeddings' output require grad, which doubles a BCD backward: BAdam issue #2); patching turns it off on the blocks
— the engine recomputes each block itself — and blocks below the cut run without autograd, so the backward stops
at the lowest trained block whatever requires grad below it.
"""

from __future__ import annotations

import weakref

import numpy as np
from transformers import TrainerCallback

from ..optim.block_optimizer import BlockOptimizer
from ..optim.driver import EngineDriver, take_over_parameters
from ..patch import check_patch_of, check_patch_options, patched_state, unpatch
from ..plan import Role
from .bcd import accelerate, accelerated, check_settings, patch_if_needed, unaccelerate
from .peft_base_model import (checked_base_model_load, forget_saved_base_model, holds_saved_base_model, is_peft_model,
                              load_trained_base_model, read_base_model_record, save_trained_base_model,
                              trains_peft_base_weights)
from .trainer_internals import TrainerLoadHooks, warn_if_moved

__all__ = ["BreadCallback", "BreadTrainerMixin", "LisaCallback", "unwrap_optimizer"]


def _is_wrapper(optimizer) -> bool:
    """accelerate's ``AcceleratedOptimizer`` (and its ``DeepSpeedOptimizerWrapper``) or a DeepSpeed optimizer
    (ZeRO's, which holds the optimizer it was handed as ``.optimizer``)."""
    return hasattr(optimizer, "optimizer") and not isinstance(optimizer, BlockOptimizer) and (
        any(cls.__name__ == "AcceleratedOptimizer" for cls in type(optimizer).__mro__)
        or _is_deepspeed(optimizer))


def _is_deepspeed(optimizer) -> bool:
    # the view of DeepSpeed's optimizer that a connected engine gives accelerate's wrapper counts as DeepSpeed's
    return type(optimizer).__module__.split(".")[0] == "deepspeed" or \
        getattr(type(optimizer), "wraps_deepspeed_optimizer", False)


def _unwrapped(optimizer) -> tuple[object, bool]:
    """The optimizer inside the Trainer's wrappers, and whether DeepSpeed's optimizer is among them."""
    under_deepspeed = False
    for _ in range(8):
        if not _is_wrapper(optimizer):
            break
        under_deepspeed = under_deepspeed or _is_deepspeed(optimizer)
        if getattr(type(optimizer), "wraps_deepspeed_optimizer", False):  # a connected engine's view: its block
            return optimizer.block_optimizer, True                        # optimizer, not DeepSpeed's base one
        optimizer = optimizer.optimizer
    return optimizer, under_deepspeed


def unwrap_optimizer(optimizer):
    """The optimizer inside the Trainer's wrappers: accelerate's ``AcceleratedOptimizer`` and, under
    ``deepspeed=``, DeepSpeed's optimizer, each keeping the one inside as ``.optimizer``."""
    return _unwrapped(optimizer)[0]


#: the accelerations a BreadCallback made, each with a weak reference to the TrainerState of the train() that made
#: it: a stopped train()'s is undone at the next on_train_begin; a second BreadCallback of one train() is refused
_ACCELERATED_BY_CALLBACK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class BreadCallback(TrainerCallback):
    """Patches the model at ``on_train_begin`` and puts the engine under the Trainer's BCD optimizer
    (:func:`bread_kernels.accelerate`: ``badam.BlockOptimizer``, ``BlockOptimizerRatio``, BlockOptimizers' class;
    a :class:`bread_kernels.BlockOptimizer` built after ``patch`` needs nothing but the loss scaler).  With
    ``fp16=True`` the Trainer's ``GradScaler`` is handed to the engine, whose on-the-fly updates divide its scale
    out.  At ``on_train_end`` the library's own behaviour is restored and the model unpatched if this callback
    patched it; a ``train()`` that stopped before (Ctrl-C, an exception) is undone at the next ``on_train_begin``,
    so training again (the same Trainer, a new one, ``resume_from_checkpoint``) runs as the first did (not under
    ``deepspeed=``: below).

    Under ``TrainingArguments(deepspeed=<ZeRO-3 config>)`` the Trainer's optimizer must be a
    :class:`~bread_kernels.integrations.deepspeed.ZeroBlockOptimizer` over the patched model, returned by the
    Trainer's ``create_optimizer`` (transformers ignores ``optimizers=`` under DeepSpeed): this callback then
    connects the engine the Trainer made as :func:`~bread_kernels.integrations.deepspeed.initialize` does, sets the
    block lr from the Trainer's scheduler at each step, switches blocks after DeepSpeed's step, and the Trainer's
    checkpoints hold the block schedule (:meth:`~bread_kernels.integrations.deepspeed.ZeroBlockEngine.save_checkpoint`).
    The Trainer loads ``resume_from_checkpoint`` before any callback runs: with :class:`BreadTrainerMixin` among the
    Trainer's bases the engine is connected before that load, which then resumes exactly; without it the load is
    refused.  A second ``train()`` of such a Trainer is refused, with ``resume_from_checkpoint`` too (transformers
    does not rebuild the engine the first one destroyed); call ``trainer.model_wrapped.destroy()`` when done, which
    also takes the model out of DeepSpeed's globals.

    A resumed ``train()`` of a peft model whose base weights the optimizer trains is refused at ``on_train_begin``
    unless :class:`BreadTrainerMixin` restored them (the Trainer's resume loads the adapters alone) or
    ``restores_base_weights`` says you do.

    Args:
        patch_options: keywords of :func:`bread_kernels.patch` (``fused_loss``, ``recompute``, ``keep_top``).
        restores_base_weights: you restore a peft model's trained base weights yourself before a ``train()``
            resumes (your own saved ``state_dict``): a resumed run is not refused for them.
        **settings: :func:`bread_kernels.accelerate` settings (``sgd_lr_scaling``, ``sgd_use_sign`` for a
            BlockOptimizers optimizer with ``sgd_mode``, read from its hooks where left out; ``rounding``,
            ``seed``).
    """

    def __init__(self, patch_options: dict | None = None, *, restores_base_weights: bool = False, **settings):
        check_settings({**settings, "patch_options": patch_options or {}}, "BreadCallback")
        self.patch_options = dict(patch_options or {})
        self.restores_base_weights = bool(restores_base_weights)
        #: set by BreadTrainerMixin when it restored them from the checkpoint this train() resumes (read once)
        self.base_weights_restored = False
        self.settings = settings
        self._optimizer = None
        self._model = None
        self._scaler_given = False
        self._zero_engine = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("BreadCallback: the Trainer passed no model or optimizer to on_train_begin")
        from .deepspeed.internals import any_partitioned  # no DeepSpeed import: its parameter attributes only

        inner, under_deepspeed = _unwrapped(optimizer)
        if under_deepspeed:
            if not self._connected_to(inner):  # else BreadTrainerMixin connected it before the Trainer's load
                self._connect_deepspeed(model, optimizer, inner)
            return
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer keeps the fp16 GradScaler
        optimizer = inner
        if any_partitioned(model.parameters()):
            raise RuntimeError("BreadCallback: the model's parameters are ZeRO-3 partitioned but the Trainer's "
                               "optimizer is not under DeepSpeed: a second train() of a Trainer with deepspeed= "
                               "(transformers does not rebuild the engine the first one destroyed), or a train() "
                               "after the Trainer's evaluate() or predict() (which made an inference engine that "
                               "transformers then trains without the optimizer), is not supported; build a new "
                               "Trainer (and model) to train again, and evaluate during or after train()")
        restored, self.base_weights_restored = self.base_weights_restored or self.restores_base_weights, False
        if state is not None and state.global_step > 0 and not restored and trains_peft_base_weights(model, optimizer):
            raise ValueError("BreadCallback: this train() resumes a checkpoint of a peft model whose base weights "
                             "the optimizer trains, and the Trainer's resume_from_checkpoint loaded the adapters "
                             "alone: the base weights are the ones the model had before, not the checkpoint's. Put "
                             "bread_kernels.integrations.transformers.BreadTrainerMixin first among your Trainer's "
                             "bases (its checkpoints hold the trained base weights, which it restores at a resume) and "
                             "start the run again, or restore them yourself before train() and build the callback "
                             "with restores_base_weights=True")
        self._optimizer, self._model = weakref.ref(optimizer), weakref.ref(model)
        if isinstance(optimizer, BlockOptimizer):
            if optimizer.engine is None:
                raise ValueError("BreadCallback: the Trainer's bread_kernels.BlockOptimizer was built over an "
                                 "unpatched model (it runs the reference's hook path); call "
                                 "bread_kernels.patch(model) before building it")
            if self.patch_options or self.settings:
                raise ValueError("BreadCallback: the Trainer's optimizer is a bread_kernels.BlockOptimizer, which "
                                 "takes its settings in its constructor and drives a model patched before it; give "
                                 "BreadCallback no patch_options or settings")
            if scaler is not None:
                optimizer.driver.set_loss_scaler(scaler)
                self._scaler_given = True
            return
        previous = accelerated(optimizer)
        if previous is not None:
            if previous not in _ACCELERATED_BY_CALLBACK:
                raise ValueError("BreadCallback: the Trainer's optimizer is already accelerated (bread_kernels."
                                 "accelerate); give the Trainer the library's optimizer as it is and BreadCallback "
                                 "your settings, or leave BreadCallback out")
            run = _ACCELERATED_BY_CALLBACK[previous]
            if state is not None and run is not None and run() is state:
                raise ValueError("BreadCallback: another BreadCallback of this train() already accelerated the "
                                 "Trainer's optimizer; give the Trainer one BreadCallback")
            # a train() that stopped before on_train_end (Ctrl-C, an exception): undone here, as on_train_end would
            unaccelerate(optimizer)
        settings = dict(self.settings)
        if scaler is not None and "loss_scaler" not in settings:
            settings["loss_scaler"] = scaler
        if self.patch_options:
            settings["patch_options"] = self.patch_options
        accelerate(optimizer, model, **settings)  # patches (and unpatches again when it refuses)
        _ACCELERATED_BY_CALLBACK[accelerated(optimizer)] = weakref.ref(state) if state is not None else None

    def _connect_deepspeed(self, model, optimizer, inner) -> None:
        from .deepspeed import ZeroBlockOptimizer
        from .deepspeed.trainer import connect_trainer_engine

        if _is_deepspeed(inner):
            raise ValueError(f"BreadCallback: the Trainer's optimizer is DeepSpeed's {type(inner).__name__}, from the "
                             "\"optimizer\" section of the DeepSpeed config (with it the Trainer never calls "
                             "create_optimizer); take that section out and return a bread_kernels.integrations."
                             "deepspeed.ZeroBlockOptimizer from your Trainer's create_optimizer")
        if not isinstance(inner, ZeroBlockOptimizer):
            raise ValueError(f"BreadCallback: under DeepSpeed the Trainer's optimizer must be a bread_kernels."
                             f"integrations.deepspeed.ZeroBlockOptimizer (BlockOptimizer's arguments, over the patched "
                             f"model), returned by your Trainer's create_optimizer; got {type(inner).__name__}, which "
                             "the on-the-fly updates cannot serve under ZeRO-3")
        if self.patch_options or self.settings:
            raise ValueError("BreadCallback: the Trainer's optimizer is a ZeroBlockOptimizer, which takes its settings "
                             "in its constructor and drives a model patched before it; give BreadCallback no "
                             "patch_options or settings")
        self._zero_engine = connect_trainer_engine(model, optimizer, inner)
        self._optimizer, self._model = weakref.ref(inner), weakref.ref(model)

    def _connected_to(self, inner) -> bool:
        """Whether this callback connected ``inner``'s DeepSpeed engine in this ``train()`` already
        (:class:`BreadTrainerMixin`, before the Trainer's load of ``resume_from_checkpoint``)."""
        engine = self._zero_engine
        return engine is not None and engine.block_optimizer is inner and inner._ds_engine is engine.engine

    def on_step_begin(self, args, state, control, **kwargs):
        if self._zero_engine is not None:  # the block lr, for DeepSpeed's step at the last micro-batch
            self._zero_engine.set_block_lr()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._zero_engine is not None:  # DeepSpeed stepped inside accelerator.backward
            self._zero_engine.after_engine_step()

    def on_train_end(self, args, state, control, **kwargs):
        if self._zero_engine is not None:
            # the engine stays connected (the Trainer saves and evaluates through it after train())
            self._zero_engine = None
            self._optimizer = self._model = None
            return
        optimizer = self._optimizer() if self._optimizer is not None else None
        if isinstance(optimizer, BlockOptimizer):
            if self._scaler_given and not optimizer.closed:
                optimizer.driver.set_loss_scaler(None)  # the scaler is the Trainer's: no forward reads it after
        elif optimizer is not None:
            unaccelerate(optimizer)  # the model unpatched if accelerate patched it
        self._optimizer = self._model = None
        self._scaler_given = False


#: the values of BreadTrainerMixin.save_base_model
_SAVE_BASE_MODEL = ("auto", "every_save", "final", "never")


class BreadTrainerMixin(TrainerLoadHooks):
    """A base of the user's ``Trainer`` subclass (first: ``class BlockTrainer(BreadTrainerMixin, Trainer)``) under
    which ``train(resume_from_checkpoint=...)`` resumes a run of a
    :class:`~bread_kernels.integrations.deepspeed.ZeroBlockOptimizer` under ``deepspeed=`` (ZeRO-3) exactly: the
    block schedule, the active block with its optimizer state, the weights hooks update and the lr schedule, so the
    steps after the checkpoint train as the uninterrupted run's did.

    The Trainer loads a DeepSpeed checkpoint right after it made its lr scheduler and before any callback runs, so
    :class:`BreadCallback`'s ``on_train_begin`` comes too late to connect the engine that load must go through
    (unconnected, the load is refused).  This mixin's ``create_scheduler`` (the Trainer's, then the connection) has
    the Trainer's :class:`BreadCallback` connect the engine there (adding one, default settings, where the Trainer
    has none); ``on_train_begin`` then finds it connected.  If the connection is refused (a DeepSpeed config the
    on-the-fly updates cannot serve, ...) the Trainer's ``model_wrapped`` is the engine when the error is raised, as
    when ``on_train_begin`` refuses it, so ``trainer.model_wrapped.destroy()`` reaches it.  Outside DeepSpeed, or
    with an optimizer other than a ``ZeroBlockOptimizer`` handed to DeepSpeed, the mixin changes nothing: the
    Trainer's optimizer, scheduler and callbacks are its own.  A ``create_scheduler`` of the subclass itself must call
    ``super().create_scheduler(...)``.

    A peft model whose base weights the run trains (a :class:`~bread_kernels.BlockOptimizer`, or Microsoft
    BlockOptimizers' under :class:`BreadCallback`, with ``sgd_mode`` on or ``lora_mode`` other than ``"adapter_only"``):
    peft's ``save_pretrained`` (the Trainer's ``save_model``, its checkpoints) writes the adapters alone, and the
    Trainer's ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapters alone.  This mixin's
    ``save_model`` also writes the base model with its trained weights into ``<output_dir>/base_model``
    (``save_pretrained`` in the model's own layout; gathered onto the first rank under ZeRO-3) and a record of it
    (``bread_base_model.json``); outside DeepSpeed the base weights come back from the checkpoint a run resumes (checked
    before the Trainer loads its adapters, copied in once that load succeeded, before the optimizer's; after
    ``model_init``), and from the best checkpoint with ``load_best_model_at_end``, before ``on_train_end``: a resumed
    run goes on as the uninterrupted one.  These loads are private Trainer methods overridden in
    :mod:`~bread_kernels.integrations.trainer_internals` (checked against the installed transformers).  A checkpoint
    whose record says the base weights trained but were not written is refused before anything loads; one saved without
    the mixin (adapters alone) once the optimizer is known, before anything loads where the Trainer was given the
    optimizer.  Under DeepSpeed the Trainer's checkpoints hold every weight already.  The trained model is both:
    ``PeftModel.from_pretrained(<the base model's Auto class>.from_pretrained("<output_dir>/base_model"),
    "<output_dir>")`` (the adapter config's ``base_model_name_or_path`` still names the original model, which
    ``AutoPeftModel*`` would load); ``base_model`` holds the original modules of ``modules_to_save`` (their trained
    copies are in the adapter file).  Which saves write it is :attr:`save_base_model`.  A peft layout whose base weights
    do not map onto the base model's names is refused at the save, before anything is written, naming
    ``save_base_model = "never"``.
    """

    #: which ``save_model`` calls write ``<output_dir>/base_model``: ``"auto"`` (the default) every one but the
    #: Trainer's checkpoints under DeepSpeed (whose engine state holds every weight): outside DeepSpeed each
    #: checkpoint holds a full copy of the base weights, which resuming it needs (``save_total_limit`` bounds them);
    #: ``"every_save"`` every one; ``"final"`` every one but the checkpoints (which then can be neither resumed nor
    #: loaded as the best model: refused); ``"never"``
    save_base_model: str = "auto"

    def train(self, *args, **kwargs):
        self._resumed = None  # what this train() resumes, set by the checkpoint load, read by create_scheduler
        try:
            return super().train(*args, **kwargs)
        finally:
            self._resumed = None
            for callback in self._bread_callbacks():
                callback.base_weights_restored = False

    def _bread_callbacks(self) -> list:
        return [c for c in self.callback_handler.callbacks if isinstance(c, BreadCallback)]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        warn_if_moved()
        inner, under_deepspeed = _unwrapped(self.optimizer) if self.optimizer is not None else (None, False)
        if under_deepspeed and _handed_to_deepspeed(inner):
            try:
                callbacks = self._bread_callbacks()
                if len(callbacks) > 1:
                    raise ValueError(f"BreadTrainerMixin: the Trainer has {len(callbacks)} BreadCallbacks; give it "
                                     "one (or none: the mixin adds one)")
                if not callbacks:
                    callbacks = [BreadCallback()]
                    self.add_callback(callbacks[0])
                callbacks[0]._connect_deepspeed(self.model, self.optimizer, inner)
            except BaseException:
                from .deepspeed.internals import engine_of_module

                self.model_wrapped = engine_of_module(self.model) or self.model_wrapped
                raise
        elif not under_deepspeed and trains_peft_base_weights(self.model, inner):
            resumed = getattr(self, "_resumed", None)  # the Trainer loaded its adapters already
            self._refuse_unrestorable(resumed, loaded=resumed is not None)
        return scheduler

    def _before_checkpoint_load(self, checkpoint: str, model):
        """Before the Trainer loads a peft model's adapters from ``checkpoint`` (``resume_from_checkpoint`` outside
        DeepSpeed): refuse what cannot be restored, check the saved base model against the model, and return what
        copies it in once the Trainer's own load succeeded (None: nothing to copy)."""
        self._check_save_base_model()
        if not is_peft_model(model):
            return None
        record = read_base_model_record(checkpoint)
        self._resumed = (checkpoint, record)
        self._refuse_unsaved_base_weights(checkpoint, record, loaded=False)
        inner = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        if inner is not None and trains_peft_base_weights(model, inner):  # else known at create_scheduler
            self._refuse_unrestorable(self._resumed, loaded=False)
        copy = checked_base_model_load(model, checkpoint) if holds_saved_base_model(checkpoint, record) else None
        for callback in self._bread_callbacks():
            callback.base_weights_restored = True
        return copy

    def _after_best_model_load(self) -> None:
        """After the Trainer loaded the best checkpoint's adapters (outside DeepSpeed, whose load restores every
        weight): its base weights, before ``on_train_end``."""
        best = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or not is_peft_model(self.model):
            return
        record = read_base_model_record(best)
        if holds_saved_base_model(best, record):
            load_trained_base_model(self.model, best)
            return
        if record is not None and record["trains_base_weights"]:
            raise RuntimeError(f"BreadTrainerMixin: the best checkpoint {best} holds the adapters of a run that "
                               "trained the base weights, without them; the model now has its adapters over the last "
                               "base weights. Load it with PeftModel.from_pretrained over a base model you saved")

    @staticmethod
    def _refuse_unsaved_base_weights(checkpoint: str, record: dict | None, loaded: bool) -> None:
        """A checkpoint whose record says the run trained the base weights and did not save them."""
        if record is not None and record["trains_base_weights"] and not record["base_model"]:
            raise ValueError(f"BreadTrainerMixin: {checkpoint} holds the adapters of a run that trained the base "
                             "weights, without them (saved with save_base_model = \"final\" or \"never\", or a "
                             "checkpoint of a DeepSpeed run, whose engine state holds them: resume it under the same "
                             f"DeepSpeed config); {_what_loaded(loaded)}. Resume from a checkpoint saved with "
                             "save_base_model = \"auto\" (the default) or \"every_save\"")

    def _refuse_unrestorable(self, resumed: tuple | None, loaded: bool) -> None:
        """With an optimizer that trains the base weights: a resumed checkpoint saved without the mixin (adapters
        alone), and ``load_best_model_at_end`` where the checkpoints will not hold the base weights."""
        checkpoint, record = resumed or (None, None)
        if checkpoint is not None and record is None and not holds_saved_base_model(checkpoint, record):
            raise ValueError(f"BreadTrainerMixin: {checkpoint} was saved without BreadTrainerMixin: it holds the "
                             f"adapters alone, and the optimizer trains the base weights; {_what_loaded(loaded)}. "
                             "Resume from a checkpoint the mixin saved, or start the run again")
        if self.args.load_best_model_at_end and self.save_base_model in ("final", "never"):
            raise ValueError(f"BreadTrainerMixin: load_best_model_at_end with save_base_model = "
                             f"{self.save_base_model!r}: the checkpoints would not hold the base weights the optimizer "
                             f"trains, and the best checkpoint's adapters would be loaded over the last ones; "
                             f"{_what_loaded(loaded)}. Set save_base_model = \"auto\" (the default) or "
                             "\"every_save\", or turn load_best_model_at_end off")

    def _check_save_base_model(self) -> None:
        """Refuse a :attr:`save_base_model` that is none of its values, before anything is saved or loaded."""
        if self.save_base_model not in _SAVE_BASE_MODEL:
            choices = ", ".join(map(repr, _SAVE_BASE_MODEL))
            raise ValueError(f"BreadTrainerMixin.save_base_model must be one of {choices}, got "
                             f"{self.save_base_model!r}")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._check_save_base_model()
        super().save_model(output_dir, _internal_call)
        if not is_peft_model(self.model):
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.optimizer is None:  # nothing says whether the base weights train: no record, and none left behind
            if self.args.should_save:
                forget_saved_base_model(output_dir)
            return
        inner = unwrap_optimizer(self.optimizer)
        if self.save_base_model in ("never", "every_save"):
            weights = self.save_base_model == "every_save"
        elif self.saving_checkpoint:
            weights = self.save_base_model == "auto" and not self.is_deepspeed_enabled
        else:
            weights = True
        save_trained_base_model(self, output_dir, trains=trains_peft_base_weights(self.model, inner), weights=weights)


def _what_loaded(loaded: bool) -> str:
    return "the Trainer loaded its adapters (they are in the model now)" if loaded else "nothing was loaded"


def _handed_to_deepspeed(optimizer) -> bool:
    from .deepspeed.optimizer import ZeroBlockOptimizer  # under DeepSpeed only: it is installed

    return isinstance(optimizer, ZeroBlockOptimizer) and optimizer.handed_to_deepspeed()


class LisaCallback(TrainerCallback):
    """LISA (Pan et al., 2024: *Layerwise Importance Sampling*), as LMFlow's ``DynamicLayerActivationCallback`` does
    it, on the engine: every ``interval_steps`` steps (from step 0, at ``on_step_begin``) ``n_layers`` of the block
    stack are drawn uniformly without replacement (``choice(range(layers), n_layers, replace=False)``) and trained;
    the other layers are frozen; everything outside the stack (embeddings, final norm, head) trains as it was set
    when training began.  The engine's plans and cut follow each draw (blocks below the lowest trained one run
    without autograd when nothing below them trains; LISA trains the embeddings, so the backward reaches every
    block, but the frozen layers compute no weight gradient and store nothing for one).

    Args:
        n_layers: layers trained at a time (1 <= n_layers <= the number of layers).
        interval_steps: optimizer steps between draws (>= 1).
        seed: seeds a private ``numpy.random.RandomState`` for the draws; None draws from numpy's global RNG, as
            LMFlow does (the Trainer seeds it at ``train()`` and restores it from a checkpoint it resumes).  Each
            ``train()`` starts the private RNG from ``seed`` and, resuming at step ``k``, replays the
            ``ceil(k / interval_steps)`` draws made before ``k`` and trains the last one's layers, so a resumed run
            trains the layers the uninterrupted run trains.
        drop_state: at each switch the base optimizer's state of the layers that stop training is dropped, so it
            only ever holds the active layers' state (LMFlow keeps it, which grows with every layer ever drawn and
            resumes stale moments when a layer is drawn again); False keeps LMFlow's behaviour.
        patch_options: keywords of :func:`bread_kernels.patch`.
    """

    def __init__(self, n_layers: int, interval_steps: int, seed: int | None = None, *, drop_state: bool = True,
                 patch_options: dict | None = None):
        for what, value in (("n_layers", n_layers), ("interval_steps", interval_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LisaCallback: {what} must be a positive int, got {value!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"LisaCallback: seed must be None or an int >= 0, got {seed!r}")
        if not isinstance(drop_state, bool):
            raise TypeError(f"LisaCallback: drop_state must be True or False, got {drop_state!r}")
        check_patch_options(patch_options or {}, "LisaCallback")
        self.n_layers, self.interval_steps, self.drop_state = n_layers, interval_steps, drop_state
        self.seed = seed
        self.rng = np.random.RandomState(seed) if seed is not None else np.random
        self.patch_options = dict(patch_options or {})
        self.active_layers_indices: list[int] = []
        self.driver: EngineDriver | None = None
        self._optimizer = None
        self._model = None
        self._patched_here = False
        self._outside: dict[str, bool] = {}
        self._layer_of: dict[str, int] = {}

    @property
    def closed(self) -> bool:
        return self.driver is None or self.driver.closed

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("LisaCallback: the Trainer passed no model to on_train_begin")
        if optimizer is not None and (isinstance(unwrap_optimizer(optimizer), BlockOptimizer)
                                      or accelerated(unwrap_optimizer(optimizer)) is not None):
            raise ValueError("LisaCallback: the Trainer's optimizer is a block optimizer that chooses the trained "
                             "parameters itself; LISA needs a plain optimizer (the Trainer's default AdamW)")
        check_patch_of(model, self.patch_options, "LisaCallback")  # before a live owner is closed
        # first: a previous owner (an interrupted Trainer's callback) is closed, which may unpatch the model
        take_over_parameters(list(model.named_parameters()), "LisaCallback", keep_requires_grad=True)
        self._patched_here = patch_if_needed(model, self.patch_options, "LisaCallback")
        try:
            engine = patched_state(model)
            layers = len(engine.blocks)
            if self.n_layers > layers:
                raise ValueError(f"LisaCallback: n_layers={self.n_layers} but the model has {layers} layers")
            prefixes = engine.block_prefixes()
            named = list(model.named_parameters())
            self._layer_of = {n: i for n, _ in named for i, prefix in enumerate(prefixes) if n.startswith(prefix)}
            self._outside = {n: p.requires_grad for n, p in named if n not in self._layer_of}
            self.total_layers = layers
            self.driver = EngineDriver(named, owner=self, library_hooks=True, what="LisaCallback")
        except BaseException:
            if self._patched_here:
                self._patched_here = False
                unpatch(model)
            raise
        self._optimizer = weakref.ref(unwrap_optimizer(optimizer)) if optimizer is not None else None
        self._model = weakref.ref(model)
        if self.seed is not None:
            self._replay_draws(getattr(state, "global_step", 0))

    def _replay_draws(self, step: int) -> None:
        """Start the private RNG from ``seed`` and replay the draws of the steps before ``step`` (a resumed run's
        first step): ``ceil(step / interval_steps)`` draws, made at steps 0, ``interval_steps``, ... below ``step``.
        Where ``step`` is not a draw's step, the last draw's layers train until the next draw, as in the run that
        was interrupted."""
        self.rng = np.random.RandomState(self.seed)
        made = -(-step // self.interval_steps)
        for _ in range(made - 1 if step % self.interval_steps else made):
            self._draw()
        if step % self.interval_steps:
            self.switch_active_layers()

    def _draw(self) -> list[int]:
        """``n_layers`` of the stack's layers, uniformly without replacement (LMFlow's ``np.random.choice``)."""
        return [int(i) for i in self.rng.choice(range(self.total_layers), self.n_layers, replace=False)]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.closed:
            raise RuntimeError("LisaCallback: on_step_begin before on_train_begin (or after the callback closed)")
        if state.global_step % self.interval_steps == 0:
            self.switch_active_layers()

    def switch_active_layers(self) -> None:
        """Draw the next active layers and write the engine's plans and cut (and drop the state of the layers that
        stop training)."""
        self.active_layers_indices = self._draw()
        active = set(self.active_layers_indices)
        roles = {}
        for name, _ in self.driver.named_parameters:
            if name in self._layer_of:
                roles[name] = Role.ACTIVE if self._layer_of[name] in active else Role.FROZEN
            else:
                roles[name] = Role.ACTIVE if self._outside[name] else Role.FROZEN
        self.driver.set_roles(roles)
        optimizer = self._optimizer() if self._optimizer is not None else None
        if self.drop_state and optimizer is not None:
            for name, p in self.driver.named_parameters:
                if roles[name] is not Role.ACTIVE:
                    optimizer.state.pop(p, None)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the engine's plans and cut (plain autograd), and unpatch the model if this callback patched it.
        The ``requires_grad`` flags stay as the last draw left them.  Idempotent."""
        patched_here, self._patched_here = self._patched_here, False
        if self.driver is not None:
            self.driver.close()
        model = self._model() if self._model is not None else None
        if patched_here and model is not None and patched_state(model) is not None:
            unpatch(model)

    def __repr__(self) -> str:
        return (f"LisaCallback(n_layers={self.n_layers}, interval_steps={self.interval_steps}, "
                f"active={self.active_layers_indices})")
