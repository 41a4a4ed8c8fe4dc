"""``initialize``: ``deepspeed.initialize`` for a block-optimized model, and the engine that rebuilds DeepSpeed's
stage-3 optimizer for the new active block at every switch."""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ...functions.recompute import register_recompute_scope
from .config import check_config
from .internals import CACHED_BACKWARD_FUNCTIONS, check_version, checkpointed_as_frozen, clear_release_cache, \
    default_checkpoint_tag, forget_modules, internals_problems, latest_checkpoint_tag, \
    micro_batches_of_the_coming_step, module_stack_restored, remove_module_hooks
from .lora_leaves import mark_lora_leaves, unmark_lora_leaves
from .optimizer import ZeroBlockOptimizer

__all__ = ["ZeroBlockEngine", "initialize", "SCHEDULE_FILE", "ROUTED_METHODS"]

#: the block optimizer's schedule in a checkpoint's folder, beside DeepSpeed's files
SCHEDULE_FILE = "bread_kernels_block_schedule.pt"
#: DeepSpeed engine methods that a caller holding the DeepSpeed engine itself (the HF Trainer) may be routed to
#: the ZeroBlockEngine's through instance attributes (.trainer); destroy() hands them back
ROUTED_METHODS = ("save_checkpoint", "load_checkpoint", "destroy", "_zero3_consolidated_16bit_state_dict")
#: skipped steps in a row that are warned about (or switch_block_every, if more): fp16's dynamic loss scale skips a
#: few while it finds its scale; more say the gradients stay non-finite
SKIPPED_STEPS_WARNING = 20


