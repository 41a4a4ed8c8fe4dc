"""``BlockOptimizer``: BAdam / BREAD-SGD block-coordinate descent, a drop-in for Microsoft BlockOptimizers' class.

Every step the *active* block (one or ``n_layer_per_block`` layers, plus ``active_modules``) is trained by the base
optimizer (Adam, AdamW, ...; state reset at every switch; an fp32 master copy for bf16/fp16 parameters).  The other
parameters are, by ``sgd_mode``:

* ``"disabled"`` (BAdam): frozen.
* ``"all"`` (BREAD-SGD): every inactive parameter takes ``p -= lr · sgd_lr_scaling · g`` (``sign(g)`` with
  ``sgd_use_sign``) during each backward, with ``lr`` the scheduled lr (``param_groups[0]["lr"]``) at that moment.
* ``"partial"`` (BREAD-SGD-partial): the same, only for the inactive parameters after the first active one in
  ``named_parameters_list`` order (the layers above the active block, the final norm, the head).

On a peft LoRA model (BREAD) the adapters follow ``lora_mode``: ``"all"`` trains every adapter every step,
``"partial"`` those of the active block and above, ``"adapter_only"`` only the active block's (its base weights
then stay frozen).  Adapters are trained by the base optimizer with the active block and keep their state across
switches while they stay trained; ``sgd_mode`` applies to the inactive base weights, never to adapters.

On a model patched by :func:`bread_kernels.patch` the optimizer drives the engine by writing a plan at every switch:
each Linear weight's and MoE expert weight's :class:`~bread_kernels.Role` (the on-the-fly updates fused into the
backward, no ``.grad``) and the cut (blocks below it run without autograd); the input embedding's update touches only the rows of the
batch's tokens.  Parameters outside the fused modules (norms, a tied embedding and head) get the update from a
post-accumulate-grad hook, as in the reference.  Without ``patch`` everything
goes through hooks (the reference's slow path) and a warning says so once.

Deliberate differences from the reference ``block_optim.py`` (see the README):

* the block switches after exactly ``switch_block_every`` steps (the reference switches after
  ``switch_block_every - 1`` steps for the first block);
* normalisation weights go to the no-weight-decay group with biases (the reference's ``isinstance`` check on a
  parameter never matches, so it decays them); the weights decay with the decay of the groups holding them (the
  reference takes the first group's, 0 where the no-decay group comes first);
* the base optimizer steps with every hyperparameter ``param_groups[0]`` holds at that step (the reference passes on
  the lr alone), and without an lr where it has none (Adafactor's relative steps);
* ``init_avgsq_scale`` is not implemented and refused; it and ``log_fn`` are keyword-only (the positional
  arguments are the reference's, in its order); ``switch_mode="fixed"`` needs ``start_block``;
* ``n_layer_per_block`` groups consecutive layers; the embedding stays a block of its own;
* bf16/fp16 on-the-fly updates round stochastically by default (``rounding="nearest"`` gives the reference's).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import defaultdict
from typing import Callable

import torch

from ..patch import block_stacks, patched_state, stack_prefixes
from ..peft_lora import is_adapter_name, non_lora_adapter_names
from ..plan import OnTheFlyUpdate, Role, Rounding
from .blocks import SWITCH_MODES, BlockOrder, infer_blocks, layer_prefixes
from .driver import (EngineDriver, WeaklyHeld, check_loss_scaler, check_named_parameters, owning_patched_model,
                     refuse_untrainable_targets, take_over_parameters)
from .masters import Fp32Masters
from .roles import LORA_MODES, SGD_MODES, no_decay_names, roles_for_block

__all__ = ["BlockOptimizer"]

_warned_slow_path = False


class BlockOptimizer(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` to train one block at a time (the constructor of BlockOptimizers' class).

    Args:
        base_optimizer: the optimizer that trains the active block (Adam, AdamW, SGD, ...), built over the model's
            parameters; its state is reset at every switch, its first group's ``weight_decay`` and defaults are
            used for the active block's groups.
        named_parameters_list: ``list(model.named_parameters())``.
        block_prefix_list: the blocks, each a list of name prefixes (substrings); None infers one block per
            layer of every block stack: the reference's name patterns' (an encoder's and a decoder's layers,
            a vision tower's and a language model's), or on a patched model whose stack they miss (BERT, T5) every
            stack found structurally.  Blocks outside the stack ``patch`` streams train exactly, through plain
            autograd and hooks (a warning says so).
        switch_block_every: optimizer steps per block.
        start_block: index of the first block; required by ``switch_mode="fixed"``.
        switch_mode: ``"descending"``, ``"ascending"``, ``"random"`` or ``"fixed"``.
        active_modules: name prefixes trained with every block (e.g. the final norm).
        include_embedding: the input embedding is a block of its own (when ``block_prefix_list`` is inferred).
        include_lm_head: the parameters outside the layers form a last block (when inferred).
        verbose: 1 prints the active block at each switch (rank 0), 0 is silent.
        lora_mode: with peft LoRA adapters: ``"all"``, ``"partial"`` or ``"adapter_only"`` (see the module
            docstring).
        n_layer_per_block: consecutive layers per inferred block.
        lr_warmup_step_afterswitch: linear warm-up of the base optimizer's lr over this many steps after each
            switch once ``global_step`` has reached it (as the reference: from the first switch on where it is at
            most ``switch_block_every``), or None.
        sgd_mode: ``"disabled"`` (BAdam), ``"all"`` (BREAD-SGD) or ``"partial"`` (BREAD-SGD-partial).
        sgd_lr_scaling: ``s`` of the on-the-fly update ``W -= lr·s·dW``; a finite number >= 0.
        sgd_use_sign: the on-the-fly update is ``W -= lr·s·sign(dW)`` (signSGD).
        log_fn: keyword-only (the arguments before it are the reference's, in its order; BAdam's class takes
            ``log_fn`` after ``verbose``); called with a dict at each switch (``block_optimizer/active_block``,
            ``.../global_step``).
        init_avgsq_scale: keyword-only (the reference's first release had it); not implemented, must be False.
        rounding: keyword-only; ``"auto"`` (stochastic for bf16/fp16 weights), ``"nearest"`` or ``"stochastic"``.
        seed: keyword-only; seeds the stochastic rounding of the on-the-fly updates.
        loss_scaler: keyword-only; the ``torch.amp.GradScaler`` that scales the loss (fp16): the on-the-fly updates
            divide its scale out and skip a weight whose scaled gradient overflowed (see
            :meth:`~bread_kernels.EngineDriver.set_loss_scaler`).  Hugging Face's Trainer: ``BreadCallback`` passes
            the Trainer's own.  Left out, a forward under a float16 autocast with SGD updates on the fly is refused
            (:meth:`~bread_kernels.EngineDriver.check_loss_scaler_given`); an unscaled fp16 loss says so with
            ``torch.amp.GradScaler(enabled=False)``.

    One optimizer owns a parameter at a time: building a second one over parameters of a live one closes the
    first (with a warning) and takes them over, so re-running a notebook cell or a sweep's next trial never
    leaves two sets of hooks on one model.  :meth:`close` (or :func:`bread_kernels.unpatch`) removes every hook
    and plan; an optimizer that is dropped without ``close`` removes its hooks when it is collected.
    """

    model = WeaklyHeld()
    engine = WeaklyHeld()
    #: where the on-the-fly updates write (None: the tensors themselves); the ZeRO-3 optimizer supplies shards
    update_target = None
    #: fp32 masters for low-precision active parameters (DeepSpeed keeps its own under ZeRO-3)
    makes_fp32_masters = True

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters_list,
        block_prefix_list: list[list[str]] | None = None,
        switch_block_every: int = 50,
        start_block: int | None = None,
        switch_mode: str = "descending",
        active_modules: list[str] = [],  # noqa: B006 - the reference's signature
        include_embedding: bool = False,
        include_lm_head: bool = False,
        verbose: int = 1,
        lora_mode: str = "all",
        n_layer_per_block: int = 1,
        lr_warmup_step_afterswitch: int | None = None,
        sgd_mode: str = "disabled",
        sgd_lr_scaling: float = 1.0,
        sgd_use_sign: bool = False,
        *,
        log_fn: Callable | None = None,
        init_avgsq_scale: bool | float = False,
        rounding: str | Rounding = Rounding.AUTO,
        seed: int = 0,
        loss_scaler=None,
    ):
        _check_arguments(base_optimizer, switch_block_every, start_block, switch_mode, active_modules,
                         include_embedding, include_lm_head, verbose, log_fn, lora_mode, n_layer_per_block,
                         lr_warmup_step_afterswitch, init_avgsq_scale, sgd_mode, sgd_lr_scaling, sgd_use_sign,
                         rounding, seed)
        check_loss_scaler(loss_scaler, "BlockOptimizer")
        self._closed = True  # until construction succeeds: close() does nothing
        self.named_parameters_list = check_named_parameters(named_parameters_list, "BlockOptimizer")
        self.names = [n for n, _ in self.named_parameters_list]
        _refuse_adapter_only_without_adapters(self.names, lora_mode)
        self.lora_mode, self.sgd_mode, self.sgd_use_sign = lora_mode, sgd_mode, sgd_use_sign
        self.active_modules = list(active_modules)
        # the blocks are checked before a previous owner of the parameters is closed: a refused argument leaves it
        # driving the model
        self._find_model()
        blocks = (block_prefix_list, include_embedding, include_lm_head, n_layer_per_block)
        self.block_prefix_list = self._checked_blocks(*blocks, start_block, switch_mode)
        # closing a previous owner may unpatch the model (an accelerate() that patched it): the blocks are then
        # inferred again, for the model as it is
        take_over_parameters(self.named_parameters_list, "BlockOptimizer")
        engine = self.engine
        self._find_model()
        if self.engine is not engine and block_prefix_list is None:
            self.block_prefix_list = self._checked_blocks(*blocks, start_block, switch_mode)
        self.block_num = len(self.block_prefix_list)
        self.order = BlockOrder(self.block_num, switch_mode, start_block)
        self.switch_mode = switch_mode
        self.switch_block_every = switch_block_every
        self.verbose, self.log_fn = verbose, log_fn
        self.lr_warmup_step_afterswitch = lr_warmup_step_afterswitch
        self.global_step = 0
        self.block_step = 0

        self.base_optimizer = base_optimizer
        self.base_defaults = {k: v for k, v in base_optimizer.defaults.items() if k != "weight_decay"}
        # the user's groups (every parameter) stay ours: schedulers write their lr, zero_grad clears everything
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._groups_fixed = True  # add_param_group is refused from here on

        self.update = OnTheFlyUpdate(lr=_ScheduledLr(self), scale=float(sgd_lr_scaling), rounding=rounding, seed=seed)
        self.roles: dict[str, Role] = {}
        self.masters = Fp32Masters()
        self._no_decay = no_decay_names(self.names, self._norm_parameter_names())
        self.weight_decay = self._decayed_groups_weight_decay()
        self._active_names: set[str] = set()

        # the plans, requires_grad flags, hooks and cut: the protocol every BCD library drives the engine with
        self.driver = EngineDriver(self.named_parameters_list, update=self.update, owner=self,
                                   update_target=self.update_target, what="BlockOptimizer")
        try:  # a refusal of the first block's roles (set_roles) leaves no hooks and no owner of the parameters
            if loss_scaler is not None:
                self.driver.set_loss_scaler(loss_scaler)
            if self.engine is None:
                _warn_slow_path()
            _warn_non_lora_adapters(self.names, lora_mode, sgd_mode)
            self._closed = False
            self._activate(self.order.current)
        except BaseException:
            self._closed = True
            self.driver.close()
            raise

    def _find_model(self) -> None:
        """The patched model the parameters belong to (None: the slow path) and its engine, checked unchanged."""
        self.model = owning_patched_model(self.named_parameters_list, "BlockOptimizer")
        self.engine = patched_state(self.model) if self.model is not None else None
        if self.engine is not None:  # before the blocks are inferred from what patch found
            self.engine.check_unchanged_since_patch()

    def _checked_blocks(self, block_prefix_list, include_embedding: bool, include_lm_head: bool,
                        n_layer_per_block: int, start_block: int | None, switch_mode: str) -> list[list[str]]:
        """``block_prefix_list`` (inferred where None), refused unless every prefix names a parameter, ``start_block``
        is one of the blocks and every block has something to train.  Touches nothing."""
        if block_prefix_list is None:
            layers, embedding_prefix = layer_prefixes(self.names), None
            if self.engine is not None:
                stacks = [stack_prefixes(name, len(stack)) for name, stack in block_stacks(self.model)]
                layers = layer_prefixes(self.names, self.engine.block_prefixes(), stacks)
                embedding_prefix = self._module_prefix(self.engine.embedding)
            block_prefix_list = infer_blocks(self.names, layers, embedding_prefix, include_embedding,
                                             include_lm_head, n_layer_per_block)
            if self.lora_mode == "adapter_only":
                block_prefix_list = _blocks_holding_adapters(block_prefix_list, self.names)
            if self.engine is not None:
                _warn_unstreamed_layers(block_prefix_list, layers, self.engine.block_prefixes())
        if not isinstance(block_prefix_list, list) or not block_prefix_list or \
                not all(isinstance(b, list) and all(isinstance(p, str) for p in b) for b in block_prefix_list):
            raise ValueError("BlockOptimizer: block_prefix_list must be a non-empty list of lists of name prefixes")
        for block in block_prefix_list:
            for prefix in block:
                if not any(prefix in n for n in self.names):
                    raise ValueError(f"BlockOptimizer: block prefix {prefix!r} matches no parameter name")
        for prefix in self.active_modules:
            if not any(prefix in n for n in self.names):
                raise ValueError(f"BlockOptimizer: active_modules entry {prefix!r} matches no parameter name")
        BlockOrder.check(len(block_prefix_list), switch_mode, start_block)
        for index, block in enumerate(block_prefix_list):  # every block must be trainable before anything is touched
            roles, when = self._roles(index, block), f" while block {index} is active"
            refuse_untrainable_targets(self.named_parameters_list, roles, "BlockOptimizer", when)
        return block_prefix_list

    # -- lifetime -----------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove this optimizer's hooks and the plans it wrote on the patched model (whose fused modules then run
        plain autograd and whose backward reaches every block again).  ``step()`` raises afterwards.  Idempotent;
        :func:`bread_kernels.unpatch` calls it."""
        if self._closed:
            return
        self._closed = True
        self.driver.close()  # the skips of a backward since the last step are still said (closed even if it warns)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"BlockOptimizer.{what}: this optimizer was closed (by close(), unpatch(model), or a "
                               "newer BlockOptimizer over the same parameters); build a new one to train on")

    # -- structure ----------------------------------------------------------------------------------------------
    def _module_prefix(self, module) -> str | None:
        if module is None or self.model is None:
            return None
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}." if name else ""
        return None

    def _norm_parameter_names(self) -> set[str] | None:
        if self.model is None:
            return None
        return {f"{mname}.{p}" if mname else p for mname, module in self.model.named_modules()
                if "norm" in type(module).__name__.lower() for p, _ in module.named_parameters(recurse=False)}

    def _decayed_groups_weight_decay(self) -> float:
        """The weight decay of the active block's decayed group: that of the base optimizer's groups holding the
        parameters decayed here (weights; biases and norms take none).  The reference takes the first group's, which
        drops the decay of a layout that lists the no-decay group first (LLaMA-Factory's BAdam:
        ``[dict(params=nodecay, weight_decay=0.0), dict(params=decay, weight_decay=wd)]``).  Groups that give those
        parameters different decays keep the first group's, and a warning says so."""
        first = self.param_groups[0].get("weight_decay", 0.0)
        decayed = {id(p) for n, p in self.named_parameters_list if n not in self._no_decay}
        values = list(dict.fromkeys(group.get("weight_decay", 0.0) for group in self.param_groups
                                    if any(id(p) in decayed for p in group["params"])))
        if len(values) == 1:
            return values[0]
        if values:
            warnings.warn(f"BlockOptimizer: the base optimizer's groups give the weights different weight decays "
                          f"({values}); the active block's weights train with the first group's ({first}), biases "
                          "and norms with none", UserWarning, stacklevel=4)
        return first

    @property
    def active_param_prefixs(self) -> list[str]:  # the reference's attribute name
        return self.block_prefix_list[self.order.current] + self.active_modules

    # -- plan ---------------------------------------------------------------------------------------------------
    def roles_for(self, block_index: int) -> dict[str, Role]:
        """Each parameter's Role while block ``block_index`` is active."""
        return self._roles(block_index, self.block_prefix_list[block_index])

    def _roles(self, block_index: int, block: list[str]) -> dict[str, Role]:
        """Each parameter's Role while ``block`` (block ``block_index``, also before it is in the list) is active."""
        try:
            return roles_for_block(self.names, block + self.active_modules,
                                   sgd_mode=self.sgd_mode, sign=self.sgd_use_sign, lora_mode=self.lora_mode)
        except ValueError as exc:
            raise ValueError(f"BlockOptimizer: block {block_index}: {exc}") from None

    def _activate(self, block_index: int) -> None:
        """Write the plan for ``block_index``: roles, requires_grad, fused plans, the cut, the base optimizer."""
        roles = self.roles_for(block_index)
        self.roles = roles
        active = self.driver.set_roles(roles)

        # LoRA adapters that stay active keep their master copy and their base-optimizer state across the switch
        # (they are trained across the whole run); everything else starts afresh, as in the reference
        trained = [(name, p, is_adapter_name(name) and name in self._active_names) for name, p in active]
        if self.makes_fp32_masters:
            targets = self.masters.rebuild(trained)
        else:
            targets = [p for _, p, _ in trained]
        self._targets = [(name, p, target) for (name, p, _), target in zip(trained, targets)]
        old_state = self.base_optimizer.state
        state = defaultdict(dict)
        decay, no_decay = [], []
        for (name, _, keep), target in zip(trained, targets):
            if keep and target in old_state:
                state[target] = old_state[target]
            (no_decay if name in self._no_decay else decay).append(target)
        self._active_names = {n for n, r in roles.items() if r is Role.ACTIVE}
        groups = [{"params": decay, **self.base_defaults, "weight_decay": self.weight_decay},
                  {"params": no_decay, **self.base_defaults, "weight_decay": 0.0}]
        self.base_optimizer.param_groups = [g for g in groups if g["params"]]
        self.base_optimizer.state = state
        if self.verbose >= 1 and _is_rank_zero():
            print(f"BlockOptimizer: training block {block_index}: {self.active_param_prefixs}")
        if self.log_fn is not None:
            self.log_fn({"block_optimizer/active_block": block_index, "block_optimizer/global_step": self.global_step})

    # -- stepping -----------------------------------------------------------------------------------------------
    def _lr_correction(self) -> float:
        warmup = self.lr_warmup_step_afterswitch
        if warmup is None or self.global_step < warmup:
            return 1.0
        return min(1.0, (self.block_step + 1) / warmup)

    def block_lr(self) -> float | None:
        """The base optimizer's lr for this step: the scheduled lr (``param_groups[0]["lr"]``) times the
        after-switch warm-up factor; None where the base optimizer has none (Adafactor with ``relative_step``, which
        computes its own step size; the optimizer refuses it at construction with a warm-up or on-the-fly updates,
        which need an lr)."""
        lr = self.param_groups[0]["lr"]
        return None if lr is None else lr * self._lr_correction()

    def set_base_hyperparameters(self) -> None:
        """Give the base optimizer's groups this step's hyperparameters: :meth:`block_lr`, and every other
        hyperparameter of the base optimizer (``betas``, ``momentum``, ``eps``, ...) as ``param_groups[0]`` holds it
        now, so that what a scheduler writes there besides the lr (``OneCycleLR``'s momentum cycle) or a hand edit
        trains the active block, as the lr does.  The weight decay stays the groups' own (the decayed group's, 0 for
        biases and norms)."""
        scheduled = self.param_groups[0]
        values = {key: scheduled[key] for key in self.base_defaults if key != "lr" and key in scheduled}
        values["lr"] = self.block_lr()
        for group in self.base_optimizer.param_groups:
            group.update(values)

    def add_param_group(self, param_group: dict) -> None:
        """Refused once the optimizer is built: its blocks, roles, hooks and plans come from
        ``named_parameters_list``, so the parameters of a group added later would never be trained."""
        if not self.__dict__.get("_groups_fixed", False):  # torch's __init__ adds the base optimizer's groups
            super().add_param_group(param_group)
            return
        raise ValueError("BlockOptimizer.add_param_group: a group added after the optimizer was built would never be "
                         "trained (its blocks, roles and hooks come from named_parameters_list); build the base "
                         "optimizer and the BlockOptimizer over every parameter to train, frozen ones included (the "
                         "block schedule decides what trains when)")

    def after_base_step(self) -> bool:
        """The bookkeeping after the base optimizer stepped (shared with the ZeRO-3 engine): report this step's
        skipped on-the-fly updates, advance the counters, and switch blocks when due.  Returns whether it switched."""
        self._report_skips()
        self.global_step += 1
        self.block_step += 1
        if self.block_step < self.switch_block_every:
            return False
        self.block_step = 0
        self._activate(self.order.advance())
        return True

    @torch.no_grad()
    def step(self, closure=None):
        self._check_open("step")
        self.driver.check_parameters_held("this step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_casts()
        self.set_base_hyperparameters()
        self.masters.grads_to_masters()
        self._warn_if_no_gradient()
        self.base_optimizer.step()
        self.masters.masters_to_params()
        # the active block's gradients are spent, as the reference's step drops them: none carries into the next
        # step, whatever zero_grad() reaches (a base optimizer built over a subset, a loop without zero_grad)
        for group in self.base_optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.after_base_step()
        return loss

    def _warn_if_no_gradient(self) -> None:
        """Warn where no parameter of the active block has a gradient at the step: the batch never reached the block
        (a vision tower under a text-only batch), so the base optimizer leaves it as it is.  Under BAdam the backward
        itself fails then, unless the input embeddings were made to require grad (the loss has no ``grad_fn``); with
        on-the-fly updates it runs and only they train, which would otherwise pass unnoticed, as in the reference.
        Once per block (Python's warning filter: the message names it).  A gradient zeroed in place
        (``zero_grad(set_to_none=False)``) counts as one: telling a zero one apart would read it on the host."""
        targets = [t for group in self.base_optimizer.param_groups for t in group["params"]]
        if not targets or any(t.grad is not None for t in targets):
            return
        warnings.warn(f"BlockOptimizer: no parameter of the active block {self.active_param_prefixs} has a gradient "
                      "at this step, so the step leaves the block as it is: the batch did not reach it (a vision or "
                      "audio tower under a batch without images or audio), or the step came without a backward. Give "
                      "its batches the inputs that reach it, or leave the block out (block_prefix_list, or "
                      "active_modules for modules every batch reaches)", UserWarning, stacklevel=5)

    def _follow_casts(self) -> None:
        """The active block's parameters cast since it was activated (``model.to(torch.bfloat16)`` after the
        optimizer was built) get the fp32 masters they would have had, as at a switch (a bf16 one without its master
        lost every Adam step below half an ulp until the next switch): the base optimizer steps the new targets,
        their state moved along in fp32."""
        if not self.makes_fp32_masters:
            return
        swap = self.masters.follow_casts(self._targets)
        if not swap:
            return
        self._targets = [(name, p, swap.get(id(target), target)) for name, p, target in self._targets]
        for group in self.base_optimizer.param_groups:
            group["params"] = [swap.get(id(target), target) for target in group["params"]]
        state = defaultdict(dict)
        for target, values in self.base_optimizer.state.items():
            state[swap.get(id(target), target)] = {
                key: value.float() if torch.is_tensor(value) and value.is_floating_point() else value
                for key, value in values.items()} if id(target) in swap else values
        self.base_optimizer.state = state

    def _report_skips(self) -> None:
        # the step's one host sync for the on-the-fly updates' finiteness
        self.driver.end_step(f"BlockOptimizer step {self.global_step}")

    @property
    def skipped_updates(self) -> int:
        """On-the-fly updates skipped so far (a non-finite gradient), reported at the steps."""
        return self.driver.skipped_updates

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.masters.zero_grad()

    # -- checkpoints --------------------------------------------------------------------------------------------
    def __getstate__(self):
        raise TypeError(f"bread_kernels: a {type(self).__name__} does not pickle or copy (it drives its model's plans "
                        "and hooks, and torch.optim.Optimizer's pickle would keep neither its block order nor its base "
                        "optimizer's state); save its state_dict() (torch.save(opt.state_dict(), ...)) and load it "
                        "into a new one built the same way over the model (load_state_dict)")

    def state_dict(self) -> dict:
        """What resumes the run exactly (see :meth:`load_state_dict`), through torch's state-dict hooks
        (``register_state_dict_pre_hook`` / ``register_state_dict_post_hook``: a post hook's return value is the
        state given)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            returned = post_hook(self, state)
            if returned is not None:
                state = returned
        return state

    def _state_dict(self) -> dict:
        return {"base_optimizer": self.base_optimizer.state_dict(), "masters": self.masters.state_dict(),
                "shapes": self._parameter_shapes(), **self.schedule_state()}

    def _parameter_shapes(self) -> dict[str, list[int]]:
        """Each parameter's shape by name: what tells a state saved from another model (other sizes, another LoRA
        rank) from this one's, which torch's ``Optimizer.load_state_dict`` takes without a look at the shapes."""
        return {name: list(p.shape) for name, p in self.named_parameters_list}

    def _variant(self) -> dict:
        """What the optimizer does besides the block schedule: the base optimizer's class (another one's state loads
        into torch's optimizers without a word — Adam's into Adamax fails at the step, Adam's and AdamW's carry each
        other's hyperparameters over), the on-the-fly rule (``sgd_mode``, and ``sgd_use_sign`` where there is one)
        and, with LoRA adapters among the parameters, ``lora_mode``."""
        variant = {"base_optimizer": type(self.base_optimizer).__qualname__, "sgd_mode": self.sgd_mode}
        if self.sgd_mode != "disabled":
            variant["sgd_use_sign"] = self.sgd_use_sign
        if any(is_adapter_name(name) for name in self.names):
            variant["lora_mode"] = self.lora_mode
        return variant

    def schedule_state(self) -> dict:
        """What :meth:`state_dict` holds besides the base optimizer's and the masters' state: the block order, the
        step counters, the on-the-fly updates' seed and draw counter, the scheduled lr, what each block index trains
        and what ``keep_top="auto"`` measured.  Plain Python values; the ZeRO-3 engine saves it beside DeepSpeed's
        checkpoint, which holds the rest."""
        return {
            "order": self.order.state_dict(),
            "global_step": self.global_step,
            "block_step": self.block_step,
            "update_draws": self.update.draws,
            "update_seed": self.update.seed,
            "lr": [g["lr"] for g in self.param_groups],
            # what keep_top="auto" measured for these plans: a resumed run keeps (and chunks its loss) as this one
            "kept_block_bytes": dict(self.engine.stream.block_bytes) if self.engine is not None else {},
            "blocks": [list(prefixes) for prefixes in self.block_prefix_list],  # what each block index trains
            "variant": self._variant(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict`.  A state that does not fit this optimizer (saved with other blocks:
        ``include_embedding``, ``include_lm_head``, ``n_layer_per_block``; another variant: ``sgd_mode``,
        ``sgd_use_sign``, ``lora_mode``; another base optimizer; a model of other parameter shapes) is refused with
        nothing changed.  torch's load hooks run around it (``register_load_state_dict_pre_hook``: its return
        value is what is loaded; ``register_load_state_dict_post_hook``: after a load that succeeded)."""
        self._check_open("load_state_dict")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        if not isinstance(state_dict, dict):
            raise TypeError(f"BlockOptimizer.load_state_dict: expected the dict BlockOptimizer.state_dict() returned "
                            f"(torch.load the file first), got {type(state_dict).__name__}")
        if {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("BlockOptimizer.load_state_dict: this is a torch optimizer's state_dict (what Microsoft "
                             "BlockOptimizers' and badam's BlockOptimizer save: the base optimizer's alone, without "
                             "the block order, step or fp32 masters); resume from a bread_kernels "
                             "BlockOptimizer.state_dict(), or start the run afresh (build it with start_block= to "
                             "continue at a block)")
        for key in ("base_optimizer", "masters"):
            if key not in state_dict:
                raise ValueError(f"BlockOptimizer.load_state_dict: missing {key!r}; is this a BlockOptimizer state?")
        self.check_schedule_state(state_dict, "BlockOptimizer.load_state_dict")
        self._check_shapes(state_dict.get("shapes"), "BlockOptimizer.load_state_dict")
        previous = self._state_dict()
        try:
            self._load(state_dict)
        except Exception as exc:
            self._load(previous)  # as it was: no half-loaded optimizer
            raise ValueError(f"BlockOptimizer.load_state_dict: the saved state does not fit this optimizer ({exc}); "
                             "nothing was changed. Build it as the saved run's was (blocks, base optimizer)") from exc
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def check_schedule_state(self, state: dict, what: str) -> None:
        """Refuse (``ValueError`` naming ``what`` and the remedy) a :meth:`schedule_state` that does not fit this
        optimizer: a key missing, other blocks, a block order outside them."""
        for key in ("order", "global_step", "block_step"):
            if key not in state:
                raise ValueError(f"{what}: missing {key!r}; is this a BlockOptimizer state?")
        order = state["order"]
        saved_blocks = [order.get("current", -1), *order.get("pending", [])]
        blocks = [list(prefixes) for prefixes in self.block_prefix_list]
        if "blocks" in state and state["blocks"] != blocks:  # an index means another block there
            raise ValueError(f"{what}: the saved run's blocks ({len(state['blocks'])}, the first "
                             f"{state['blocks'][0]}) are not this optimizer's ({len(blocks)}, the first {blocks[0]}); "
                             "build it with the saved run's include_embedding, include_lm_head, n_layer_per_block "
                             "and block_prefix_list")
        variant = self._variant()
        if "variant" in state and state["variant"] != variant:  # the same blocks, another algorithm
            raise ValueError(f"{what}: the saved run's variant ({_described(state['variant'])}) is not this "
                             f"optimizer's ({_described(variant)}); build it with the saved run's settings to resume "
                             "it, or, to go on with another variant, load the model's weights alone into a fresh "
                             "optimizer (start_block= continues at a block)")
        if not all(isinstance(i, int) and 0 <= i < self.block_num for i in saved_blocks):
            raise ValueError(f"{what}: the saved run's block order {saved_blocks} does not fit this optimizer's "
                             f"{self.block_num} blocks; build it with the saved run's include_embedding, "
                             "include_lm_head and n_layer_per_block")

    def _check_shapes(self, saved: dict | None, what: str) -> None:
        """Refuse a state saved over other parameters (another model's sizes, another LoRA rank, other names); a
        state saved without their shapes (before they were saved) is not checked."""
        if saved is None:
            return
        shapes = self._parameter_shapes()
        if saved.keys() != shapes.keys():
            extra, missing = sorted(saved.keys() - shapes.keys()), sorted(shapes.keys() - saved.keys())
            raise ValueError(f"{what}: the saved run's parameters are not this optimizer's (saved but not here: "
                             f"{extra[:3]}; here but not saved: {missing[:3]}); build it over the model the saved run "
                             "trained, with the same parameter list")
        name = next((n for n, shape in shapes.items() if list(saved[n]) != shape), None)
        if name is not None:
            raise ValueError(f"{what}: the saved run's {name} is {list(saved[name])}, this model's is {shapes[name]}: "
                             "the state was saved from another model (other sizes, another LoRA rank); load it into "
                             "an optimizer over the model the saved run trained")

    def load_schedule_state(self, state: dict) -> None:
        """Take the block order, counters, seed, draw counter and lr of a checked :meth:`schedule_state`; the caller
        then activates ``self.order.current`` and restores the measured block sizes (:meth:`restore_measured`)."""
        self.order.load_state_dict(state["order"])
        self.global_step, self.block_step = state["global_step"], state["block_step"]
        self.update.draws = state.get("update_draws", 0)
        self.update.seed = state.get("update_seed", self.update.seed)
        for group, lr in zip(self.param_groups, state.get("lr", [])):
            group["lr"] = lr

    def restore_measured(self, state: dict) -> None:
        """What ``keep_top="auto"`` measured in the saved run, after the plans were written (which start it afresh)."""
        if self.engine is not None:
            self.engine.stream.block_bytes.update(state.get("kept_block_bytes", {}))

    def _load(self, state_dict: dict) -> None:
        self.load_schedule_state(state_dict)
        self._activate(self.order.current)
        self.restore_measured(state_dict)
        self.masters.load_state_dict(state_dict["masters"])
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self._check_base_hyperparameters()

    def _check_base_hyperparameters(self) -> None:
        """Raise if the base optimizer's groups, as loaded, lack a hyperparameter it steps with: torch's
        ``load_state_dict`` takes the saved groups' hyperparameters (filling in only those its later versions added),
        so another base optimizer's state (AdamW's into SGD with momentum) failed at the next step."""
        for group in self.base_optimizer.param_groups:
            # the defaults it was built with: torch's load adds ``differentiable`` to the defaults of an optimizer
            # that has none (transformers' Adafactor), never to its groups
            missing = sorted(key for key in self.base_defaults if key not in group)
            if missing:
                raise ValueError(f"the saved base optimizer's groups lack {', '.join(map(repr, missing))} of this "
                                 f"{type(self.base_optimizer).__name__}: saved by another base optimizer")

    def __repr__(self) -> str:
        return (f"BlockOptimizer(block {self.order.current}/{self.block_num}, switch_mode={self.switch_mode!r}, "
                f"sgd_mode={self.sgd_mode!r}, base={type(self.base_optimizer).__name__}"
                f"{', closed' if self._closed else ''})")


# -- what the plans hold: the optimizer, weakly ----------------------------------------------------------------
class _ScheduledLr:
    """The on-the-fly update's lr: the optimizer's scheduled ``param_groups[0]["lr"]``, read when the backward
    runs.  Held by the plans on the model, so it holds the optimizer weakly."""

    def __init__(self, optimizer: BlockOptimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self) -> float:
        optimizer = self.optimizer()
        if optimizer is None:
            raise RuntimeError("bread_kernels: the BlockOptimizer that planned this on-the-fly update no longer "
                               "exists; build a new one for the model")
        lr = optimizer.param_groups[0]["lr"]
        if lr is None:
            raise RuntimeError("bread_kernels: the on-the-fly update W -= lr·s·dW needs an lr, and the "
                               "BlockOptimizer's param_groups[0]['lr'] was set to None; set a number there (or use "
                               "sgd_mode='disabled')")
        return lr


def _described(variant: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in variant.items())


# -- argument checks -----------------------------------------------------------------------------------------------
def _check_arguments(base_optimizer, switch_block_every, start_block, switch_mode, active_modules,
                     include_embedding, include_lm_head, verbose, log_fn, lora_mode, n_layer_per_block,
                     lr_warmup_step_afterswitch, init_avgsq_scale, sgd_mode, sgd_lr_scaling, sgd_use_sign,
                     rounding, seed) -> None:
    """Every argument that can be checked without the model, before anything is touched."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(f"BlockOptimizer: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}")
    if isinstance(base_optimizer, BlockOptimizer):
        raise TypeError("BlockOptimizer: base_optimizer is itself a BlockOptimizer; pass the optimizer that trains "
                        "the active block (e.g. torch.optim.AdamW(model.parameters(), lr=...))")
    if switch_mode not in SWITCH_MODES:
        raise ValueError(f"BlockOptimizer: unknown switch_mode {switch_mode!r}; use one of {', '.join(SWITCH_MODES)}")
    if sgd_mode not in SGD_MODES:
        raise ValueError(f"BlockOptimizer: unknown sgd_mode {sgd_mode!r}; use one of {', '.join(SGD_MODES)}")
    if lora_mode not in LORA_MODES:
        raise ValueError(f"BlockOptimizer: unknown lora_mode {lora_mode!r}; use one of {', '.join(LORA_MODES)}")
    if not is_int(switch_block_every) or switch_block_every < 1:
        raise ValueError(f"BlockOptimizer: switch_block_every must be a positive int, got {switch_block_every!r}")
    if start_block is not None and (not is_int(start_block) or start_block < 0):
        raise ValueError(f"BlockOptimizer: start_block must be None or a block index >= 0, got {start_block!r}")
    if not is_int(n_layer_per_block) or n_layer_per_block < 1:
        raise ValueError(f"BlockOptimizer: n_layer_per_block must be a positive int, got {n_layer_per_block!r}")
    if lr_warmup_step_afterswitch is not None and (not is_int(lr_warmup_step_afterswitch)
                                                   or lr_warmup_step_afterswitch < 1):
        raise ValueError("BlockOptimizer: lr_warmup_step_afterswitch must be None or a positive int, got "
                         f"{lr_warmup_step_afterswitch!r}")
    if base_optimizer.param_groups[0].get("lr") is None and (sgd_mode != "disabled"
                                                              or lr_warmup_step_afterswitch is not None):
        needs = "the on-the-fly update W -= lr·s·dW" if sgd_mode != "disabled" else "lr_warmup_step_afterswitch"
        raise ValueError(f"BlockOptimizer: {needs} scales the base optimizer's lr, and its lr is None (Adafactor with "
                         "relative_step=True computes a step size of its own): give it one (Adafactor(..., lr=1e-3, "
                         "relative_step=False)), or train with sgd_mode='disabled' and no warm-up")
    if init_avgsq_scale:
        raise NotImplementedError("BlockOptimizer: init_avgsq_scale is not implemented; leave it False")
    if isinstance(sgd_lr_scaling, bool) or not isinstance(sgd_lr_scaling, numbers.Real) or \
            not math.isfinite(sgd_lr_scaling) or sgd_lr_scaling < 0:
        raise ValueError(f"BlockOptimizer: sgd_lr_scaling must be a finite number >= 0, got {sgd_lr_scaling!r}")
    if not isinstance(active_modules, (list, tuple)) or not all(isinstance(m, str) for m in active_modules):
        raise TypeError(f"BlockOptimizer: active_modules must be a list of name prefixes, got {active_modules!r}")
    for what, value in (("include_embedding", include_embedding), ("include_lm_head", include_lm_head),
                        ("sgd_use_sign", sgd_use_sign)):
        if not isinstance(value, bool):
            raise TypeError(f"BlockOptimizer: {what} must be True or False, got {value!r}")
    if not is_int(verbose) and not isinstance(verbose, bool):
        raise TypeError(f"BlockOptimizer: verbose must be an int (0 silent, 1 prints switches), got {verbose!r}")
    if log_fn is not None and not callable(log_fn):
        raise TypeError(f"BlockOptimizer: log_fn must be None or a callable taking a dict, got {log_fn!r}")
    if not isinstance(rounding, Rounding):
        try:
            Rounding(rounding)
        except ValueError:
            raise ValueError(f"BlockOptimizer: unknown rounding {rounding!r}; use one of "
                             f"{[r.value for r in Rounding]}") from None
    if not is_int(seed) or seed < 0:
        raise ValueError(f"BlockOptimizer: seed must be an int >= 0, got {seed!r}")


def _warn_slow_path() -> None:
    global _warned_slow_path
    if not _warned_slow_path:
        _warned_slow_path = True
        warnings.warn(
            "BlockOptimizer: the model is not patched, so it runs the reference's slow path (plain autograd, full "
            "gradients materialised and read back by hooks). Call bread_kernels.patch(model) before building the "
            "optimizer for the fused backward." + (
                " Under DistributedDataParallel the slow path also leaves every block's gradients to DDP, which "
                "averages only the parameters that required grad when it was built: the replicas drift apart. A "
                "patched model's optimizer averages the active block and the on-the-fly updates over the ranks."
                if torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 else ""), UserWarning, stacklevel=3,
        )


def _blocks_holding_adapters(blocks: list[list[str]], names: list[str]) -> list[list[str]]:
    """``lora_mode="adapter_only"`` trains only the active block's adapters: the inferred blocks that hold none
    (an encoder's beside a decoder given LoRA, layers peft's ``layers_to_transform`` left out, the embedding) would
    train nothing, so they are left out, and a warning says which.  All of them where no block holds one (the
    roles then refuse the first, naming the mode)."""
    adapters = [n for n in names if is_adapter_name(n)]
    holding = [block for block in blocks if any(p in n for p in block for n in adapters)]
    if not holding or len(holding) == len(blocks):
        return blocks
    left_out = [block for block in blocks if block not in holding]
    warnings.warn(f"BlockOptimizer: lora_mode='adapter_only' leaves out the {len(left_out)} blocks that hold no LoRA "
                  f"adapter ({left_out[0]}...): they would train nothing", UserWarning, stacklevel=3)
    return holding


def _refuse_adapter_only_without_adapters(names: list[str], lora_mode: str) -> None:
    """``lora_mode="adapter_only"`` over a list holding no peft adapter at all (the model never wrapped by
    ``peft.get_peft_model``) would train every block's base weights, as ``"all"`` does, instead of adapters."""
    if lora_mode != "adapter_only" or any(is_adapter_name(n) for n in names) or non_lora_adapter_names(names):
        return
    raise ValueError("BlockOptimizer: lora_mode='adapter_only' trains only the active block's LoRA adapters, and "
                     "named_parameters_list holds none (no name with '.lora_'), so every block's base weights would "
                     "train instead; wrap the model with peft.get_peft_model(model, LoraConfig(...)) before patch and "
                     "the optimizer, or use lora_mode='all' (the default) to train the base weights")


def _warn_non_lora_adapters(names: list[str], lora_mode: str, sgd_mode: str) -> None:
    """Say that ``lora_mode`` does not apply to the adapters of a peft tuner other than LoRA (LoHa, LoKr, IA3, VeRA,
    OFT, LN tuning, ...) among ``names``: they are block weights like any other — trained by the base optimizer
    while their block is active, given what ``sgd_mode`` gives an inactive weight otherwise — as on the reference's
    path."""
    adapters = non_lora_adapter_names(names)
    if not adapters:
        return
    inactive = "frozen" if sgd_mode == "disabled" else \
        f"given the on-the-fly SGD or sign step of sgd_mode={sgd_mode!r} like any inactive weight"
    warnings.warn(
        f"BlockOptimizer: {len(adapters)} parameters of peft adapters other than LoRA's ({adapters[0]}...) are in "
        f"the parameter list: lora_mode ({lora_mode!r}) applies only to LoRA's adapters (names holding '.lora_'), "
        "so these are ordinary block weights, as on the reference's path: trained by the base optimizer only while "
        f"their block is active (with the block's other listed weights, the base weights too), {inactive} while it "
        "is not", UserWarning, stacklevel=3)


def _warn_unstreamed_layers(blocks: list[list[str]], layers: list[str], streamed: list[str]) -> None:
    """Say which of the ``layers`` kept in ``blocks`` lie outside the stack ``patch`` streams (an encoder's beside
    a decoder's, a vision tower's): they train exactly as in the reference, through plain autograd and hooks, not
    the fused backward."""
    kept, streamed = {p for block in blocks for p in block}, set(streamed)
    trained = [p for p in layers if p in kept]
    outside = [p for p in trained if p not in streamed]
    if outside:
        warnings.warn(
            f"BlockOptimizer: {len(outside)} of the {len(trained)} layer blocks ({outside[0]}...) lie outside the "
            "block stack patch streams: they train exactly, through plain autograd and hooks as in the reference, "
            "without the fused backward", UserWarning, stacklevel=3)


def _is_rank_zero() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0
