"""A :class:`ZeroBlockOptimizer` under the Hugging Face Trainer with ``deepspeed=`` (ZeRO-3): the DeepSpeed engine
that the Trainer made through accelerate, connected as :func:`initialize` connects its own.

The Trainer hands ``deepspeed.initialize`` the optimizer its ``create_optimizer`` returned (the block optimizer
itself) and steps DeepSpeed inside ``accelerator.backward``; its callbacks get the model and accelerate's optimizer
wrapper, not the engine.  :func:`connect_trainer_engine` (called by ``BreadCallback.on_train_begin``, before the
first forward, or by ``BreadTrainerMixin.create_scheduler``, before the Trainer loads ``resume_from_checkpoint``)
finds the engine from the model, gives the block optimizer its groups back, rebuilds DeepSpeed's stage-3 optimizer
over the base optimizer's active block (as at every switch) and points accelerate's wrapper at it, and routes the
engine's ``save_checkpoint``, ``load_checkpoint``, ``destroy`` and the gathered state dict of ``save_model`` (which
the Trainer and its user call on it) through :class:`ZeroBlockEngine`.  The callback then does per step what
:meth:`ZeroBlockEngine.step` does around ``engine.step()``: :meth:`~ZeroBlockEngine.set_block_lr` before
(``on_step_begin``), :meth:`~ZeroBlockEngine.after_engine_step` after (``on_optimizer_step``).  Accelerate's
wrapper holds a view of each stage-3 optimizer whose ``param_groups`` are the block optimizer's, so the Trainer's lr
scheduler schedules the lr the block optimizer reads, as a torch scheduler on a
:class:`~bread_kernels.BlockOptimizer` does.
"""

from __future__ import annotations

import warnings
import weakref

from .config import check_config
from .engine import ZeroBlockEngine
from .internals import check_version, engine_of_module, gathered_state_dict, internals_problems
from .lora_leaves import mark_lora_leaves
from .optimizer import ZeroBlockOptimizer

__all__ = ["connect_trainer_engine"]


class _ScheduledView:
    """DeepSpeed's stage-3 optimizer as accelerate's wrapper holds it: DeepSpeed's in everything (``overflow``,
    ``state_dict``, ...) but ``param_groups``, which are the block optimizer's.  The Trainer's lr scheduler, built
    over the wrapper while DeepSpeed's optimizer still held the block optimizer, goes on scheduling those groups'
    lr (the scheduled lr the block optimizer reads), whatever groups each rebuilt stage-3 optimizer steps."""

    wraps_deepspeed_optimizer = True

    def __init__(self, zero_optimizer, block_optimizer: ZeroBlockOptimizer):
        self.__dict__["zero_optimizer"] = zero_optimizer
        self.__dict__["block_optimizer"] = block_optimizer

    @property
    def param_groups(self):
        return self.block_optimizer.param_groups

    def __getattr__(self, name: str):
        if name.startswith("__") or "zero_optimizer" not in self.__dict__:  # copy and pickle probe an empty instance
            raise AttributeError(name)
        return getattr(self.__dict__["zero_optimizer"], name)

    def __setattr__(self, name: str, value) -> None:
        if name == "param_groups":
            raise AttributeError("the block optimizer's param_groups are scheduled in place, not replaced")
        setattr(self.zero_optimizer, name, value)