class ZeroBlockEngine:
    """A DeepSpeed engine plus the block optimizer's schedule: ``engine(...)``, ``backward(loss)``, ``step()``.

    Everything else is forwarded to the DeepSpeed engine (``engine.module``, ``engine.save_checkpoint``, ...).
    """

    def __init__(self, ds_engine, optimizer: ZeroBlockOptimizer):
        self.engine = ds_engine
        self.block_optimizer = optimizer
        self.switches = 0
        self.skipped_in_a_row = 0  # steps DeepSpeed skipped since the last counted one
        #: called with each new stage-3 optimizer: whoever else holds DeepSpeed's optimizer (accelerate's wrapper)
        self.on_rebuild: list = []
        optimizer._ds_engine = ds_engine
        optimizer.update_target.loss_scale = _LossScale(ds_engine)  # also what says an engine is connected
        optimizer.update_target.ds_engine = weakref.ref(ds_engine)
        self._recompute_scope = register_recompute_scope(module_stack_restored)
        weakref.finalize(self, self._recompute_scope.remove)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["engine"], name)

    def backward(self, loss: torch.Tensor, **kwargs: Any):
        return self.engine.backward(loss, **kwargs)

    def save_checkpoint(self, save_dir, tag=None, client_state={},  # noqa: B006 - DeepSpeed's signature
                        save_latest: bool = True, exclude_frozen_parameters: bool = False):
        """DeepSpeed's ``save_checkpoint`` (same arguments; every rank calls it, at a step boundary), plus what an
        exact resume by :meth:`load_checkpoint` needs and DeepSpeed does not hold:

        * the block optimizer's schedule (:meth:`~bread_kernels.BlockOptimizer.schedule_state`: block order, step
          counters, the stochastic rounding's draw counter, the scheduled lr) and its optimizer groups' layout,
          written first, by rank 0 (of each node, with node-local storage, as DeepSpeed's ``latest``), into the
          checkpoint's folder as :data:`SCHEDULE_FILE`: a job stopped during the save leaves no ``latest`` pointing
          at a folder without it;
        * the parameters a hook updates on the fly (the norms under ``sgd_mode`` "all"/"partial"), which require grad
          outside DeepSpeed's optimizer: saved with the frozen parameters, each rank its shard.

        Refused, before anything is written: a save between the micro-batches of one optimizer step (DeepSpeed
        keeps neither the gradient accumulated so far nor the micro-step count, and the on-the-fly updates of those
        micro-batches are already in the weights), and ``exclude_frozen_parameters=True`` (under block-coordinate
        descent the frozen parameters include the blocks trained earlier).  A torch lr scheduler on the block
        optimizer is the caller's to save, e.g. in ``client_state``."""
        if exclude_frozen_parameters:
            raise ValueError("ZeroBlockEngine.save_checkpoint: exclude_frozen_parameters=True would leave out the "
                             "frozen parameters, which under block-coordinate descent include every block trained "
                             "earlier in the run (a resumed run would start them from their initial values); save "
                             "them (the default)")
        pending = micro_batches_of_the_coming_step(self.engine)
        if pending != 0:
            raise RuntimeError(f"ZeroBlockEngine.save_checkpoint: {pending or 'some'} of the "
                               f"{self.engine.gradient_accumulation_steps()} micro-batches of this optimizer step have "
                               "run: DeepSpeed's checkpoint holds neither their accumulated gradient nor the "
                               "micro-step count, so a resumed run would step at other micro-batches. Save after the "
                               "engine.step() of a step's last micro-batch")
        tag = default_checkpoint_tag(self.engine) if tag is None else str(tag)
        rank = self.engine.local_rank if self.engine.use_node_local_storage() else self.engine.global_rank
        error = None
        if rank == 0:
            try:
                os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
                torch.save(self._schedule(), os.path.join(save_dir, tag, SCHEDULE_FILE))
            except Exception as exc:  # noqa: BLE001 - every rank raises it below, none is left waiting
                error = f"{type(exc).__name__}: {exc}"
        errors = [error]
        if dist.is_initialized():
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise RuntimeError(f"ZeroBlockEngine.save_checkpoint: writing {SCHEDULE_FILE} into "
                               f"{os.path.join(save_dir, tag)} failed ({failed}); nothing else was saved")
        with checkpointed_as_frozen(self._hook_updated()):
            # DeepSpeed's own method: the engine may route its save_checkpoint here (.trainer)
            return type(self.engine).save_checkpoint(self.engine, save_dir, tag=tag, client_state=client_state,
                                                     save_latest=save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
        """DeepSpeed's ``load_checkpoint`` (same arguments; returns its ``(load_path, client_state)``), resuming
        where :meth:`save_checkpoint` left off: the block optimizer takes the saved schedule (read by rank 0 and
        handed to every rank, so all take the same path), the saved block becomes active with the saved optimizer
        groups and DeepSpeed's stage-3 optimizer is rebuilt for them, and then DeepSpeed loads the weights (the
        hook-updated ones with the frozen ones) and the optimizer state.  The next steps train as the uninterrupted
        run would have.  As DeepSpeed says for ZeRO-3, load into an engine that has not trained yet: an engine that
        has stepped is refused before anything loads.

        ``load_module_only=True`` or ``load_optimizer_states=False`` load the weights only; the block schedule then
        starts afresh.  A schedule that does not fit this optimizer (other blocks, other trained parameters) is
        refused before anything is loaded.  A checkpoint without the schedule (saved by DeepSpeed's own
        ``save_checkpoint``) loads as DeepSpeed loads it, the block schedule starting afresh (a warning says so);
        if it was saved with another block active, the error names ``start_block=``.  If DeepSpeed's load fails,
        the block optimizer is back at its previous block and schedule, with a fresh stage-3 optimizer; the weights
        DeepSpeed had loaded by then stay."""
        if self.engine.micro_steps:
            raise RuntimeError(f"ZeroBlockEngine.load_checkpoint: this engine has stepped ({self.engine.micro_steps} "
                               "step() calls), and DeepSpeed loads a ZeRO-3 checkpoint only into an engine that has "
                               "not trained; nothing was loaded. Load into a fresh engine (initialize)")
        latest = latest_checkpoint_tag(self.engine, load_dir)
        if tag is None:
            tag = latest
        weights_only = load_module_only or not load_optimizer_states
        if weights_only and tag is not None and str(tag) != latest:
            raise ValueError(f"ZeroBlockEngine.load_checkpoint: a weights-only load (load_module_only=True or "
                             f"load_optimizer_states=False) of tag {tag!r}, while {load_dir}/latest names {latest!r}: "
                             "DeepSpeed 0.19 rebuilds the weights its optimizer trains from the checkpoint 'latest' "
                             "names (zero_to_fp32 without the tag) and the frozen ones from the tag, a silent mix of "
                             "two checkpoints; nothing was loaded. Load the tag whole (the schedule resumes with it), "
                             "or write the tag into 'latest' first")
        # DeepSpeed 0.19 rebuilds a ZeRO-3 model's weights from the checkpoint's fp32 partitions only where it loads
        # no optimizer state; with load_module_only=True alone it loads the frozen parameters and leaves the ones
        # its optimizer trains (the active block) at their values in this engine, silently
        deepspeed_arguments = dict(load_module_strict=load_module_strict,
                                   load_optimizer_states=load_optimizer_states and not load_module_only,
                                   load_lr_scheduler_states=load_lr_scheduler_states,
                                   load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        schedule = None if tag is None or weights_only else self._read_schedule(load_dir, str(tag))
        if schedule is None:
            if tag is not None and not weights_only:
                warnings.warn(f"ZeroBlockEngine.load_checkpoint: {os.path.join(load_dir, str(tag))} has no "
                              f"{SCHEDULE_FILE} (saved by DeepSpeed's own save_checkpoint, not ZeroBlockEngine's): "
                              "the weights and the active block's optimizer state load, the block order and the step "
                              "counters start afresh", RuntimeWarning, stacklevel=2)
            with checkpointed_as_frozen(self._hook_updated()):
                return self._load_deepspeed(load_dir, tag, False, deepspeed_arguments)
        opt = self.block_optimizer
        opt.check_schedule_state(schedule, "ZeroBlockEngine.load_checkpoint")
        previous = self._schedule()
        try:
            self._take_schedule(schedule)
            with checkpointed_as_frozen(self._hook_updated()):
                loaded = self._load_deepspeed(load_dir, tag, True, deepspeed_arguments)
        except Exception:
            self._take_schedule(previous)
            opt.restore_measured(previous)
            raise
        opt.restore_measured(schedule)
        return loaded

    def _schedule(self) -> dict:
        """What :data:`SCHEDULE_FILE` holds: the block optimizer's schedule and its optimizer groups' layout."""
        return {**self.block_optimizer.schedule_state(), "group_layout": self.block_optimizer.group_layout}

    def _read_schedule(self, load_dir, tag: str) -> dict | None:
        """The schedule in the checkpoint's folder (None where there is none), read by global rank 0 and handed to
        every rank: ranks that each looked for the file themselves could take different paths and hang."""
        payload: list = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            path = os.path.join(load_dir, tag, SCHEDULE_FILE)
            try:
                payload = [torch.load(path, weights_only=True) if os.path.isfile(path) else None]
            except Exception as exc:  # noqa: BLE001 - every rank raises it below
                payload = [f"{type(exc).__name__}: {exc}"]
        if dist.is_initialized():
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], str):
            raise RuntimeError(f"ZeroBlockEngine.load_checkpoint: reading {SCHEDULE_FILE} from "
                               f"{os.path.join(load_dir, tag)} failed ({payload[0]}); nothing was loaded")
        return payload[0]

    def _take_schedule(self, schedule: dict) -> None:
        opt = self.block_optimizer
        opt.load_schedule_state(schedule)
        try:
            opt.activate_as_saved(opt.order.current, schedule["group_layout"])
        except ValueError as exc:
            raise ValueError(f"ZeroBlockEngine.load_checkpoint: {exc}: build the ZeroBlockOptimizer as the saved "
                             "run's (lora_mode, active_modules, include_embedding, include_lm_head); nothing was "
                             "loaded") from exc
        self._rebuild_zero_optimizer()

    def _load_deepspeed(self, load_dir, tag, scheduled: bool, arguments: dict):
        """DeepSpeed's load; a checkpoint that lacks a parameter this run expects among the frozen ones (DeepSpeed
        fails on the first one, with a bare KeyError) is refused with the reason and the remedy."""
        try:
            return type(self.engine).load_checkpoint(self.engine, load_dir, tag, **arguments)
        except KeyError as exc:
            if not (exc.args and exc.args[0] in self.block_optimizer.names):  # not a parameter: DeepSpeed's own error
                raise
            if scheduled:
                raise ValueError(f"ZeroBlockEngine.load_checkpoint: the checkpoint has no {exc} where this run "
                                 "expects it: this ZeroBlockOptimizer trains other parameters than the saved run's "
                                 "did. Build it as the saved run's (sgd_mode, lora_mode, active_modules)") from exc
            saved_block = _saved_block(load_dir, tag)
            if saved_block is not None:  # saved by save_checkpoint, loaded weights only
                raise ValueError(f"ZeroBlockEngine.load_checkpoint: the checkpoint has no {exc} where this run "
                                 "expects it among the frozen parameters: this weights-only load goes into an "
                                 f"optimizer whose active block is {self.block_optimizer.order.current}, and the "
                                 f"saved run had block {saved_block} active (DeepSpeed keeps the weights its "
                                 "optimizer trains apart from the frozen ones). Build the ZeroBlockOptimizer with "
                                 f"start_block={saved_block} (the block order and the step count start afresh), or "
                                 "load the whole checkpoint to resume the saved run") from exc
            raise ValueError(f"ZeroBlockEngine.load_checkpoint: the checkpoint has no {exc} where this run expects "
                             "it: it was saved by DeepSpeed's own save_checkpoint, without the block schedule, with "
                             "another block active (or with the parameters a hook updates left out). Build the "
                             "ZeroBlockOptimizer with start_block= the block that was active then (the block order "
                             "and the step count start afresh), or save with ZeroBlockEngine.save_checkpoint") from exc

    def _hook_updated(self) -> list:
        """The parameters a hook updates on the fly: outside DeepSpeed's optimizer, yet requiring grad."""
        by_name = dict(self.block_optimizer.named_parameters_list)
        return [by_name[name] for name in self.block_optimizer.driver.unfused_on_the_fly]

    def step(self) -> None:
        """``engine.step()``; at a gradient-accumulation boundary also the block optimizer's bookkeeping (lr with
        its after-switch warm-up, skipped-update report, step counters) and, when due, the block switch."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        self.set_block_lr()
        self.engine.step()
        self.after_engine_step()

    def set_block_lr(self) -> None:
        """The active block's lr for DeepSpeed's coming step: the block optimizer's scheduled lr times its
        after-switch warm-up, and the other hyperparameters its ``param_groups[0]`` holds now
        (:meth:`~bread_kernels.BlockOptimizer.set_base_hyperparameters`)."""
        self.block_optimizer.set_base_hyperparameters()

    def after_engine_step(self) -> bool:
        """The block optimizer's bookkeeping after DeepSpeed stepped at a boundary, and the block switch when due
        (DeepSpeed's stage-3 optimizer rebuilt for the new block).  Returns whether it switched.  A step DeepSpeed
        skipped (its optimizer's ``overflow``: an fp16 overflow, or a non-finite gradient norm in any dtype) is not
        counted, as a ``GradScaler`` that skips ``BlockOptimizer.step`` does not count it: the block trains
        ``switch_block_every`` real steps.  A long run of skipped steps (:data:`SKIPPED_STEPS_WARNING`) is warned
        about once."""
        if getattr(self.engine.optimizer, "overflow", False):
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row == max(SKIPPED_STEPS_WARNING, self.block_optimizer.switch_block_every):
                warnings.warn(f"bread_kernels: DeepSpeed skipped the last {self.skipped_in_a_row} steps (an fp16 "
                              "overflow or a non-finite gradient norm each time), none counted: block "
                              f"{self.block_optimizer.order.current} has trained none of them and the block schedule "
                              "waits for a step that is not skipped. Check the loss, the lr and the loss scale",
                              RuntimeWarning, stacklevel=2)
            return False
        self.skipped_in_a_row = 0
        if not self.block_optimizer.after_base_step():
            return False
        self._rebuild_zero_optimizer()
        self.switches += 1
        return True

    def _rebuild_zero_optimizer(self) -> None:
        """A fresh stage-3 optimizer for the block the block optimizer just activated (its base optimizer's
        groups): the old one's hooks removed, DeepSpeed's cached backward Functions dropped so the new coordinator
        makes its own, the root module it pushes on DeepSpeed's module stack once more and the old coordinators in
        DeepSpeed's release cache dropped (both would pile up over the run), and the engine's post-backward hook
        registered again as ``deepspeed.initialize`` does.  The loss scaler (fp16's dynamic scale and its overflow
        history) carries over, and so does a scale set with ``override_loss_scale``: a fresh optimizer would start
        again at the initial scale after every switch."""
        engine, base = self.engine, self.block_optimizer.base_optimizer
        old = engine.optimizer
        old.destroy()
        _drop_cached_backward_functions(engine.module)
        base.param_groups[:] = [g for g in base.param_groups if g["params"]]
        engine.basic_optimizer = base
        engine.optimizer = engine._configure_zero_optimizer(base)
        engine.optimizer.loss_scaler = old.loss_scaler
        # a scale the user set with override_loss_scale (it replaces the scaler's while set)
        engine.optimizer.custom_loss_scaler = old.custom_loss_scaler
        engine.optimizer.external_loss_scale = old.external_loss_scale
        forget_modules(engine.module, keep=1)
        clear_release_cache()
        _restore_kept_state(engine.optimizer, getattr(self.block_optimizer, "_kept_state", {}))
        if getattr(engine, "_support_torch_style_backward", False):
            engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)
        for rebuilt in self.on_rebuild:
            rebuilt(engine.optimizer)

    def destroy(self) -> None:
        """DeepSpeed's ``destroy``, after disconnecting the block optimizer and removing the LoRA leaves' hooks (and
        handing the engine's own methods back where :mod:`.trainer` routed them, but ``load_checkpoint``, which then
        refuses: the Trainer loads into the engine it destroyed at a second ``train()``); then
        the model is taken out of what DeepSpeed keeps after its own ``destroy`` (the modules' cached backward
        Functions, the global module stack, the release cache), so it is freed once the user drops it — and with it
        the process groups its parameters hold, which must go before interpreter shutdown (call
        ``deepspeed.comm.destroy_process_group()`` then, which drops DeepSpeed's own references to them too)."""
        self.block_optimizer.update_target.loss_scale = None  # disconnected: an engine made after is checked again
        self.block_optimizer.update_target.ds_engine = None
        self.block_optimizer._ds_engine = None
        unmark_lora_leaves(self.engine.module)
        self._recompute_scope.remove()
        routed = any(name in self.engine.__dict__ for name in ROUTED_METHODS)
        for name in ROUTED_METHODS:
            self.engine.__dict__.pop(name, None)
        if routed:  # the Trainer holds it: a second train() destroys it (accelerate's free_memory), then loads into it
            self.engine.load_checkpoint = _load_into_destroyed_engine
        self.engine.destroy()
        remove_module_hooks(self.engine)
        _drop_cached_backward_functions(self.engine.module)  # they close over the coordinator, which holds the model
        forget_modules(self.engine.module)  # else DeepSpeed's globals keep the model (and its process groups) alive
        clear_release_cache()


def _saved_block(load_dir, tag) -> int | None:
    """The block that was active when :meth:`ZeroBlockEngine.save_checkpoint` saved ``tag`` (None: no readable
    schedule there).  Read by each rank on its own, for an error message: no collective on an error path."""
    try:
        return int(torch.load(os.path.join(load_dir, str(tag), SCHEDULE_FILE), weights_only=True)["order"]["current"])
    except Exception:  # noqa: BLE001 - no schedule (DeepSpeed's own save), or not one of ours: the general message
        return None


def _load_into_destroyed_engine(*args, **kwargs):
    """``load_checkpoint`` of a destroyed engine that the Hugging Face Trainer held: refused before anything loads
    (DeepSpeed's own would load the weights into the partitioned model with no engine left to train them)."""
    raise RuntimeError("bread_kernels: a checkpoint load into the DeepSpeed engine that the integration's destroy() "
                       "took down; nothing was loaded. The Hugging Face Trainer does this at a second train() of a "
                       "Trainer with deepspeed= (accelerate's free_memory destroys the first train()'s engine, and "
                       "transformers builds no new one), which is not supported: build a new Trainer and model to "
                       "resume from the checkpoint")


def _drop_cached_backward_functions(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name in CACHED_BACKWARD_FUNCTIONS:
            module.__dict__.pop(name, None)


class _LossScale:
    """The engine's current loss scale (fp16; 1.0 otherwise), read weakly: the shards target lives on the model's
    plans, and the model must not keep the engine alive."""

    def __init__(self, ds_engine):
        self.engine = weakref.ref(ds_engine)

    def __call__(self) -> float:
        engine = self.engine()
        if engine is None:
            return 1.0
        return float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)


@torch.no_grad()
def _restore_kept_state(zopt, kept: dict) -> None:
    """Write the kept adapters' optimizer state (see ``ZeroBlockOptimizer._kept_adapter_state``) into the freshly
    built stage-3 optimizer, whose flat groups keep them apart from fresh parameters."""
    if not kept:
        return
    for group in zopt.fp16_groups:
        for p in group:
            entry = kept.get(id(p))
            if entry is None:
                continue
            index, offset, numel = zopt.grad_position[zopt.get_param_id(p)]
            flat = zopt.fp32_partitioned_groups_flat[index]
            state = zopt.optimizer.state[flat]
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == 1:
                    if key not in state:
                        state[key] = torch.zeros_like(flat)
                    state[key].narrow(0, offset, numel).copy_(value)
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else value


def initialize(model: torch.nn.Module, optimizer: ZeroBlockOptimizer, config, **kwargs: Any) -> ZeroBlockEngine:
    """``deepspeed.initialize`` for a patched model trained by a :class:`ZeroBlockOptimizer`.

    ``config`` is the DeepSpeed config (dict or JSON path), checked by :func:`check_config`;
    ``zero_allow_untested_optimizer`` is set (the base optimizer is whatever the user chose).  Extra keyword
    arguments go to ``deepspeed.initialize``.  Returns the :class:`ZeroBlockEngine` to train with.
    """
    import deepspeed

    if not isinstance(optimizer, ZeroBlockOptimizer):
        raise TypeError(f"initialize: optimizer must be a bread_kernels.integrations.deepspeed.ZeroBlockOptimizer "
                        f"(BlockOptimizer's arguments), got {type(optimizer).__name__}")
    if optimizer.model is not None and model is not optimizer.model:
        raise ValueError(f"initialize: the ZeroBlockOptimizer was built over the parameters of another model (a "
                         f"{type(optimizer.model).__name__}) than the {type(model).__name__} given; pass the patched "
                         "model whose named_parameters() the optimizer was built over")
    if "model_parameters" in kwargs or "lr_scheduler" in kwargs:
        raise ValueError("initialize: the block optimizer chooses the trained parameters; schedule the lr with a "
                         "torch scheduler on the ZeroBlockOptimizer instead of DeepSpeed's lr_scheduler")
    check_version()
    config = dict(check_config(config))
    config.setdefault("zero_allow_untested_optimizer", True)
    problems = internals_problems()
    if problems:
        raise RuntimeError(f"bread_kernels: this DeepSpeed lacks internals the integration needs: {problems}")
    base = optimizer.base_optimizer
    base.param_groups[:] = [g for g in base.param_groups if g["params"]]
    mark_lora_leaves(model)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=config, **kwargs)
    return ZeroBlockEngine(ds_engine, optimizer)
