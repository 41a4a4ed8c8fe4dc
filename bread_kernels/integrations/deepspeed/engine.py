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
    default_checkpoint_tag, forget_modules, internals_problems, latest_checkpoint_tag, module_stack_restored
from .lora_leaves import mark_lora_leaves, unmark_lora_leaves
from .optimizer import ZeroBlockOptimizer

__all__ = ["ZeroBlockEngine", "initialize", "SCHEDULE_FILE"]

#: the block optimizer's schedule in a checkpoint's folder, beside DeepSpeed's files
SCHEDULE_FILE = "bread_kernels_block_schedule.pt"


class ZeroBlockEngine:
    """A DeepSpeed engine plus the block optimizer's schedule: ``engine(...)``, ``backward(loss)``, ``step()``.

    Everything else is forwarded to the DeepSpeed engine (``engine.module``, ``engine.save_checkpoint``, ...).
    """

    def __init__(self, ds_engine, optimizer: ZeroBlockOptimizer):
        self.engine = ds_engine
        self.block_optimizer = optimizer
        self.switches = 0
        optimizer._ds_engine = ds_engine
        optimizer.update_target.loss_scale = _LossScale(ds_engine)
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
        """DeepSpeed's ``save_checkpoint`` (same arguments; every rank calls it), plus what an exact resume by
        :meth:`load_checkpoint` needs and DeepSpeed does not hold:

        * the block optimizer's schedule (:meth:`~bread_kernels.BlockOptimizer.schedule_state`: block order, step
          counters, the stochastic rounding's draw counter, the scheduled lr) and its optimizer groups' layout,
          written by rank 0 (of the node, with node-local storage, as DeepSpeed's ``latest``) into the checkpoint's
          folder as :data:`SCHEDULE_FILE`;
        * the parameters a hook updates on the fly (the norms under ``sgd_mode`` "all"/"partial"), which require grad
          outside DeepSpeed's optimizer: saved with the frozen parameters, each rank its shard.

        A torch lr scheduler on the block optimizer is the caller's to save, e.g. in ``client_state``.
        ``exclude_frozen_parameters=True`` is refused: under block-coordinate descent the frozen parameters include
        the blocks trained earlier in the run."""
        if exclude_frozen_parameters:
            raise ValueError("ZeroBlockEngine.save_checkpoint: exclude_frozen_parameters=True would leave out the "
                             "frozen parameters, which under block-coordinate descent include every block trained "
                             "earlier in the run (a resumed run would start them from their initial values); save "
                             "them (the default)")
        opt = self.block_optimizer
        tag = default_checkpoint_tag(self.engine) if tag is None else str(tag)
        schedule = {**opt.schedule_state(), "group_layout": opt.group_layout}
        with checkpointed_as_frozen(self._hook_updated()):
            saved = self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)
        rank = self.engine.local_rank if self.engine.use_node_local_storage() else self.engine.global_rank
        if rank == 0:
            torch.save(schedule, os.path.join(save_dir, tag, SCHEDULE_FILE))
        if dist.is_initialized():
            dist.barrier()  # the schedule is there for every rank once the save returns
        return saved

    def load_checkpoint(self, load_dir, tag=None, *args: Any, **kwargs: Any):
        """DeepSpeed's ``load_checkpoint`` (same arguments; returns its ``(load_path, client_state)``), resuming
        where :meth:`save_checkpoint` left off: the block optimizer takes the saved schedule, the saved block becomes
        active with the saved optimizer groups and DeepSpeed's stage-3 optimizer is rebuilt for them, and then
        DeepSpeed loads the weights (the hook-updated ones with the frozen ones) and the optimizer state.  The next
        steps train as the uninterrupted run would have.  As DeepSpeed says for ZeRO-3, load into an engine that
        has not trained yet.

        A schedule that does not fit this optimizer (other blocks) is refused before anything is loaded.  A
        checkpoint without the schedule (saved by DeepSpeed's own ``save_checkpoint``) loads as DeepSpeed loads it,
        the block schedule starting afresh (a warning says so); if it was saved with another block active, the
        error names ``start_block=``.  If DeepSpeed's load fails, the block optimizer is back at its previous block
        and schedule, with a fresh stage-3 optimizer; the weights DeepSpeed had loaded by then stay."""
        if tag is None:
            tag = latest_checkpoint_tag(self.engine, load_dir)
        path = os.path.join(load_dir, str(tag), SCHEDULE_FILE) if tag is not None else None
        if path is None or not os.path.isfile(path):
            if tag is not None:
                warnings.warn(f"ZeroBlockEngine.load_checkpoint: {os.path.join(load_dir, str(tag))} has no "
                              f"{SCHEDULE_FILE} (saved by DeepSpeed's own save_checkpoint, not ZeroBlockEngine's): "
                              "the weights and the active block's optimizer state load, the block order and the step "
                              "counters start afresh", RuntimeWarning, stacklevel=2)
            return self._load_deepspeed(load_dir, tag, *args, **kwargs)
        opt = self.block_optimizer
        schedule = torch.load(path, weights_only=True)
        opt.check_schedule_state(schedule, "ZeroBlockEngine.load_checkpoint")
        previous = {**opt.schedule_state(), "group_layout": opt.group_layout}
        try:
            self._take_schedule(schedule)
            with checkpointed_as_frozen(self._hook_updated()):
                loaded = self._load_deepspeed(load_dir, tag, *args, **kwargs)
        except Exception:
            self._take_schedule(previous)
            raise
        opt.restore_measured(schedule)
        return loaded

    def _take_schedule(self, schedule: dict) -> None:
        opt = self.block_optimizer
        opt.load_schedule_state(schedule)
        opt.activate_as_saved(opt.order.current, schedule["group_layout"])
        self._rebuild_zero_optimizer()

    def _load_deepspeed(self, load_dir, tag, *args: Any, **kwargs: Any):
        """DeepSpeed's load; a checkpoint saved with another block active is refused with the remedy (DeepSpeed fails
        on the first parameter it trained then and does not now)."""
        try:
            return self.engine.load_checkpoint(load_dir, tag, *args, **kwargs)
        except KeyError as exc:
            if not (exc.args and exc.args[0] in self.block_optimizer.names):  # not a parameter: DeepSpeed's own error
                raise
            raise ValueError(f"ZeroBlockEngine.load_checkpoint: the checkpoint has no {exc} where this run expects "
                             "it: it was saved with another block active by DeepSpeed's own save_checkpoint, without "
                             "the block schedule. Build the ZeroBlockOptimizer with start_block= the block that was "
                             "active then (the block order and the step count start afresh), or save with "
                             "ZeroBlockEngine.save_checkpoint") from exc

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
        opt = self.block_optimizer
        lr = opt.block_lr()
        for group in opt.base_optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if opt.after_base_step():
            self._rebuild_zero_optimizer()
            self.switches += 1

    def _rebuild_zero_optimizer(self) -> None:
        """A fresh stage-3 optimizer for the block the block optimizer just activated (its base optimizer's
        groups): the old one's hooks removed, DeepSpeed's cached backward Functions dropped so the new coordinator
        makes its own, the root module it pushes on DeepSpeed's module stack once more and the old coordinators in
        DeepSpeed's release cache dropped (both would pile up over the run), and the engine's post-backward hook
        registered again as ``deepspeed.initialize`` does."""
        engine, base = self.engine, self.block_optimizer.base_optimizer
        engine.optimizer.destroy()
        _drop_cached_backward_functions(engine.module)
        base.param_groups[:] = [g for g in base.param_groups if g["params"]]
        engine.basic_optimizer = base
        engine.optimizer = engine._configure_zero_optimizer(base)
        forget_modules(engine.module, keep=1)
        clear_release_cache()
        _restore_kept_state(engine.optimizer, getattr(self.block_optimizer, "_kept_state", {}))
        if getattr(engine, "_support_torch_style_backward", False):
            engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)

    def destroy(self) -> None:
        """DeepSpeed's ``destroy``, after disconnecting the block optimizer and removing the LoRA leaves' hooks; then
        the model is taken out of what DeepSpeed keeps after its own ``destroy`` (the modules' cached backward
        Functions, the global module stack, the release cache), so it is freed once the user drops it — and with it
        the process groups its parameters hold, which must go before interpreter shutdown (call
        ``deepspeed.comm.destroy_process_group()`` then, which drops DeepSpeed's own references to them too)."""
        self.block_optimizer.update_target.loss_scale = lambda: 1.0
        self.block_optimizer._ds_engine = None
        unmark_lora_leaves(self.engine.module)
        self._recompute_scope.remove()
        self.engine.destroy()
        _drop_cached_backward_functions(self.engine.module)  # they close over the coordinator, which holds the model
        forget_modules(self.engine.module)  # else DeepSpeed's globals keep the model (and its process groups) alive
        clear_release_cache()


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