def connect_trainer_engine(model, accelerated_optimizer, block_optimizer: ZeroBlockOptimizer) -> ZeroBlockEngine:
    """Connect the DeepSpeed engine wrapping ``model`` (made by the Trainer through accelerate, whose optimizer
    wrapper is ``accelerated_optimizer``) to ``block_optimizer``, which it was handed as its optimizer.  Call before
    the first forward.  Raises ``ValueError`` for a config the on-the-fly updates cannot serve (:func:`check_config`)
    and ``RuntimeError`` where no engine wraps the model or the engine's optimizer is not the wrapper's."""
    check_version()
    problems = internals_problems()
    if problems:
        raise RuntimeError(f"bread_kernels: this DeepSpeed lacks internals the integration needs: {problems}")
    ds_engine = engine_of_module(model)
    if ds_engine is None:
        raise RuntimeError("BreadCallback: the Trainer's optimizer is DeepSpeed's, but no DeepSpeed engine wraps the "
                           "model it passed to on_train_begin; train with TrainingArguments(deepspeed=<ZeRO-3 config>)")
    if getattr(accelerated_optimizer, "optimizer", None) is not ds_engine.optimizer:
        raise RuntimeError("BreadCallback: the Trainer's optimizer wraps another DeepSpeed optimizer than the engine "
                           "around its model holds; give the Trainer one DeepSpeed engine")
    if ds_engine.basic_optimizer is not block_optimizer:
        raise RuntimeError("BreadCallback: DeepSpeed's engine was not handed this ZeroBlockOptimizer as its "
                           "optimizer; return it from the Trainer's create_optimizer")
    if block_optimizer._ds_engine is ds_engine:
        raise RuntimeError("BreadCallback: another BreadCallback of this train() already connected the engine; give "
                           "the Trainer one BreadCallback")
    if block_optimizer._ds_engine is not None:
        raise RuntimeError("BreadCallback: this ZeroBlockOptimizer is connected to another DeepSpeed engine; build "
                           "a new one in the Trainer's create_optimizer")
    check_config(ds_engine.config)
    block_optimizer.restore_given_groups()
    mark_lora_leaves(model)
    engine = ZeroBlockEngine(ds_engine, block_optimizer)
    wrapper = weakref.ref(accelerated_optimizer)

    def repoint(zero_optimizer) -> None:
        outer = wrapper()
        if outer is not None:
            outer.optimizer = _ScheduledView(zero_optimizer, block_optimizer)

    engine.on_rebuild.append(repoint)
    engine._rebuild_zero_optimizer()  # over the base optimizer's active block, not the block optimizer's groups
    _route_engine_methods(ds_engine, engine)
    return engine


def _route_engine_methods(ds_engine, engine: ZeroBlockEngine) -> None:
    """The Trainer saves and loads through ``model_wrapped`` (the DeepSpeed engine): these instance attributes
    make its ``save_checkpoint``, ``load_checkpoint`` and ``destroy`` :class:`ZeroBlockEngine`'s
    (:data:`.engine.ROUTED_METHODS`), which keep the block schedule and the weights a hook updates, and take the
    model out of DeepSpeed's globals.  The Trainer asks a peft model's checkpoint and its ``save_model``'s gathered
    state dict to leave the frozen parameters out; under block-coordinate descent they include every block trained
    earlier (the adapters of those blocks, and the base weights that BREAD's on-the-fly updates move), so they are
    kept, and a warning says so once for each."""
    warned = set()

    def keep_frozen(exclude_frozen_parameters: bool, what: str, after: str = "") -> None:
        if exclude_frozen_parameters and what not in warned:
            warned.add(what)
            warnings.warn(f"bread_kernels: the Trainer asked DeepSpeed to leave the frozen parameters out of the "
                          f"{what} (it does so for a peft model); under block-coordinate descent they include the "
                          f"blocks trained earlier (their adapters too), so they are kept{after}", RuntimeWarning,
                          stacklevel=3)

    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True,  # noqa: B006 - DeepSpeed's signature
                        exclude_frozen_parameters=False):
        keep_frozen(exclude_frozen_parameters, "checkpoint")
        return engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)

    def consolidated_state_dict(exclude_frozen_parameters=False):  # the Trainer's save_model of a peft model
        keep_frozen(exclude_frozen_parameters, "saved model", ". peft's save_pretrained then writes every block's "
                    "adapters but no base weight: base weights the run trained (BREAD-SGD, lora_mode other than "
                    "'adapter_only') are in the DeepSpeed checkpoints (checkpoint-<step>, zero_to_fp32.py) and, with "
                    "BreadTrainerMixin, in <output_dir>/base_model")
        return gathered_state_dict(ds_engine)

    routed = {"save_checkpoint": save_checkpoint, "load_checkpoint": engine.load_checkpoint,
              "destroy": engine.destroy,  # ROUTED_METHODS, which destroy() hands back
              "_zero3_consolidated_16bit_state_dict": consolidated_state_dict}
    for name, method in routed.items():
        setattr(ds_engine, name, method)
