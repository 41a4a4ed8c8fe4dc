"""The protocol by which a block-coordinate-descent library drives the engine: :class:`EngineDriver`.

A library says, whenever its active set changes, each parameter's :class:`~bread_kernels.Role` — ``ACTIVE``
(trained by the library's own optimizer: the gradient lands in ``.grad``), ``SGD``/``SIGN`` (the on-the-fly update
``W -= lr·s·dW`` or ``lr·s·sign(dW)`` inside the backward, with the rule of one
:class:`~bread_kernels.OnTheFlyUpdate`), ``LORA`` is implied for a frozen base weight whose adapters are ACTIVE,
or ``FROZEN`` — and, once per optimizer step, calls :meth:`EngineDriver.end_step` (which reads the step's
finiteness flags with one host sync and reports skipped updates).  The driver turns the roles into what the engine
reads: the fused modules' plans, each parameter's ``requires_grad``, the post-accumulate-grad hooks that update the
parameters outside the fused modules (norms, a tied embedding, a block's small linears: ``patch``'s
``hook_update_numel``), and the cut (blocks below it run without autograd).

:class:`~bread_kernels.BlockOptimizer`, :func:`bread_kernels.accelerate` and the Trainer callbacks are users of this
protocol; a library not supported by ``accelerate`` can use it directly::

    driver = EngineDriver(list(model.named_parameters()),
                          update=OnTheFlyUpdate(lr=lambda: opt.param_groups[0]["lr"], scale=1.0))
    driver.set_roles({n: Role.ACTIVE if n.startswith("model.layers.3.") else Role.SGD for n in names})
    ...  # forward, backward, the library's own optimizer step
    driver.end_step()
    driver.close()  # plain autograd again

Under DistributedDataParallel the driver of a patched model averages the active parameters' gradients at the end of
each synchronised backward, and the on-the-fly updates take the ranks' averaged gradients: the fused weights' (the
Linears, the head in the fused loss, the experts, the input embedding) inside the backward
(:class:`~bread_kernels.optim.data_parallel.AveragedTarget`), the hook path's small weights' at the end of it
(:mod:`bread_kernels.optim.data_parallel`).

Lifetime: the hooks keep their handles and hold the driver weakly, the engine holds its owner weakly, so dropping
the owner (or the driver) removes every hook; ``close()`` does it at once, and :func:`bread_kernels.unpatch` closes
the owner.  One driver owns a parameter at a time: a new driver over parameters of a live one closes that one's
owner (with a warning) and takes them over.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Mapping

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..backends.chunked import chunk_budget_bytes
from ..offload import meta_parameter_refusal
from ..patch import patched_models, patched_state, sharded_parameter, sharded_refusal
from ..peft_lora import adapter_parameters
from ..plan import FiniteChecks, OnTheFlyUpdate, OnTheFlyWrites, Role, WeightPlan, forward_epoch, running_backward
from ..quantized import quantized_weight
from ..rounding import FLOAT_DTYPES
from ..stream import inside_functional_call
from ..update import update_dense_
from .data_parallel import (INDEPENDENT_RANKS_ENV, AveragedTarget, DataParallelForward, average_gradients_,
                            check_same_parameters, data_parallel_forward, queue_after_backward,
                            runs_under_deepspeed, several_ranks)
from .roles import lowest_needed_block

__all__ = ["EngineDriver", "owning_patched_model", "take_over_parameters", "check_loss_scaler",
           "check_parameters_of", "check_named_parameters"]

#: parameter -> weakref to the live EngineDriver that owns it (one owner at a time)
_OWNERS = WeakIdKeyDictionary()
#: the handle of :func:`_on_parameter_registered`, torch's global parameter-registration hook (registered once, by the
#: first driver; it holds nothing)
_REPLACEMENT_HOOK = None


class WeaklyHeld:
    """An attribute held through a weak reference (None once its object is gone): the model and its patched state,
    as a driver or an optimizer keeps them, so that one still held (a callback the user keeps, a library's
    optimizer its own hooks leak) never keeps a dropped model, its weights and its patch alive — a torch optimizer
    keeps only the parameters."""

    def __set_name__(self, owner, name):
        self.slot = f"_weakly_held_{name}"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        reference = obj.__dict__.get(self.slot)
        return reference() if reference is not None else None

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = weakref.ref(value) if value is not None else None


class EngineDriver:
    """Writes the engine's plans, ``requires_grad`` flags, hook updates and cut from each parameter's Role.

    Args:
        named_parameters: ``list(model.named_parameters())`` of the model to drive (patched or not: without
            :func:`~bread_kernels.patch` every on-the-fly update goes through the hooks, the reference's slow path).
        update: the rule of the ``SGD``/``SIGN`` roles (its ``lr`` is best a callable read at backward time, e.g.
            ``lambda: optimizer.param_groups[0]["lr"]``, so an lr schedule applies); None if no role will update
            on the fly.
        owner: what :func:`~bread_kernels.unpatch` and a newer driver close (``owner.close()``; held weakly), e.g.
            the optimizer that holds this driver; None: the driver itself.
        library_hooks: the library applies the on-the-fly updates of the parameters outside the fused modules with
            hooks of its own (BlockOptimizers' ``sgd_hook``): the driver leaves those parameters' ``requires_grad``
            on and registers no hook.  The fused weights' updates are the engine's either way: their
            ``requires_grad`` is off, so a library hook on them never fires.
        update_target: where the on-the-fly updates write (None: the tensors; the ZeRO-3 integration passes shards).
        what: the owner's name in messages.

    Raises ``ValueError``/``TypeError`` for named parameters that are not ``(name, tensor)`` pairs of one model.
    """

    model = WeaklyHeld()
    engine = WeaklyHeld()

    def __init__(self, named_parameters, *, update: OnTheFlyUpdate | None = None, owner=None,
                 library_hooks: bool = False, update_target=None, what: str = "EngineDriver"):
        self.what = what
        self._closed = True  # until construction succeeds: close() and the hooks do nothing
        self.named_parameters = check_named_parameters(named_parameters, what)
        if update is not None and not isinstance(update, OnTheFlyUpdate):
            raise TypeError(f"{what}: update must be a bread_kernels.OnTheFlyUpdate or None, got {type(update)}")
        if not isinstance(library_hooks, bool):
            raise TypeError(f"{what}: library_hooks must be True or False, got {library_hooks!r}")
        if owner is not None:
            try:
                weakref.ref(owner)
            except TypeError:
                raise TypeError(f"{what}: owner must be an object held weakly (the optimizer that holds this driver), "
                                f"or None, got {type(owner).__name__}") from None
        self.names = [n for n, _ in self.named_parameters]
        self._name_set = set(self.names)
        owning_patched_model(self.named_parameters, what)  # the names checked before a previous owner is closed
        # closing a previous owner may unpatch the model (an accelerate() that patched it)
        take_over_parameters(self.named_parameters, what)
        self.model = owning_patched_model(self.named_parameters, what)
        self.engine = patched_state(self.model) if self.model is not None else None
        self._drives_a_patched_model = self.engine is not None
        if self.engine is not None and self.engine.driver is not None and \
                not getattr(self.engine.driver, "closed", False):
            raise ValueError(f"{what}: the model is driven by a live {self.engine.driver!r} over other parameters; "
                             "close it first (one driver writes a model's plans)")
        if self.engine is not None:
            _refuse_parameters_shared_with_a_driven_model(self.model, self.named_parameters, what)
        #: the names in the model's own order (the cut needs to know what comes before the blocks)
        self._model_order = self.names if self.model is None else \
            [n for n, _ in self.model.named_parameters() if n in self._name_set]
        self.update = update
        self.update_target = update_target
        self.library_hooks = library_hooks
        self._owner = weakref.ref(owner) if owner is not None else None
        self.roles: dict[str, Role] = {}
        #: under DDP: where the fused on-the-fly updates write (the ranks' average), None elsewhere
        self._averaged: AveragedTarget | None = None
        #: under DDP: the on-the-fly parameters whose gradients land in ``.grad``, by name, with the plan of the
        #: update applied at the end of the backward from their average
        self._deferred: dict[str, WeightPlan] = {}
        #: the DDP group (weakly) whose ranks were found to train alike since the roles or their writing last changed
        self._ranks_agree = None
        self._any_on_the_fly = False
        #: the on-the-fly parameters outside the fused modules: updated by this driver's hooks (``hook_plans``), or
        #: by the library's own with ``library_hooks``
        self.unfused_on_the_fly: list[str] = []
        self.hook_plans: dict[str, WeightPlan] = {}
        self.skipped_updates = 0
        self._skipped: list[tuple[str, str]] = []
        self._skip_collector = _SkipCollector(self)
        self._checks = FiniteChecks()
        self._writes = OnTheFlyWrites()
        #: the forward (its epoch) each output of a forward came from, for the head called apart on it
        self._output_epochs: WeakIdKeyDictionary = WeakIdKeyDictionary()

        self._closed = False
        handles: list = []
        self._handles = handles
        self._scale_hook = None
        self._release = weakref.finalize(self, _release_hooks, handles,
                                         weakref.ref(self.engine) if self.engine is not None else None)
        if not library_hooks:
            reference = weakref.ref(self)
            for name, p in self.named_parameters:
                if not (p.is_floating_point() or p.is_complex()):  # an integer (quantized) weight: no gradient
                    continue
                # a hook needs requires_grad when it is registered (peft freezes the base weights); set_roles sets
                # the real flags
                wanted = p.requires_grad
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(_GradHook(reference, name)))
                p.requires_grad_(wanted)
        for _, p in self.named_parameters:
            _OWNERS[p] = weakref.ref(self)
        #: a bounded sample of the parameters with where the model holds them (:meth:`check_parameters_held`), and
        #: each parameter replaced through ``register_parameter`` since (:meth:`_note_replaced`), which the slow path,
        #: knowing no model, sees alone
        self._held = held_parameter_probes(self.model, self.named_parameters, self.engine.block_prefixes()) \
            if self.engine is not None else []
        self._replaced: set[int] = set()
        #: the probe of every parameter of the model, the optimizer's or not (a block's recompute reads a frozen
        #: norm too), for :meth:`check_functional_call` (built here: inside a functional_call the tensors swapped in
        #: are what the modules hold)
        self._every_held = _parameter_probes(self.model, [*self.named_parameters, *self.model.named_parameters()]) \
            if self.engine is not None else []
        self._names_by_id: dict[int, str] | None = None
        _watch_parameter_replacements()
        if self.engine is not None:
            forward_hooks = _ForwardHooks(weakref.ref(self))  # once per forward, wherever it starts (model.model(...))
            handles.append(self.engine.add_forward_hooks(forward_hooks.before, forward_hooks.after))
            self.engine.drive(self.owner)

    # -- lifetime -----------------------------------------------------------------------------------------------
    @property
    def owner(self):
        """The object closed by unpatch and by a newer driver (this driver when it has no owner)."""
        return self._owner() if self._owner is not None else self

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the hooks and the plans (the fused modules then run plain autograd and the backward reaches every
        block again), after reporting the skips of a backward since the last :meth:`end_step`.  Idempotent.  The
        ``requires_grad`` flags stay as the last roles left them."""
        if self._closed:
            return
        try:
            self._finish_in_flight()
            self.end_step()  # may warn (an error under -W error): the rest is done whatever happens
        finally:
            self._closed = True
            if self.engine is not None and self.engine.driver is self.owner:
                self.engine.drive(None)  # then the release clears the plans and the cut
            self._release()
            for _, p in self.named_parameters:
                driver = _OWNERS.get(p)
                if driver is not None and driver() is self:
                    del _OWNERS[p]
            self.hook_plans = {}

    def check_parameters_held(self, when: str = "this forward") -> None:
        """Refuse (``RuntimeError``, before ``when`` changes anything) a model whose parameters were replaced by new
        tensors since this driver was built (``model.load_state_dict(sd, assign=True)``, ``to_empty()``): the driver,
        its hooks and plans and the library's optimizer hold the old ones, so the model would silently stop training
        (its inactive weights only gathering ``.grad``).  An identity check of a bounded sample — the first of each
        block's parameters and the first and last parameter of the list, with the module holding each (weakly) —
        and of each parameter set anew through ``register_parameter`` since (:func:`_on_parameter_registered`, the
        slow path's only probes): a few dictionary reads, and no host sync."""
        for name, owner_ref, attr, p in self._held:
            owner = owner_ref()
            if owner is not None and owner._parameters.get(attr) is not p:
                raise RuntimeError(
                    f"{self.what}: the model's parameter {name} is no longer the tensor this optimizer was built over: "
                    "the model's parameters were replaced by new ones (model.load_state_dict(..., assign=True), "
                    "to_empty(), a parameter set anew, torch.func.functional_call with tensors of its own), while the "
                    "optimizer, its hooks and plans still hold the old ones, so the model would silently stop "
                    f"training. Refused before {when} changed anything. Build the optimizer (and its base optimizer) "
                    "after the load, or load without assign=True (model.load_state_dict(sd) copies the values into "
                    "the parameters the optimizer holds); run functional_call under torch.no_grad(), or on a copy of "
                    "the model that no optimizer drives (copy.deepcopy(model))")

    def check_functional_call(self) -> None:
        """Refuse (``RuntimeError``, before this forward changes anything) a forward with grad that
        ``torch.func.functional_call`` (or ``torch.nn.utils.stateless.functional_call``, ``torch.func.grad`` of a
        function calling it) runs with some of the model's parameters (the optimizer's or not) replaced by tensors of
        the caller's (a MAML inner step, a reference copy of a few weights): a block at or above the cut is
        recomputed in the backward, after functional_call has put the model's own parameters back, so the recompute
        reads them instead of the tensors the forward used and every gradient and on-the-fly update in that block and
        below is computed from activations the forward never had; a block below the cut runs without autograd, so a
        caller's tensor there gets no gradient.  The unpatched model computes both from the tensors given.

        Host cost: a walk up the caller's frames for functional_call's own
        (:func:`~bread_kernels.stream.inside_functional_call`); only inside one, an identity check of every parameter
        with the module holding it (the sample of :meth:`check_parameters_held` misses a swap of a few weights)."""
        if not inside_functional_call():
            return
        swapped = [name for name, owner_ref, attr, p in self._every_held
                   if (owner := owner_ref()) is not None and owner._parameters.get(attr) is not p]
        if swapped:
            shown = ", ".join(swapped[:3]) + (f" and {len(swapped) - 3} more" if len(swapped) > 3 else "")
            raise RuntimeError(
                f"{self.what}: torch.func.functional_call runs the patched model this optimizer drives with grad "
                f"enabled and tensors of its own in place of {shown}: the fused backward recomputes each block after "
                "functional_call has put the model's parameters back (and runs the blocks below the active one "
                "without autograd), so the gradients and on-the-fly updates would be computed from weights this "
                "forward did not use, and the tensors given would get wrong or no gradients. Refused before this "
                "forward changed anything. Run functional_call under torch.no_grad() (evaluation, a reference "
                "model's logits), or on a copy of the model that no optimizer drives (copy.deepcopy(model), whose "
                "blocks keep their activations inside functional_call; under torch.func.grad or vmap an unpatched "
                "one: bread_kernels.unpatch(copy.deepcopy(model)))")

    def _note_replaced(self, module: nn.Module, attr: str, old: torch.Tensor) -> None:
        """``module.<attr>``, which held this driver's parameter ``old``, is being given another parameter
        (:func:`_on_parameter_registered`): probe it from now on, so :meth:`check_parameters_held` refuses what comes
        next unless ``old`` is put back."""
        if id(old) in self._replaced:
            return
        if self._names_by_id is None:  # once, at the first replacement (a whole load reports every parameter)
            self._names_by_id = {id(p): n for n, p in self.named_parameters}
        name = self._names_by_id.get(id(old))
        if name is not None:
            self._replaced.add(id(old))
            self._held.append((name, weakref.ref(module), attr, old))

    def _head_input_epoch(self, args, last: int) -> int | None:
        """The forward the head called apart from one (a custom loss's ``model.lm_head(hidden)``) belongs to: the
        one whose output (or a view of it: ``hidden[:, :-1]``) it takes, where known, so that its output's guard
        refuses a stale one before the head's own backward writes; else the forward that began last (``last``),
        unless a write came since (the blocks called by hand: None, no guard)."""
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        while hidden is not None:
            epoch = self._output_epochs.get(hidden)
            if epoch is not None:
                return epoch
            hidden = hidden._base
        return None if self._writes.made_stale(last) else last

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{self.what}.{what}: this driver was closed (by close(), unpatch(model), or a newer "
                               "driver over the same parameters); build a new one")

    # -- the protocol -------------------------------------------------------------------------------------------
    def set_roles(self, roles: Mapping[str, Role | str]) -> list[tuple[str, nn.Parameter]]:
        """Make ``roles`` (every parameter name -> its Role) what the next backward does, and return the ACTIVE
        ``(name, parameter)`` pairs (what the library's optimizer trains), in ``named_parameters`` order.

        Writes: each fused module's plan; ``requires_grad`` (on for ACTIVE, for the on-the-fly parameters outside
        the fused modules, and for the adapters of a LORA base; off otherwise); the hook plans; the cut (the
        lowest block with a non-frozen parameter).  A parameter that is not ACTIVE loses its ``.grad``.

        Raises ``KeyError`` for a missing or unknown name and ``ValueError`` for an on-the-fly role without an
        ``update`` rule, before anything is written."""
        self._check_open("set_roles")
        if self._drives_a_patched_model and self.engine is None:
            raise RuntimeError(f"{self.what}: the patched model it drives was freed (it holds the model weakly), so "
                               "its blocks' plans can no longer be written; keep a reference to the whole patched "
                               "model, not only its parts, while training it")
        roles = self._checked_roles(roles)
        self.roles = roles
        self._any_on_the_fly = any(role.updates_on_the_fly for role in roles.values())
        self._finish_in_flight()
        self._averaged, self._ranks_agree = None, None
        self._write(roles)
        return [(n, p) for n, p in self.named_parameters if roles[n] is Role.ACTIVE]

    def _write(self, roles: dict[str, Role]) -> None:
        """Write ``roles`` into the engine: the fused plans, ``requires_grad``, the hook plans, the cut.  Under DDP
        (:attr:`_averaged` set) the fused plans (the linears, the head, the experts, the embedding) write through
        it, and the on-the-fly parameters outside the fused modules are listed in :attr:`_deferred`: they keep their
        role and ``requires_grad`` but get no hook plan, their gradients landing in ``.grad``."""
        role_of = {id(p): roles[n] for n, p in self.named_parameters}
        fused: set[int] = set()
        if self.engine is not None:
            self.engine.follow_head_reader()  # an on-the-fly head computed outside its module takes the hook path
            plans = {name: self._module_plan(name, module, role_of, fused)
                     for name, module in self.engine.fused_modules}
            plans.update({name: self._weight_plan(name, weight, role_of, fused)
                          for name, weight in self.engine.expert_weights()})
            self.engine.apply_plans(plans)
        self.unfused_on_the_fly = []
        for name, p in self.named_parameters:
            role = roles[name]
            if id(p) in fused:
                p.requires_grad_(role is Role.ACTIVE)
            else:
                p.requires_grad_(role is not Role.FROZEN)
                if role.updates_on_the_fly:
                    self.unfused_on_the_fly.append(name)
            if role is not Role.ACTIVE:
                p.grad = None
        self._deferred = {} if self._averaged is None else \
            {n: self.plan(roles[n], n, local=True) for n in self.unfused_on_the_fly}
        self.hook_plans = {} if self.library_hooks or self._averaged is not None else \
            {name: self.plan(roles[name], name) for name in self.unfused_on_the_fly}
        if self.engine is not None:
            self.engine.set_cut(lowest_needed_block(self._model_order, roles, self.engine.block_prefixes()))

    def end_step(self, label: str | None = None) -> int:
        """Read this step's finiteness flags (one host sync per device, as ``GradScaler`` reads ``found_inf``),
        warn once for the skipped on-the-fly updates, and return how many were skipped.  ``label`` names the step
        in the warning."""
        self._checks.resolve()
        if self.engine is not None:
            self.engine.forget_open_forwards()
        if not self._skipped:
            return 0
        skipped, self._skipped = self._skipped, []
        self.skipped_updates += len(skipped)
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped:
            by_reason.setdefault(reason, []).append(name)
        causes = "; ".join(f"{len(names)} because {reason} ({', '.join(sorted(set(names))[:5])}"
                           f"{', ...' if len(set(names)) > 5 else ''})" for reason, names in by_reason.items())
        warnings.warn(f"{label or self.what}: skipped {len(skipped)} on-the-fly update(s): {causes}; those weights "
                      "are unchanged", RuntimeWarning, stacklevel=3)
        return len(skipped)

    def set_loss_scaler(self, scaler) -> None:
        """Undo ``scaler``'s factor (a ``torch.amp.GradScaler``, or None for none) in the on-the-fly updates.

        On a patched model the scale is read once per forward, before it starts (wherever it starts: the model, or
        ``model.model(...)`` of a custom loss) — one host read, none in the backward; after ``scaler.update()`` the
        next forward sees the new scale (a backward whose forward ran no such read — the blocks called by hand —
        reads it again where the scaler changed it).  On the unpatched hook path it is read at each update.  An
        update whose scaled gradient overflowed is skipped (its gradient is not finite) and reported; the others of
        that backward are applied, unscaled."""
        self._check_open("set_loss_scaler")
        if self._scale_hook is not None:
            self._scale_hook.remove()
            self._scale_hook = None
        if scaler is None:
            if self.update is not None:
                self.update.loss_scale = 1.0
            return
        check_loss_scaler(scaler, self.what)
        if self.update is None:
            return  # nothing updates on the fly: nothing to unscale
        scale = _ScalerScale(scaler, refresh_each_call=self.model is None)
        self.update.loss_scale = scale
        if self.engine is not None:
            self._scale_hook = self.engine.add_forward_hooks(before=_RefreshScale(weakref.ref(scale)))
            self._handles.append(self._scale_hook)

    def check_loss_scaler_given(self) -> None:
        """Refuse (``RuntimeError``) a forward whose blocks computed under a float16 ``torch.autocast`` — the user's,
        or the one accelerate's ``prepare`` (the Hugging Face Trainer's ``fp16=True``) wraps the model's forward
        in — where SGD updates run on the fly and no loss scaler was given (:meth:`set_loss_scaler`): fp16 training
        scales the loss (``torch.amp.GradScaler``), and each update would take the scaled gradient, the scale
        (65,536 by default) times too large, silently.  Called after the forward, before its backward: nothing was
        written.  Not refused: SIGN updates (``sign(S·g) = sign(g)``), bfloat16 (no scaler needed), an update
        target with a loss scale of its own (ZeRO-3's), SGD weights that are float16 themselves (``GradScaler``
        cannot unscale their optimizer's fp16 gradients, so no such loss is scaled)."""
        if self.update is None or self.update_target is not None or self.engine is None:
            return
        if self.engine.stream.this_forward.autocast is not torch.float16 or \
                not _loss_scale_unset(self.update):
            return
        first = next((n for n, p in self.named_parameters
                      if self.roles.get(n) is Role.SGD and p.dtype != torch.float16), None)
        if first is None:
            return
        raise RuntimeError(
            f"{self.what}: this forward computed under torch.autocast(dtype=torch.float16), and the inactive weights "
            f"({first}, ...) take on-the-fly SGD updates inside the backward, but no loss scaler was given: where "
            "the loss is scaled (torch.amp.GradScaler: scaler.scale(loss).backward(), accelerate's "
            "accelerator.backward under mixed_precision='fp16', the Trainer's fp16=True) each update would take the "
            "scaled gradient, the scale (65,536 by default) times too large. Refused before anything was written. "
            "Give the scaler: BlockOptimizer(..., loss_scaler=scaler), bread_kernels.accelerate(..., "
            "loss_scaler=scaler) or optimizer.driver.set_loss_scaler(scaler) (with accelerate: accelerator.scaler; "
            "with the Trainer: bread_kernels.integrations.transformers.BreadCallback hands it the Trainer's own). If "
            "the loss is not scaled, give a disabled one: loss_scaler=torch.amp.GradScaler(enabled=False)")

    def plan(self, role: Role, name: str, local: bool = False) -> WeightPlan:
        """A plan of this driver: its update rule, skip reporting, finiteness checks and update target (the
        tensor itself where ``local``: an update applied from an averaged gradient)."""
        target = None if local else self._averaged or self.update_target
        return WeightPlan(role, self.update if role.updates_on_the_fly else None, name=name,
                          reporter=self._skip_collector, target=target, checks=self._checks,
                          writes=self._writes)

    # -- writing ------------------------------------------------------------------------------------------------
    def _checked_roles(self, roles: Mapping[str, Role | str]) -> dict[str, Role]:
        if not isinstance(roles, Mapping):
            raise TypeError(f"{self.what}.set_roles: roles must map every parameter name to a Role, got "
                            f"{type(roles).__name__}")
        missing = [n for n in self.names if n not in roles]
        unknown = [n for n in roles if n not in self._name_set]
        if missing or unknown:
            raise KeyError(f"{self.what}.set_roles: roles must name every parameter of named_parameters exactly; "
                           f"missing {missing[:3]}, unknown {unknown[:3]}")
        checked = {}
        for name in self.names:
            role = roles[name]
            try:
                checked[name] = role if isinstance(role, Role) else Role(role)
            except ValueError:
                raise ValueError(f"{self.what}.set_roles: {name}: unknown role {role!r}; use one of "
                                 f"{[r.value for r in Role]}") from None
            if checked[name] is Role.LORA:
                raise ValueError(f"{self.what}.set_roles: {name}: give a LoRA base weight FROZEN and its adapters "
                                 "ACTIVE; the LORA role is the engine's name for that pair")
        refuse_untrainable_targets(self.named_parameters, checked, f"{self.what}.set_roles")
        on_the_fly = [n for n, r in checked.items() if r.updates_on_the_fly]
        if self.update is None and on_the_fly:
            first = on_the_fly[0]
            raise ValueError(f"{self.what}.set_roles: {first} has role {checked[first].name}, an on-the-fly update, "
                             "but the driver has no update rule: pass update=OnTheFlyUpdate(lr=...)")
        if self.update_target is None and on_the_fly:
            named = dict(self.named_parameters)
            sharded = sharded_parameter((n, named[n]) for n in on_the_fly)
            if sharded is not None:
                raise TypeError(sharded_refusal(f"{self.what}.set_roles (an on-the-fly role)", sharded))
            wide = next(((n, named[n].dtype) for n in on_the_fly if named[n].dtype not in FLOAT_DTYPES), None)
            if wide is not None:
                raise TypeError(f"{self.what}.set_roles: {wide[0]} is {wide[1]} and has an on-the-fly role; the "
                                "on-the-fly update computes in float32, bfloat16 or float16. Cast the model first "
                                "(model.float()), or use sgd_mode='disabled' (BAdam), which trains float64 weights")
            if self.model is None:  # a patched model's forward checks (and runs them under DDP)
                self._check_ranks()
        return checked

    def _module_plan(self, name, module, role_of, fused: set[int]) -> WeightPlan | None:
        """The fused plan of one patched Linear or embedding, or None when its parameters must take the plain
        autograd path: a parameter outside this driver or shared with another module, a bias whose role is not its
        weight's, or a small block linear whose on-the-fly update this driver's hook applies
        (:meth:`~bread_kernels.patch.PatchedModel.updates_in_hook`)."""
        weight, bias = module.weight, getattr(module, "bias", None)
        params = [weight] + ([bias] if bias is not None else [])
        if any(id(p) not in role_of or id(p) in self.engine.shared_weights for p in params):
            return None
        role = role_of[id(weight)]
        if bias is not None and role_of[id(bias)] is not role:
            return None
        # a small weight: autograd's dW and this driver's hook cost less host time (patch()); not where the updates
        # write shards (ZeRO-3, whose small persistent weights are whole) or the library's own hooks apply them
        if role.updates_on_the_fly and self.update_target is None and not self.library_hooks and \
                self.engine.updates_in_hook(module):
            return None
        # a head computed outside its module (TRL's fused LM head): its fused backward never runs, so its update is
        # a hook's — this driver's, or the library's own (library_hooks: requires_grad on lets that hook fire)
        if role.updates_on_the_fly and self.update_target is None and self.engine.computed_outside(module):
            return None
        fused.update(id(p) for p in params)
        if role is Role.FROZEN and any(role_of.get(id(p)) is Role.ACTIVE for p in adapter_parameters(module)):
            role = Role.LORA  # the base weight is frozen, its adapters train
        return self.plan(role, name)

    def _weight_plan(self, name, weight, role_of, fused: set[int]) -> WeightPlan | None:
        """The fused plan of one weight with a plan of its own (an expert weight of a patched experts module), or
        None when it must take the plain autograd path."""
        if id(weight) not in role_of or id(weight) in self.engine.shared_weights:
            return None
        fused.add(id(weight))
        return self.plan(role_of[id(weight)], name)

    def _refuse_head_computed_outside(self) -> None:
        """Where the updates write shards (ZeRO-3's update target), refuse a forward that computes an on-the-fly head
        outside its module (TRL's fused LM head): its fused backward never runs, and the hook path that serves it
        elsewhere (:meth:`_module_plan`) writes no shard, so the head would silently never be updated."""
        head = self.engine.head
        role = next((self.roles.get(n) for n, p in self.named_parameters if head is not None and p is head.weight),
                    None)
        if role is not None and role.updates_on_the_fly:
            raise RuntimeError(
                f"{self.what}: the head ({role.name}, an on-the-fly update) is computed outside its module by "
                f"{self.engine.head_read_by}, so its fused update never runs, and under ZeRO-3 no hook can apply it "
                "to its shards instead. Use sgd_mode='disabled' (BAdam: the head then trains only as an active block, "
                "include_lm_head=True), or a trainer that computes the loss through the model's head (the Hugging "
                "Face Trainer) under ZeRO-3")

    # -- the hook path ------------------------------------------------------------------------------------------
    def _on_accumulated_grad(self, name: str, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a parameter outside the fused modules: its on-the-fly update."""
        plan = self.hook_plans.get(name)
        if plan is None or p.grad is None:
            return
        if self._replaced:  # the slow path's only check before a write (a patched model's forward checked already)
            self.check_parameters_held("this backward's on-the-fly updates")
        if self.model is None:  # no forward hook checks the ranks: a process group initialised after set_roles
            self._check_ranks()
        grad, p.grad = p.grad, None
        update_dense_(plan, p, grad)

    def _collect_skip(self, name: str, reason: str) -> None:
        self._skipped.append((name, reason))

    # -- DistributedDataParallel (optim/data_parallel.py) -------------------------------------------------------
    def _check_data_parallel(self, module: nn.Module) -> DataParallelForward | None:
        """Before each forward of the model (started at ``module``: the model, or a module below it on the way to
        the blocks): the DDP this forward runs under (None: none, or one rank).  Under DDP
        every rank must train the same parameters (checked once per roles, before any update), and the on-the-fly
        updates take the ranks' average (:meth:`_average_on_the_fly`); elsewhere in a group of several ranks they
        are refused; a DeepSpeed engine around the model is refused unless this driver writes ZeRO-3's shards, and
        then where the update target says so (:meth:`~bread_kernels.update.UpdateTarget.check_forward`).
        Refusals come before the forward runs."""
        self._finish_in_flight()
        if not torch.is_grad_enabled():
            return None
        if self.engine is not None and self.roles and self.engine.follow_head_reader():
            # a forward that computes the head outside its module (TRL's fused LM head, installed after the roles
            # were written): the head's plans are written again, once (PatchedModel.computed_outside)
            self._write(self.roles)
        if self.update_target is not None and self.engine is not None and self.engine.head_read_by is not None:
            self._refuse_head_computed_outside()
        # a DeepSpeed engine wraps the model, whichever module below it the forward started at (model.model(...))
        under_deepspeed = runs_under_deepspeed(self.model if self.model is not None else module)
        if self.update_target is not None:
            self.update_target.check_forward(under_deepspeed)
            if under_deepspeed:
                self._check_target_ranks_agree()
        elif under_deepspeed:
            raise RuntimeError(
                f"{self.what}: a DeepSpeed engine drives this model (deepspeed.initialize, or the Trainer's "
                "deepspeed=, which replaces the optimizer it is given with its own): ZeRO-1/2 replace this "
                "optimizer's parameters with flat partitions and ZeRO-3 partitions the weights, so block switches "
                "and on-the-fly updates would not reach them. Use bread_kernels.integrations.deepspeed "
                "(ZeroBlockOptimizer and initialize, ZeRO-3; under the Trainer's deepspeed=, a ZeroBlockOptimizer "
                "from its create_optimizer and BreadCallback), or DistributedDataParallel without DeepSpeed")
        dp = data_parallel_forward()
        on_the_fly = self._any_on_the_fly
        if on_the_fly and dp is not None and self.library_hooks:
            raise RuntimeError(
                f"{self.what}: this forward runs under DistributedDataParallel over {dp.world} ranks, and the "
                "library's own hooks update parameters on the fly with each rank's gradient: the replicas would "
                "drift apart. Use bread_kernels.BlockOptimizer, which averages them over the ranks, or DeepSpeed "
                "ZeRO-3 (bread_kernels.integrations.deepspeed)")
        if on_the_fly and dp is None:
            self._check_ranks()
        self._average_on_the_fly(dp if on_the_fly else None)
        if dp is not None:
            self._check_ranks_agree(dp.group)
        return dp

    def _check_target_ranks_agree(self) -> None:
        """Where the update target's writes pair the ranks' gradients (ZeRO-3's shards): its group's ranks agree
        (:meth:`_check_ranks_agree`), as a DDP group's must."""
        group = self.update_target.ranks_group()
        if group is not None:
            self._check_ranks_agree(group)

    def _check_ranks_agree(self, group) -> None:
        """Every rank of ``group`` trains the same parameters the same way (:meth:`_training_fingerprint`, one
        all-reduce): checked once per roles and group, before any update."""
        if self._ranks_agree is not None and self._ranks_agree() is group:
            return
        check_same_parameters(self._training_fingerprint(), group, self.what, self.named_parameters[0][1].device)
        self._ranks_agree = weakref.ref(group)

    def _training_fingerprint(self) -> list[str]:
        """What every rank of a DDP group (or of the update target's ``ranks_group``) must share: each trained
        parameter's role and where its update is taken (in the backward, through :attr:`_averaged`; at its end; by
        the optimizer), the on-the-fly rule's settings and the update target's own (``ranks_fingerprint``) — ranks
        patched or configured apart would issue different collectives or drift."""
        entries = [f"{n} {r.value} {'end' if n in self._deferred else 'backward' if r.updates_on_the_fly else ''}"
                   for n, r in self.roles.items() if r is not Role.FROZEN]
        if self.update is not None:
            update = self.update
            scale = update.scale if isinstance(update.scale, (int, float)) else type(update.scale).__name__
            entries.append(f"update {scale} {update.rounding.value} {update.seed} {update.draws} "
                           f"{chunk_budget_bytes()}")  # the budget decides how many all-reduces a weight takes
        if self.update_target is not None:
            entries += self.update_target.ranks_fingerprint()
        return entries

    def _average_on_the_fly(self, dp: DataParallelForward | None) -> None:
        """Under DDP the on-the-fly updates take the ranks' averaged gradient: the fused plans write through an
        :class:`AveragedTarget` over DDP's group, inside the backward; the rest (:meth:`_write`) at the end of it
        (:meth:`_finish_data_parallel_backward`).  Outside DDP the plans write the tensors with this rank's own
        gradient again."""
        current = self._averaged
        if (dp is None and current is None) or (dp is not None and current is not None and
                                                current._group() is dp.group and current.world == dp.world):
            return
        # set_roles wrote the plans for one process; the first DDP forward after it writes them again, once (what
        # the current target had in flight was finished by the caller, _check_data_parallel)
        self._averaged = None if dp is None else AveragedTarget(dp.group, dp.world)
        self._ranks_agree = None
        self._write(self.roles)

    def _finish_in_flight(self) -> None:
        """Complete the averaged updates still in flight: normally done at the end of the backward, not where that
        backward raised (every rank issued them); before a forward, a roles change and ``close()``."""
        if self._averaged is not None:
            self._averaged.finish()

    def _check_ranks(self) -> None:
        """Refuse on-the-fly roles whose updates stay this rank's own in a process group of several ranks."""
        world = several_ranks() if self.update_target is None else 0
        if world:
            raise RuntimeError(
                f"{self.what}: this process group has {world} ranks, and the on-the-fly updates (BREAD-SGD: sgd_mode "
                "'partial' or 'all') would use each rank's own gradient outside DistributedDataParallel, so the "
                "replicas would drift apart. Run the patched model under DistributedDataParallel (the optimizer "
                "then averages those updates over the ranks), or shard it with bread_kernels.integrations.deepspeed "
                "(ZeroBlockOptimizer and initialize, ZeRO-3), or use sgd_mode='disabled' (BAdam); if each rank trains "
                f"a model of its own, set {INDEPENDENT_RANKS_ENV}=1")

    def _finish_data_parallel_backward(self, dp: DataParallelForward) -> None:
        """At the end of a backward under DDP: average the ACTIVE parameters' gradients over its group where DDP
        synchronises (DDP averages only the parameters that required grad when it was built), and apply the
        deferred on-the-fly updates from their gradients' average at every backward (under ``no_sync()`` too, as
        each micro-batch's backward does in one process), before clipping or the step reads ``.grad``."""
        if self._closed:
            return
        if dp.syncs:
            average_gradients_((p for n, p in self.named_parameters if self.roles.get(n) is Role.ACTIVE), dp.group,
                               dp.world)
        deferred = [(n, p) for n, p in self.named_parameters if n in self._deferred]
        average_gradients_((p for _, p in deferred), dp.group, dp.world)
        with torch.no_grad():
            for name, p in deferred:
                if p.grad is not None:
                    grad, p.grad = p.grad, None
                    update_dense_(self._deferred[name], p, grad)

    def __repr__(self) -> str:
        return f"{self.what}({len(self.names)} parameters{', closed' if self._closed else ''})"


# -- what the hooks and plans hold: the driver, weakly -------------------------------------------------------------
class _GradHook:
    """A parameter's post-accumulate-grad hook; holds its driver weakly (the parameter must not keep it alive)."""

    __slots__ = ("driver", "name")

    def __init__(self, driver: "weakref.ref[EngineDriver]", name: str):
        self.driver, self.name = driver, name

    def __call__(self, p: torch.Tensor) -> None:
        driver = self.driver()
        if driver is not None and not driver.closed:
            driver._on_accumulated_grad(self.name, p)


class _ScalerScale:
    """A loss scaler's scale as the on-the-fly update reads it: the value read at the last refresh (before each
    forward of the patched model, wherever it starts; at every call on the hook path), read again where the
    scaler's scale changed since (a forward that ran no refresh — the blocks called by hand, below every module the
    refresh sits on — would divide out the value of an earlier step).  Whether it changed is seen without a
    host sync: ``GradScaler`` keeps its scale in a tensor that ``scale()`` creates and ``update()`` writes in place,
    bumping its version counter.  Holds the scaler weakly: the plans on the model must not keep it alive.  Read by
    an update while the enabled scaler has scaled no loss yet (no tensor), it refuses: that backward's gradients are
    not scaled, and dividing the initial scale out would make the updates that many times too small."""

    def __init__(self, scaler, refresh_each_call: bool):
        self.scaler = weakref.ref(scaler)
        self.refresh_each_call = refresh_each_call
        self.value = 1.0
        self.read_from = None  # the scale tensor (weakly) and its version at the last read; None: none yet
        self.refresh()

    def refresh(self) -> None:
        scaler = self.scaler()
        self.value = None if scaler is None else float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        tensor = _scale_tensor(scaler)
        self.read_from = (weakref.ref(tensor), tensor._version) if tensor is not None else None

    def _changed(self, scaler) -> bool:
        tensor = _scale_tensor(scaler)
        if tensor is None:
            return False
        if self.read_from is not None:
            read, version = self.read_from
            return read() is not tensor or tensor._version != version
        if tensor._version == 0:
            # the first scale() made the tensor since the last read, filled with the initial scale that read
            # returned: unchanged unless written since
            self.read_from = weakref.ref(tensor), 0
            return False
        return True

    def __call__(self) -> float:
        scaler = self.scaler()
        if self.refresh_each_call or (scaler is not None and self._changed(scaler)):
            self.refresh()
        if self.value is None:  # raised only when an update needs it: a forward alone (generation) never does
            raise RuntimeError("bread_kernels: the loss scaler given to set_loss_scaler no longer exists; give the "
                               "driver the live one (or None)")
        if self.read_from is None and self.value != 1.0 and _has_scaled_nothing(scaler):  # no tensor seen yet
            raise RuntimeError(
                f"bread_kernels: the loss scaler given (loss_scaler=, set_loss_scaler) is enabled but has scaled no "
                f"loss yet (scaler.scale(loss) was never called), so this backward's gradients are not scaled by "
                f"it, and dividing its scale ({self.value:g}) out would make the on-the-fly SGD updates that many "
                "times too small. Refused before this update was written. Scale the loss "
                "(scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()), or, where it is not "
                "scaled, give no loss scaler (or a disabled one, torch.amp.GradScaler(enabled=False))")
        return self.value


def _scale_tensor(scaler) -> torch.Tensor | None:
    """The tensor holding the scaler's scale (``torch.amp.GradScaler._get_scale_async``, private: there is no public
    way to ask for it without a host read), or None: no scaler, a disabled one, no tensor yet (before the first
    ``scale()``), or a scaler that keeps none — then a loss that calls the blocks by hand divides out a stale scale,
    which ``tests/optim/test_loss_scale.py::test_a_forward_that_starts_below_the_model_divides_out_the_current_scale``
    fails on (its ``blocks`` case)."""
    if scaler is None or not scaler.is_enabled():
        return None  # a disabled GradScaler keeps no scale (its _get_scale_async raises AttributeError)
    get = getattr(scaler, "_get_scale_async", None)
    tensor = get() if callable(get) else None
    return tensor if isinstance(tensor, torch.Tensor) else None


def _has_scaled_nothing(scaler) -> bool:
    """Whether ``scaler`` is a ``torch.amp.GradScaler`` whose ``scale()`` never ran: it makes its scale's tensor
    there (read through the private ``_get_scale_async``, as :func:`_scale_tensor` does); a scaler-like object
    without that method is not judged."""
    get = getattr(scaler, "_get_scale_async", None)
    return scaler.is_enabled() and callable(get) and get() is None


def _loss_scale_unset(update: OnTheFlyUpdate) -> bool:
    """Whether ``update`` divides no loss scale out because none was given (its default, 1), rather than because a
    scaler or a scale was given (a disabled ``GradScaler`` among them)."""
    scale = update.loss_scale
    return isinstance(scale, (int, float)) and scale == 1.0


def _nothing():
    """What the model's hooks hold in a copy of the model (``copy.deepcopy``, pickle) instead of a weak reference
    to the driver or its loss scale: the copy is not driven, and its hooks do nothing."""
    return None


class _RefreshScale:
    """Reads the loss scale before each forward of the patched model, wherever it starts (holds it weakly)."""

    def __init__(self, scale: "weakref.ref[_ScalerScale]"):
        self.scale = scale

    def __reduce__(self):
        return _RefreshScale, (_nothing,)

    def __call__(self, module, args) -> None:
        scale = self.scale()
        if scale is not None:
            scale.refresh()


class _RunningForward(threading.local):
    forward: DataParallelForward | None = None  # a class default: None in a thread that never set it


class _ForwardHooks:
    """What runs once per forward of the patched model, wherever it starts (the model, or ``model.model(...)`` of
    a custom loss: :meth:`~bread_kernels.patch.PatchedModel.add_forward_hooks`): :meth:`before` refuses, with grad,
    a model whose parameters were replaced (:meth:`EngineDriver.check_parameters_held`) and notes the DDP the
    forward runs under, refusing an on-the-fly role there; :meth:`after` puts hooks on the outputs that require
    grad, which a backward reaches first — :class:`_StaleGraphGuard` where the model updates weights on the fly (on
    the head's output too where a custom loss calls it apart), and under a DDP forward that synchronises
    :class:`_QueueAverage`.  Holds the driver weakly.  The DDP forward noted is per thread, as the forwards are
    (an evaluation under ``torch.no_grad()`` in another thread does not clear the training forward's).  A forward
    that ``torch.export`` traces does neither: export swaps fake tensors into the parameters while it traces, which
    the check of the parameters held would take for a model whose parameters were replaced, and what it captures is
    an inference graph.  A forward that ``torch.jit.trace`` records with grad enabled is refused: the recorded graph
    would run plain autograd with the plans and cut of the step it was traced at, never the engine's updates (and
    the tracer would fail inside the first fused function on the backward trigger, a constant that requires grad)."""

    def __init__(self, driver: "weakref.ref[EngineDriver]"):
        self.driver = driver
        self.running = _RunningForward()

    def __reduce__(self):
        return _ForwardHooks, (_nothing,)

    def before(self, module, args) -> None:
        self.running.forward = None
        driver = self.driver()
        if driver is None or driver.closed or torch.compiler.is_exporting():
            return
        if torch.is_grad_enabled():  # a forward without grad (evaluating loaded weights) trains nothing
            if torch.jit.is_tracing():
                raise RuntimeError(
                    f"{driver.what}: torch.jit.trace of a patched model that this optimizer drives, with grad "
                    "enabled: the traced graph would hold this step's plans and cut and run plain autograd, never "
                    "the fused backward's updates, so training through it would silently leave weights unchanged. "
                    "Trace for inference under torch.no_grad() (the model's own forward: the unpatched model's "
                    "graph), or torch.export.export it; train the patched model itself")
            driver.check_functional_call()
            driver.check_parameters_held()
        self.running.forward = driver._check_data_parallel(module)

    def after(self, module, args, output) -> None:
        dp, self.running.forward = self.running.forward, None
        driver = self.driver()
        if driver is None or driver.closed or not torch.is_grad_enabled() or torch.compiler.is_exporting():
            return
        head_apart = driver.engine is not None and module is driver.engine.head
        if output is not None and not head_apart:  # (None: the forward raised, and that error is the one to see)
            driver.check_loss_scaler_given()
        hooks = []
        epoch = forward_epoch()
        guarded = driver._any_on_the_fly and driver._drives_a_patched_model
        if guarded and head_apart:
            epoch = driver._head_input_epoch(args, epoch)
            guarded = epoch is not None
        if guarded:  # registered first: it runs first
            hooks.append(_StaleGraphGuard(driver._writes, epoch, driver.what))
        if dp is not None and (dp.syncs or driver._deferred):
            hooks.append(_QueueAverage(self.driver, dp))
        if hooks:
            for value in _outputs_requiring_grad(output):
                for hook in hooks:
                    value.register_hook(hook)
                if guarded and not head_apart:
                    driver._output_epochs[value] = epoch


def _outputs_requiring_grad(output):
    """The tensors of a forward's output that require grad: the output itself, or the values of its dict (a
    ``ModelOutput``), tuples and lists, at any depth."""
    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _outputs_requiring_grad(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _outputs_requiring_grad(value)


class _StaleGraphGuard:
    """The hook on every output of one forward of a model whose optimizer updates weights on the fly: refuses a
    backward through that forward's graph once an on-the-fly write came after the forward (:class:`OnTheFlyWrites`),
    at the first output the backward reaches, before any node of the graph runs, so nothing is written; the outputs
    that backward reaches later (hidden states, router logits, attention weights: the blocks above them have run and
    written by then) pass, as the first did."""

    __slots__ = ("writes", "epoch", "what", "admitted")

    def __init__(self, writes: OnTheFlyWrites, epoch: int, what: str):
        self.writes, self.epoch, self.what = writes, epoch, what
        self.admitted = None  # the backward the first output reached let through

    def __call__(self, grad):
        backward = running_backward()
        if backward is None or backward == self.admitted:  # torch without the id: no guard rather than a wrong one
            return
        if self.writes.made_stale(self.epoch):
            raise RuntimeError(
                f"{self.what}: this backward runs through a graph whose forward ran before an earlier backward "
                "updated the model's inactive weights on the fly (the SGD and sign roles write them in place inside "
                "the backward): its gradients would flow through weights that forward never used. Refused before "
                "anything was written. Run each forward's backward before the next forward with grad enabled, or "
                "add the losses and call backward once ((loss_a + loss_b).backward()); a second backward of one "
                "graph (retain_graph=True) is refused for the same reason")
        self.admitted = backward


class _QueueAverage:
    """A hook on a DDP forward's output: queues the driver's average of the active gradients for the end of the
    backward, the first time that backward reaches one of the outputs (again in a second backward of the graph)."""

    def __init__(self, driver: "weakref.ref[EngineDriver]", dp: DataParallelForward):
        self.driver, self.dp, self.queued = driver, dp, False

    def __call__(self, grad):
        if not self.queued:
            self.queued = True
            queue_after_backward(self._after_ddp)

    def _after_ddp(self) -> None:
        # queued from a callback, it runs after every callback queued before: DDP's own end of the backward, which
        # writes its bucket averages into .grad (it queues itself only once its last bucket is ready, after this
        # hook), so nothing it writes lands on a gradient already applied
        queue_after_backward(self._average)

    def _average(self) -> None:
        self.queued = False
        driver = self.driver()
        if driver is not None:
            driver._finish_data_parallel_backward(self.dp)


class _SkipCollector:
    """A plan's reporter: the skipped updates go to the driver's per-step report (held weakly)."""

    def __init__(self, driver: EngineDriver):
        self.driver = weakref.ref(driver)

    def __call__(self, name: str, reason: str) -> None:
        driver = self.driver()
        if driver is not None:
            driver._collect_skip(name, reason)


def _release_hooks(handles: list, engine_ref) -> None:
    """Remove a driver's hooks (at close(), or when it is collected) and, if nothing drives the patched model any
    more, its plans: a model outliving its driver trains with plain autograd."""
    for handle in handles:
        handle.remove()
    handles.clear()
    engine = engine_ref() if engine_ref is not None else None
    if engine is not None and engine.driver is None:
        engine.clear_plans()


def take_over_parameters(named, what: str, keep_requires_grad: bool = False) -> None:
    """Close the live drivers (and their owners) that own any of ``named``, with a warning: one driver per
    parameter, so re-running a notebook cell never leaves two sets of hooks on one model.  ``keep_requires_grad``:
    the parameters keep the flags they have now (a library's new optimizer set them; the old owner's close gives
    back its own library's)."""
    flags = [(p, p.requires_grad) for _, p in named] if keep_requires_grad else []
    previous = []
    for _, p in named:
        driver = _OWNERS.get(p)
        driver = driver() if driver is not None else None
        if driver is not None and not driver.closed and all(driver is not d for d in previous):
            previous.append(driver)
    for driver in previous:
        owner = driver.owner
        warnings.warn(f"{what}: these parameters belonged to a live {owner!r}; it was closed (its hooks and plans "
                      "removed, its step() now raises) and this one takes them over. Call close() on what you "
                      "replace to silence this.", RuntimeWarning, stacklevel=4)
        (owner if owner is not None else driver).close()
        driver.close()
    for p, flag in flags:
        p.requires_grad_(flag)


# -- argument checks -----------------------------------------------------------------------------------------------
def check_loss_scaler(scaler, what: str) -> None:
    """Raise unless ``scaler`` is None or looks like a ``torch.amp.GradScaler``."""
    if scaler is not None and not (callable(getattr(scaler, "get_scale", None))
                                   and callable(getattr(scaler, "is_enabled", None))):
        raise TypeError(f"{what}: loss_scaler must be a torch.amp.GradScaler (get_scale, is_enabled), got "
                        f"{type(scaler).__name__}")


def parameter_names_by_id(model: nn.Module) -> dict[int, str]:
    """``id(parameter) → name`` over ``model.named_parameters()``."""
    return {id(p): n for n, p in model.named_parameters()}


def check_parameters_of(model: nn.Module, named, what: str) -> None:
    """Raise unless every ``(name, parameter)`` of ``named`` is that parameter of ``model`` under that name."""
    own = parameter_names_by_id(model)
    for name, p in named:
        if id(p) not in own:
            raise ValueError(f"{what}: parameter {name!r} is not a parameter of the {type(model).__name__}; pass "
                             "list(model.named_parameters()) of the model the optimizer was built over")
        if own[id(p)] != name:
            raise ValueError(f"{what}: parameter named {name!r} is {own[id(p)]!r} in the {type(model).__name__}; "
                             "pass list(model.named_parameters()) of that model (a model patched before a wrapper "
                             "such as peft.get_peft_model: bread_kernels.unpatch(wrapper), then patch(wrapper); a "
                             "model taken out of a patched one, as peft's merge_and_unload() returns it: "
                             "bread_kernels.unpatch(it), then patch(it))")


def refuse_untrainable_targets(named_parameters, roles: Mapping[str, Role], what: str, when: str = "") -> None:
    """Refuse (``ValueError``, naming the remedies) roles that would train a weight nothing can write: FROZEN is
    fine for both kinds below (LoRA adapters train over a quantized base; accelerate's hook hands the forward an
    offloaded weight's values).  ``when`` says which block gave the roles.  First any trained weight that is

    * quantized (:func:`~bread_kernels.quantized.quantized_weight`: bitsandbytes' int8/4-bit, HQQ, fp8, torchao's
      and quanto's subclasses): neither Adam (ACTIVE) nor an on-the-fly update (SGD/SIGN) can be written into its
      packed elements (torch refuses ``requires_grad`` on an integer tensor; a subclass's update would land in a
      dequantized copy, or no gradient reaches it at all);

    then any that is on the meta device (:mod:`bread_kernels.offload`: offloaded by accelerate, or never loaded):
    the gradient and any update would reach only a temporary copy that accelerate's hook drops after the forward,
    so the weight would silently stay as it was."""
    trained = [(name, p, roles[name]) for name, p in named_parameters if roles[name] is not Role.FROZEN]
    for name, p, role in trained:
        stored = quantized_weight(p)
        if stored is None:
            continue
        raise ValueError(
            f"{what}: parameter {name} is a quantized weight ({stored}), which block coordinate descent cannot "
            f"update in place, and it would be {role.name}{when} (Adam trains the active block's weights, "
            "sgd_mode gives the inactive ones an on-the-fly update). Train LoRA adapters over the quantized base "
            "instead (peft; lora_mode='adapter_only' with sgd_mode='disabled' keeps every base weight frozen), "
            "leave the quantized weights out of named_parameters_list ([(n, p) for n, p in "
            "model.named_parameters() if bread_kernels.quantized.quantized_weight(p) is None]), or load the model "
            "unquantized (dtype=torch.bfloat16) to train its weights")
    for name, p, role in trained:
        if p.device.type == "meta":
            raise ValueError(meta_parameter_refusal(what, name, role.name, when))


def check_named_parameters(named_parameters, what: str) -> list[tuple[str, nn.Parameter]]:
    try:
        items = list(named_parameters)
    except TypeError:
        raise TypeError(f"{what}: named_parameters_list must be list(model.named_parameters())") from None
    if not items or not all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                            and isinstance(i[1], torch.Tensor) for i in items):
        raise TypeError(f"{what}: named_parameters_list must be a non-empty list of (name, parameter) pairs, as "
                        "list(model.named_parameters()) gives")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{what}: parameter name {duplicate!r} appears twice in named_parameters_list")
    first_name: dict[int, str] = {}
    for name, p in items:
        other = first_name.setdefault(id(p), name)
        if other != name:
            raise ValueError(f"{what}: {other!r} and {name!r} are one tensor (tied weights) listed twice in "
                             "named_parameters_list, so its hooks and roles would act on it twice; pass "
                             "list(model.named_parameters()), which lists a shared tensor once (not "
                             "named_parameters(remove_duplicate=False))")
    return items


def _refuse_parameters_shared_with_a_driven_model(model: nn.Module, named, what: str) -> None:
    """Refuse to drive a patched model that shares a parameter with another patched model driven by a live driver
    (an embedding or a block given to two models), where one of the two drivers trains it: each driver writes the
    plans of every fused module of its own model, so the one that does not list the shared module's weight would
    reset the other's plan at each switch (the shared weight then silently stops training), and its cut would stop
    the backward before the gradient the reference's hook takes from its model's loss."""
    mine = {id(p) for _, p in named}
    own = parameter_names_by_id(model)
    for other in patched_models():
        if other is model:
            continue
        engine = patched_state(other)
        driver = engine.driver if engine is not None else None
        if driver is None or getattr(driver, "closed", False):
            continue
        for name, p in other.named_parameters():
            if id(p) not in own:
                continue
            owner = _OWNERS.get(p)
            listed_there = owner is not None and owner() is not None and not owner().closed
            if id(p) in mine or listed_there:
                raise ValueError(
                    f"{what}: parameter {own[id(p)]!r} of this {type(model).__name__} is also {name!r} of another "
                    f"patched {type(other).__name__}, which a live {driver!r} drives: a module shared between two "
                    "models trained by two optimizers is not supported (each writes its own model's plans, and the "
                    "shared weight would silently stop training). Give each model its own copy of the module "
                    "(copy.deepcopy), leave the shared parameters out of both optimizers' named_parameters_list "
                    "(they stay frozen), or bread_kernels.unpatch() one of the models")


def _watch_parameter_replacements() -> None:
    """Register :func:`_on_parameter_registered` with torch, once."""
    global _REPLACEMENT_HOOK
    if _REPLACEMENT_HOOK is None:
        _REPLACEMENT_HOOK = torch.nn.modules.module.register_module_parameter_registration_hook(
            _on_parameter_registered)


def _on_parameter_registered(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """torch's global parameter-registration hook (``register_parameter``: ``load_state_dict(sd, assign=True)``,
    ``module.weight = nn.Parameter(...)``), called before ``module._parameters[name]`` changes: where the parameter it
    replaces belongs to a live driver, that driver probes it from now on.  The model need not be known — what the
    slow path (an unpatched model) lacks for :func:`held_parameter_probes`.  One dictionary read for a parameter no
    driver owns."""
    old = module._parameters.get(name)
    owner = _OWNERS.get(old) if old is not None and old is not param else None
    driver = owner() if owner is not None else None
    if driver is not None and not driver.closed:
        driver._note_replaced(module, name, old)


def held_parameter_probes(model: nn.Module, named, block_prefixes: list[str]) -> list[tuple]:
    """:func:`_parameter_probes` of a bounded sample of ``named`` (parameters of ``model`` under those names): the
    first and last of the list, and in each block (``block_prefixes``) the first parameter and the first that
    requires grad now (a peft model's adapters, which peft's ``load_adapter(..., low_cpu_mem_usage=True)`` replaces
    alone) — what :meth:`EngineDriver.check_parameters_held` compares with what the modules hold.  One pass over the
    names."""
    blocks = set(block_prefixes)
    stack = block_prefixes[0][:-len("0.")] if block_prefixes else None  # "model.layers." ("" for the model itself)
    first_of_block: dict[str, tuple[str, nn.Parameter]] = {}
    first_trained_of_block: dict[str, tuple[str, nn.Parameter]] = {}
    for name, p in named:
        if stack is not None and name.startswith(stack):
            index, dot, _ = name[len(stack):].partition(".")
            block = f"{stack}{index}."
            if dot and block in blocks:
                first_of_block.setdefault(block, (name, p))
                if p.requires_grad:
                    first_trained_of_block.setdefault(block, (name, p))
    return _parameter_probes(model, [named[0], named[-1], *first_of_block.values(), *first_trained_of_block.values()])


def _parameter_probes(model: nn.Module, named) -> list[tuple]:
    """``(name, weakref to the owning module, attribute, parameter)`` of each of ``named`` that ``model`` holds
    under its name, each parameter once."""
    probes, seen = [], set()
    for name, p in named:
        module_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(module_name)
        except AttributeError:
            continue
        if id(p) not in seen and owner._parameters.get(attr) is p:
            seen.add(id(p))
            probes.append((name, weakref.ref(owner), attr, p))
    return probes


def owning_patched_model(named, what: str) -> nn.Module | None:
    """The patched model these parameters come from (names checked), or None if none of them is patched.

    Another patched model may hold some of them too (an embedding or a block shared between two models, a teacher's
    frozen embedding given to its student): the model that holds every one of them under its name is theirs; only
    where none does are the names checked against a model that holds some, which says what is wrong."""
    ids = {id(p) for _, p in named}
    overlapping = []
    for model in patched_models():
        own = parameter_names_by_id(model)
        if all(own.get(id(p)) == name for name, p in named):
            return model
        if ids & own.keys():
            overlapping.append(model)
    if overlapping:  # none holds them all: name the first misplaced parameter
        check_parameters_of(overlapping[0], named, what)
    return None
