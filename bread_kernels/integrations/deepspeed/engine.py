"""``initialize``: ``deepspeed.initialize`` for a block-optimized model, and the engine that rebuilds DeepSpeed's
stage-3 optimizer for the new active block at every switch."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ...functions.recompute import register_recompute_scope
from .config import check_config
from .internals import CACHED_BACKWARD_FUNCTIONS, check_version, clear_release_cache, forget_modules, \
    internals_problems, module_stack_restored
from .lora_leaves import mark_lora_leaves, unmark_lora_leaves
from .optimizer import ZeroBlockOptimizer

__all__ = ["ZeroBlockEngine", "initialize"]


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

    def save_checkpoint(self, save_dir, *args: Any, **kwargs: Any):
        """DeepSpeed's ``save_checkpoint``, refused where it would lose weights: it holds its optimizer's parameters
        (the active block's, the adapters) and the frozen ones, not the parameters a hook updates on the fly (the
        norms under ``sgd_mode`` "all"/"partial"), which require grad without being in its optimizer."""
        lost = self.block_optimizer.driver.unfused_on_the_fly
        if lost:
            raise ValueError(f"ZeroBlockEngine.save_checkpoint: DeepSpeed's checkpoint would leave out the {len(lost)} "
                             f"parameters updated on the fly by hooks ({', '.join(lost[:3])}, ...): loaded, they would "
                             "come back at their initial values. Save the weights gathered instead "
                             "(engine.save_16bit_model(dir), with zero_optimization."
                             "stage3_gather_16bit_weights_on_model_save set to true, or model.state_dict() inside "
                             "deepspeed.zero.GatheredParameters), and start the next run from them")
        return self.engine.save_checkpoint(save_dir, *args, **kwargs)

    def load_checkpoint(self, load_dir, *args: Any, **kwargs: Any):
        """DeepSpeed's ``load_checkpoint``; a checkpoint saved with another block active is refused with the
        remedy (DeepSpeed fails on the first parameter it trained then and does not now)."""
        try:
            return self.engine.load_checkpoint(load_dir, *args, **kwargs)
        except KeyError as exc:
            if not (exc.args and exc.args[0] in self.block_optimizer.names):  # not a parameter: DeepSpeed's own error
                raise
            raise ValueError(f"ZeroBlockEngine.load_checkpoint: the checkpoint has no {exc} where this run expects "
                             "it: it was saved with another block active. Build the ZeroBlockOptimizer with "
                             "start_block= the block that was active then (the block order and the step count start "
                             "afresh: an exact resume is not implemented under ZeRO-3)") from exc

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
        self.switches += 1

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
