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
each Linear weight's :class:`~bread_kernels.Role` (the on-the-fly updates fused into the backward, no ``.grad``)
and the cut (blocks below it run without autograd); the input embedding's update touches only the rows of the
batch's tokens.  Parameters outside the fused modules (norms, a tied embedding and head) get the update from a
post-accumulate-grad hook, as in the reference.  Without ``patch`` everything
goes through hooks (the reference's slow path) and a warning says so once.

Deliberate differences from the reference ``block_optim.py`` (see the README):

* the block switches after exactly ``switch_block_every`` steps (the reference switches after
  ``switch_block_every - 1`` steps for the first block);
* normalisation weights go to the no-weight-decay group with biases (the reference's ``isinstance`` check on a
  parameter never matches, so it decays them);
* ``init_avgsq_scale`` is not implemented and refused; ``switch_mode="fixed"`` needs ``start_block``;
* bf16/fp16 on-the-fly updates round stochastically by default (``rounding="nearest"`` gives the reference's).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from ..backends import get_backend
from ..functions.linear import all_finite
from ..patch import patched_models, patched_state
from ..plan import OnTheFlyUpdate, Role, Rounding, WeightPlan
from .blocks import SWITCH_MODES, BlockOrder, infer_blocks

__all__ = ["BlockOptimizer"]

SGD_MODES = ("disabled", "all", "partial")
LORA_MODES = ("all", "partial", "adapter_only")

_warned_slow_path = False


class BlockOptimizer(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` to train one block at a time (constructor of BlockOptimizers' ``BlockOptimizer``).

    Keyword-only extras: ``rounding`` (``"auto"``, ``"nearest"``, ``"stochastic"``) and ``seed`` of the on-the-fly
    updates of low-precision weights.
    """

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
        log_fn: Callable | None = None,
        lora_mode: str = "all",
        n_layer_per_block: int = 1,
        lr_warmup_step_afterswitch: int | None = None,
        init_avgsq_scale: bool | float = False,
        sgd_mode: str = "disabled",
        sgd_lr_scaling: float = 1.0,
        sgd_use_sign: bool = False,
        *,
        rounding: str | Rounding = Rounding.AUTO,
        seed: int = 0,
    ):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"BlockOptimizer: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}")
        if switch_mode not in SWITCH_MODES:
            raise ValueError(f"BlockOptimizer: unknown switch_mode {switch_mode!r}; use one of {', '.join(SWITCH_MODES)}")
        if sgd_mode not in SGD_MODES:
            raise ValueError(f"BlockOptimizer: unknown sgd_mode {sgd_mode!r}; use one of {', '.join(SGD_MODES)}")
        if lora_mode not in LORA_MODES:
            raise ValueError(f"BlockOptimizer: unknown lora_mode {lora_mode!r}; use one of {', '.join(LORA_MODES)}")
        if not isinstance(switch_block_every, int) or switch_block_every < 1:
            raise ValueError(f"BlockOptimizer: switch_block_every must be a positive int, got {switch_block_every!r}")
        if not isinstance(n_layer_per_block, int) or n_layer_per_block < 1:
            raise ValueError(f"BlockOptimizer: n_layer_per_block must be a positive int, got {n_layer_per_block!r}")
        if lr_warmup_step_afterswitch is not None and lr_warmup_step_afterswitch < 1:
            raise ValueError("BlockOptimizer: lr_warmup_step_afterswitch must be None or a positive int")
        if init_avgsq_scale:
            raise NotImplementedError("BlockOptimizer: init_avgsq_scale is not implemented; leave it False")
        if sgd_lr_scaling < 0:
            raise ValueError(f"BlockOptimizer: sgd_lr_scaling must be >= 0, got {sgd_lr_scaling}")

        self.named_parameters_list = _check_named_parameters(named_parameters_list)
        self.names = [n for n, _ in self.named_parameters_list]
        self.model = _owning_patched_model(self.named_parameters_list)
        self.engine = patched_state(self.model) if self.model is not None else None
        if self.engine is None:
            _warn_slow_path()

        if block_prefix_list is None:
            layer_prefixes = embedding_prefix = None
            if self.engine is not None:
                layer_prefixes = self.engine.block_prefixes()
                embedding_prefix = self._module_prefix(self.engine.embedding)
            block_prefix_list = infer_blocks(self.names, layer_prefixes, embedding_prefix, include_embedding,
                                             include_lm_head, n_layer_per_block)
        if not isinstance(block_prefix_list, list) or not block_prefix_list:
            raise ValueError("BlockOptimizer: block_prefix_list must be a non-empty list of lists of name prefixes")
        for block in block_prefix_list:
            for prefix in block:
                if not any(prefix in n for n in self.names):
                    raise ValueError(f"BlockOptimizer: block prefix {prefix!r} matches no parameter name")
        for prefix in active_modules:
            if not any(prefix in n for n in self.names):
                raise ValueError(f"BlockOptimizer: active_modules entry {prefix!r} matches no parameter name")

        self.block_prefix_list = block_prefix_list
        self.block_num = len(block_prefix_list)
        self.order = BlockOrder(self.block_num, switch_mode, start_block)
        self.switch_mode = switch_mode
        self.switch_block_every = switch_block_every
        self.active_modules = list(active_modules)
        self.verbose, self.log_fn = verbose, log_fn
        self.lora_mode, self.sgd_mode, self.sgd_use_sign = lora_mode, sgd_mode, sgd_use_sign
        self.lr_warmup_step_afterswitch = lr_warmup_step_afterswitch
        self.global_step = 0
        self.block_step = 0

        self.base_optimizer = base_optimizer
        self.weight_decay = base_optimizer.param_groups[0].get("weight_decay", 0.0)
        self.base_defaults = {k: v for k, v in base_optimizer.defaults.items() if k != "weight_decay"}
        # the user's groups (every parameter) stay ours: schedulers write their lr, zero_grad clears everything
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)

        self.update = OnTheFlyUpdate(lr=lambda: self.param_groups[0]["lr"], scale=sgd_lr_scaling,
                                     rounding=rounding, seed=seed)
        self.roles: dict[str, Role] = {}
        self.masters: list[tuple[nn.Parameter, torch.Tensor, str]] = []
        self._hook_roles: dict[int, Role] = {}
        self._skipped: list[tuple[str, str]] = []
        self.skipped_updates = 0
        self._no_decay = self._no_decay_names()
        self._active_names: set[str] = set()
        for name, p in self.named_parameters_list:
            # a hook needs requires_grad when it is registered (peft freezes the base weights); the roles set the
            # real flags right below
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(self._make_hook(name))
        self._activate(self.order.current)

    # -- structure ----------------------------------------------------------------------------------------------
    def _module_prefix(self, module) -> str | None:
        if module is None or self.model is None:
            return None
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}." if name else ""
        return None

    def _no_decay_names(self) -> set[str]:
        """Biases and normalisation weights (by module class when the model is known, by name otherwise)."""
        names = {n for n in self.names if n.endswith("bias")}
        if self.model is not None:
            for mname, module in self.model.named_modules():
                if "norm" in type(module).__name__.lower():
                    names.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
        else:
            names.update(n for n in self.names if "norm" in n.lower() or ".ln_" in n)
        return names

    @property
    def active_param_prefixs(self) -> list[str]:  # the reference's attribute name
        return self.block_prefix_list[self.order.current] + self.active_modules

    # -- plan ---------------------------------------------------------------------------------------------------
    def _roles_for(self, block_index: int) -> dict[str, Role]:
        prefixes = self.block_prefix_list[block_index] + self.active_modules
        active = {n for n in self.names if any(p in n for p in prefixes)}
        lora = [n for n in self.names if is_adapter_name(n)]
        if lora:
            if self.lora_mode == "all":
                active.update(lora)
            elif self.lora_mode == "partial":
                first = min(self.names.index(n) for n in active)
                active.update(n for n in self.names[first:] if "lora" in n)
            else:  # adapter_only
                active = {n for n in lora if n in active}
        if not active:
            raise ValueError(f"BlockOptimizer: block {block_index} has no trainable parameter")
        on_the_fly = Role.SIGN if self.sgd_use_sign else Role.SGD
        if self.sgd_mode == "all":
            eligible = set(self.names)
        elif self.sgd_mode == "partial":
            first = min(self.names.index(n) for n in active)
            eligible = set(self.names[first:])
        else:
            eligible = set()
        eligible.difference_update(lora)  # adapters follow lora_mode; the on-the-fly update is for base weights
        return {n: Role.ACTIVE if n in active else on_the_fly if n in eligible else Role.FROZEN for n in self.names}

    def _activate(self, block_index: int) -> None:
        """Write the plan for ``block_index``: roles, requires_grad, fused plans, the cut, the base optimizer."""
        roles = self._roles_for(block_index)
        self.roles = roles
        role_of = {id(p): roles[n] for n, p in self.named_parameters_list}
        fused: set[int] = set()
        if self.engine is not None:
            for name, module in self.engine.fused_modules:
                module._bread_plan = self._module_plan(name, module, role_of, fused)
        self._hook_roles = {}
        for name, p in self.named_parameters_list:
            role = roles[name]
            if id(p) in fused:
                p.requires_grad_(role is Role.ACTIVE)
            else:
                p.requires_grad_(role is not Role.FROZEN)
                if role.updates_on_the_fly:
                    self._hook_roles[id(p)] = role
            if role is not Role.ACTIVE:
                p.grad = None
        if self.engine is not None:
            self.engine.stream.cut = self._cut(roles)

        # LoRA adapters that stay active keep their master copy and their base-optimizer state across the switch
        # (they are trained across the whole run); everything else starts afresh, as in the reference
        old_masters = {name: master for _, master, name in self.masters}
        old_state = self.base_optimizer.state
        state = defaultdict(dict)
        decay, no_decay, self.masters = [], [], []
        for name, p in self.named_parameters_list:
            if roles[name] is not Role.ACTIVE:
                continue
            keep = is_adapter_name(name) and name in self._active_names
            target = p
            if p.dtype != torch.float32:
                target = old_masters[name] if keep and name in old_masters else \
                    p.detach().float().clone().requires_grad_(True)
                self.masters.append((p, target, name))
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

    def _module_plan(self, name, module, role_of, fused: set[int]) -> WeightPlan | None:
        """The fused plan of one patched Linear or embedding, or None when its parameters must take the plain
        autograd path."""
        weight, bias = module.weight, getattr(module, "bias", None)
        params = [weight] + ([bias] if bias is not None else [])
        if any(id(p) not in role_of or id(p) in self.engine.shared_weights for p in params):
            return None
        role = role_of[id(weight)]
        if bias is not None and role_of[id(bias)] is not role:
            return None
        fused.update(id(p) for p in params)
        update = self.update if role.updates_on_the_fly else None
        if role is Role.FROZEN and any(role_of.get(id(p)) is Role.ACTIVE
                                       for p in _adapter_parameters(module)):
            role = Role.LORA  # the base weight is frozen, its adapters train
        return WeightPlan(role, update, name=name, reporter=self._collect_skip)

    def _cut(self, roles: dict[str, Role]) -> int:
        """The lowest block whose backward is needed: 0 if anything below the blocks has work."""
        prefixes = self.engine.block_prefixes()
        lowest = len(prefixes)
        for name, _ in self.named_parameters_list:
            if roles[name] is Role.FROZEN:
                continue
            index = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
            if index is None:
                if self.names.index(name) < self._first_block_param_index(prefixes):
                    return 0  # an embedding (or anything before the blocks) needs its gradient
                continue
            lowest = min(lowest, index)
        return lowest

    def _first_block_param_index(self, prefixes) -> int:
        return next((i for i, n in enumerate(self.names) if any(n.startswith(p) for p in prefixes)), len(self.names))

    # -- the hook path ------------------------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            role = self._hook_roles.get(id(p))
            if role is None or p.grad is None:
                return
            grad, p.grad = p.grad, None
            if not all_finite(grad):
                self._collect_skip(name, "its gradient is not finite")
                return
            target = p.detach()
            flat = target.view(-1) if target.dim() > 2 else target
            with torch.no_grad():
                get_backend(p.device).apply_update_(
                    flat, grad.float().reshape(flat.shape), self.update.step_size(), role is Role.SIGN,
                    self.update.rounding, self.update.next_seed(),
                )

        return hook

    def _collect_skip(self, name: str, reason: str) -> None:
        self._skipped.append((name, reason))

    # -- stepping -----------------------------------------------------------------------------------------------
    def _lr_correction(self) -> float:
        warmup = self.lr_warmup_step_afterswitch
        if warmup is None or self.global_step < warmup:
            return 1.0
        return min(1.0, (self.block_step + 1) / warmup)

    def block_lr(self) -> float:
        """The base optimizer's lr for this step: the scheduled lr (``param_groups[0]["lr"]``) times the
        after-switch warm-up factor."""
        return self.param_groups[0]["lr"] * self._lr_correction()

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.block_lr()
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr
        for low, master, _ in self.masters:
            if low.grad is not None:
                master.grad = low.grad.float()
                low.grad = None
        self.base_optimizer.step()
        for low, master, _ in self.masters:
            low.copy_(master)
            master.grad = None
        self.after_base_step()
        return loss

    def _report_skips(self) -> None:
        if not self._skipped:
            return
        self.skipped_updates += len(self._skipped)
        names = sorted({n for n, _ in self._skipped})
        warnings.warn(
            f"BlockOptimizer step {self.global_step}: skipped {len(self._skipped)} on-the-fly update(s) because their "
            f"gradient was not finite ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); those weights "
            "are unchanged", RuntimeWarning, stacklevel=4,
        )
        self._skipped = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for _, master, _ in self.masters:
            master.grad = None

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "order": self.order.state_dict(),
            "global_step": self.global_step,
            "block_step": self.block_step,
            "masters": {name: master.detach().clone() for _, master, name in self.masters},
            "update_draws": self.update.draws,
            "lr": [g["lr"] for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("base_optimizer", "order", "global_step", "block_step", "masters"):
            if key not in state_dict:
                raise ValueError(f"BlockOptimizer.load_state_dict: missing {key!r}; is this a BlockOptimizer state?")
        self.order.load_state_dict(state_dict["order"])
        self.global_step, self.block_step = state_dict["global_step"], state_dict["block_step"]
        self.update.draws = state_dict.get("update_draws", 0)
        for group, lr in zip(self.param_groups, state_dict.get("lr", [])):
            group["lr"] = lr
        self._activate(self.order.current)
        saved = state_dict["masters"]
        with torch.no_grad():
            for _, master, name in self.masters:
                if name in saved:
                    master.copy_(saved[name])
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])

    def __repr__(self) -> str:
        return (f"BlockOptimizer(block {self.order.current}/{self.block_num}, switch_mode={self.switch_mode!r}, "
                f"sgd_mode={self.sgd_mode!r}, base={type(self.base_optimizer).__name__})")


def is_adapter_name(name: str) -> bool:
    """A peft LoRA adapter parameter (``...q_proj.lora_A.default.weight``)."""
    return ".lora_" in name or name.startswith("lora_")


def _adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of a peft LoRA layer (none for a plain linear)."""
    return [p for attr in ("lora_A", "lora_B") if isinstance(getattr(module, attr, None), nn.ModuleDict)
            for p in getattr(module, attr).parameters()]


def _check_named_parameters(named_parameters_list) -> list[tuple[str, nn.Parameter]]:
    try:
        items = list(named_parameters_list)
    except TypeError:
        raise TypeError("BlockOptimizer: named_parameters_list must be list(model.named_parameters())") from None
    if not items or not all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                            and isinstance(i[1], torch.Tensor) for i in items):
        raise TypeError("BlockOptimizer: named_parameters_list must be a non-empty list of (name, parameter) pairs, "
                        "as list(model.named_parameters()) gives")
    return items


def _owning_patched_model(named) -> nn.Module | None:
    """The patched model these parameters come from (names checked), or None if none of them is patched."""
    ids = {id(p) for _, p in named}
    for model in patched_models():
        own = dict((id(p), n) for n, p in model.named_parameters())
        inside = ids & own.keys()
        if not inside:
            continue
        for name, p in named:
            if id(p) not in own:
                raise ValueError(f"BlockOptimizer: parameter {name!r} is not a parameter of the patched "
                                 f"{type(model).__name__}; pass list(model.named_parameters()) of that model")
            if own[id(p)] != name:
                raise ValueError(f"BlockOptimizer: parameter named {name!r} is {own[id(p)]!r} in the patched model; "
                                 "pass list(model.named_parameters()) of that model")
        return model
    return None


def _warn_slow_path() -> None:
    global _warned_slow_path
    if not _warned_slow_path:
        _warned_slow_path = True
        warnings.warn(
            "BlockOptimizer: the model is not patched, so it runs the reference's slow path (plain autograd, full "
            "gradients materialised and read back by hooks). Call bread_kernels.patch(model) before building the "
            "optimizer for the fused backward.", UserWarning, stacklevel=3,
        )


def _is_rank_zero() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0
