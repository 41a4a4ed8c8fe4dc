"""The engine under other block-coordinate-descent libraries: :func:`accelerate` and :func:`unaccelerate`.

The library keeps its optimizer, its ``step()``, its schedule, its state and its checkpoints; the engine learns its
active set after each of the library's switches and writes its own plans and cut from it (through the protocol of
:class:`~bread_kernels.optim.driver.EngineDriver`).  What each library looks like, and what is read from it (its
internals: everything read here and nowhere else, checked by :func:`internals_problems`):

* ``badam.BlockOptimizer`` (PyPI ``badam``, tested with 1.4): ``switch_trainable_params()`` (run in ``__init__`` and
  inside ``step()``) sets ``requires_grad`` on exactly the active parameters (in LoRA mode only the active block's
  adapters) and rebuilds the base optimizer over fp32 copies; ``step()`` asserts that every active parameter has a
  ``.grad``.  Learnt: ``requires_grad`` after each switch -> ACTIVE, the rest FROZEN.
* ``badam.BlockOptimizerRatio``: every trainable parameter stays trainable and a post-accumulate-grad hook masks its
  gradient (``sparse_mask``) for a sparse Adam.  Learnt: ``requires_grad`` -> ACTIVE, once (it never switches).  The
  masks keep working because the engine returns each dense dW to autograd as plain autograd does; what the engine
  saves there is only what a cut saves (nothing runs below the lowest trainable block, whose dX is not computed) —
  every dW is still materialised, in full, for the mask.
* Microsoft BlockOptimizers' ``BlockOptimizer`` (or any optimizer with its attributes): like badam, plus
  ``sgd_mode`` (``"all"``/``"partial"``: the inactive parameters it leaves ``requires_grad`` take an SGD/sign step
  in a post-accumulate-grad hook registered on every parameter and never removed).  ``sgd_lr_scaling`` and
  ``sgd_use_sign`` live only in those hooks' closures: they are read from there (the hook's free variables
  ``self``, ``lr_scaling``, ``use_sign``, found through torch's ``Tensor._post_accumulate_grad_hooks``:
  :func:`_hook_settings`), an :func:`accelerate` setting that differs is refused, and where the closures cannot be
  read the two settings are required.  Learnt: a parameter matching ``active_param_prefixs`` (the hook's own test)
  and ``requires_grad`` -> ACTIVE; another with ``requires_grad`` -> SGD (SIGN with ``sgd_use_sign``), lr read
  from ``param_groups[0]["lr"]`` at backward time as the hook does.  The engine takes over the fused weights'
  updates (their ``requires_grad`` is turned off, so the library's hook never fires on them); the library's own
  hooks keep updating the parameters outside the fused modules (norms, biases of unfused layers), exactly as
  before.
* :class:`bread_kernels.BlockOptimizer`: already the engine's; ``accelerate`` returns it unchanged.

Anything else is refused with an error naming these and the protocol.
"""

from __future__ import annotations

import importlib.metadata
import math
import numbers
import warnings
import weakref

import torch
from torch import nn

from ..optim.block_optimizer import BlockOptimizer
from ..optim.driver import (EngineDriver, check_loss_scaler, check_parameters_of, owning_patched_model,
                            take_over_parameters)
from ..patch import check_patch_of, check_patch_options, patch, patched_state, unpatch
from ..plan import OnTheFlyUpdate, Role, Rounding

__all__ = ["accelerate", "unaccelerate", "accelerated", "Acceleration", "internals_problems", "optimizer_kind",
           "TESTED_BADAM"]

#: the badam release whose internals this module was written against (others warn once)
TESTED_BADAM = "1.4"
_ATTR = "_bread_acceleration"
_SETTINGS = ("sgd_lr_scaling", "sgd_use_sign", "rounding", "seed", "loss_scaler", "patch_options")
_warned_version = False


def accelerate(optimizer, model: nn.Module | None = None, **settings):
    """Put the engine under another BCD library's optimizer and return the same optimizer.

    Patches ``model`` if it is not yet (``patch_options`` are :func:`bread_kernels.patch`'s keywords), learns the
    library's active set now and after each of its switches (by wrapping ``switch_trainable_params`` on the
    instance), and writes the engine's plans and cut from it; the library's own ``step()``, schedule, state and
    checkpoints keep working.  ``step()`` is wrapped too: it first reads the last backward's finiteness flags (one
    host sync, as ``GradScaler`` does) and reports skipped on-the-fly updates, from a step pre-hook.
    :func:`unaccelerate` restores the library's own behaviour.

    Args:
        optimizer: ``badam.BlockOptimizer``, ``badam.BlockOptimizerRatio``, an optimizer with Microsoft
            BlockOptimizers' attributes (``named_parameters_list``, ``block_prefix_list``,
            ``switch_trainable_params``, ``active_param_prefixs``, ``sgd_mode``), or a
            :class:`bread_kernels.BlockOptimizer` (returned unchanged).
        model: the model whose ``named_parameters()`` the optimizer was built over; may be omitted when the model
            is already patched.
        sgd_lr_scaling: BlockOptimizers' ``sgd_lr_scaling``, the value given to its constructor, which keeps it
            only in its hooks' closures (with ``sgd_mode`` other than ``"disabled"``): read from them where they can
            be read, and then a value given here must be theirs; required where they cannot.
        sgd_use_sign: BlockOptimizers' ``sgd_use_sign`` (likewise).
        rounding: the on-the-fly updates' rounding of bf16/fp16 weights (``"auto"``: stochastic;
            ``"nearest"``: rounding to nearest as the library's hook does, of the update made from the fp32 dW
            with the exact ``lr·s``; the hook's ``add_`` on a CPU also rounds ``alpha`` to bf16, so an element
            may differ from it by an ulp: see the README).
        seed: seeds the stochastic rounding.
        loss_scaler: the ``torch.amp.GradScaler`` scaling the loss (fp16): the on-the-fly updates divide its scale
            out (the libraries' own hooks do not) and skip a weight whose scaled gradient overflowed.
        patch_options: keywords for :func:`bread_kernels.patch` when ``accelerate`` patches the model.

    Raises ``TypeError`` for an optimizer it does not support and ``ValueError`` for a model that is not the
    optimizer's or missing settings — before anything is touched.
    """
    check_settings(settings, "accelerate")
    if isinstance(optimizer, BlockOptimizer):
        return _own_optimizer(optimizer, model, settings)
    existing = accelerated(optimizer)
    if existing is not None:
        raise RuntimeError("accelerate: this optimizer is already accelerated; call unaccelerate(optimizer) first to "
                           "change its settings")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"accelerate: optimizer must be a torch.optim.Optimizer (a BCD library's optimizer), got "
                        f"{type(optimizer).__name__}")
    kind = _kind(optimizer)
    named = list(optimizer.named_parameters_list)
    model = _check_model(model, named, type(optimizer).__name__)
    acceleration = Acceleration(optimizer, model, kind, settings)
    optimizer.__dict__[_ATTR] = acceleration  # the optimizer keeps it alive; it holds the optimizer weakly
    return optimizer


def check_settings(settings: dict, what: str) -> None:
    """Refuse :func:`accelerate` settings that are wrong whatever the optimizer and model: an unknown name, a value
    of the wrong type or range (``sgd_lr_scaling``, ``sgd_use_sign``, ``rounding``, ``seed``, ``loss_scaler``,
    ``patch_options``).  Whether the optimizer makes the on-the-fly updates they set is checked by ``accelerate``."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise TypeError(f"{what}: unknown setting(s) {unknown}; the settings are {', '.join(_SETTINGS)}")
    check_loss_scaler(settings.get("loss_scaler"), what)
    seed = settings.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{what}: seed must be an int >= 0, got {seed!r}")
    if not isinstance(settings.get("rounding", Rounding.AUTO), Rounding):
        try:
            Rounding(settings["rounding"])
        except ValueError:
            raise ValueError(f"{what}: unknown rounding {settings['rounding']!r}; use one of "
                             f"{[r.value for r in Rounding]}") from None
    _check_sgd_values(settings.get("sgd_lr_scaling", 1.0), settings.get("sgd_use_sign", False), what)
    check_patch_options(settings.get("patch_options", {}), what)


def unaccelerate(optimizer):
    """Restore the library's own behaviour on an optimizer :func:`accelerate` accelerated (its hooks, its
    ``requires_grad`` flags, its methods; the model unpatched if ``accelerate`` patched it) and return it.
    Harmless on one that is not accelerated."""
    acceleration = optimizer.__dict__.pop(_ATTR, None)
    if acceleration is not None:
        acceleration.close()
    return optimizer


def accelerated(optimizer) -> "Acceleration | None":
    """The live :class:`Acceleration` of ``optimizer``, or None."""
    acceleration = getattr(optimizer, "__dict__", {}).get(_ATTR)
    return acceleration if acceleration is not None and not acceleration.closed else None


class Acceleration:
    """The engine attached to one library optimizer (built by :func:`accelerate`; :meth:`close` undoes it)."""

    def __init__(self, optimizer, model: nn.Module, kind: str, settings: dict):
        self.kind = kind
        self.closed = True
        self.optimizer_ref = weakref.ref(optimizer)
        sgd_mode = getattr(optimizer, "sgd_mode", "disabled") if kind == "blockoptimizers" else "disabled"
        held = _hook_settings(optimizer) if sgd_mode != "disabled" else None
        scale, self.sign = _sgd_settings(kind, sgd_mode, settings, held)
        rounding = settings.get("rounding", Rounding.AUTO)
        seed = settings.get("seed", 0)
        update = None
        unused = [k for k in ("rounding", "seed") if k in settings and sgd_mode == "disabled"]
        if unused:
            raise ValueError(f"accelerate: {', '.join(unused)} given, but this {kind} optimizer makes no on-the-fly "
                             "update (they set its rounding); leave them out")
        if sgd_mode != "disabled":
            update = OnTheFlyUpdate(lr=_LibraryLr(optimizer), scale=scale,
                                    rounding=rounding, seed=seed)
        named = list(optimizer.named_parameters_list)
        check_patch_of(model, settings.get("patch_options", {}), "accelerate")  # before a live owner is closed
        # first: a previous owner of these parameters (a notebook cell re-run) is closed, which may unpatch; its
        # close gives back its library's flags, which are the old optimizer's: this one's are kept
        take_over_parameters(named, "accelerate", keep_requires_grad=True)
        self.patched_here = patch_if_needed(model, settings.get("patch_options", {}), "accelerate")
        self.model_ref = weakref.ref(model)
        self._library_flags = {name: p.requires_grad for name, p in named}
        self._step_hook = self._switch = None
        try:
            self.driver = EngineDriver(named, update=update, owner=self, library_hooks=True,
                                       what=f"accelerate({type(optimizer).__name__})")
            if settings.get("loss_scaler") is not None:
                self.driver.set_loss_scaler(settings["loss_scaler"])
            self.closed = False
            self.learn()
            self._warn_scaled_library_hooks(settings.get("loss_scaler"))
            # the step's finiteness flags are read before the library's step (torch's public step pre-hook); the
            # switch has no public hook, so it is wrapped on the instance
            self._step_hook = optimizer.register_step_pre_hook(_StepPreHook(self))
            if kind != "ratio":
                self._switch = _SwitchWrapper(optimizer, self)
                optimizer.__dict__["switch_trainable_params"] = self._switch
        except BaseException:
            self.closed = True
            if self._step_hook is not None:
                self._step_hook.remove()
            if getattr(self, "driver", None) is not None:
                self.driver.close()
            for name, p in named:
                p.requires_grad_(self._library_flags[name])
            if self.patched_here and patched_state(model) is not None:
                unpatch(model)
            raise

    def _warn_scaled_library_hooks(self, scaler) -> None:
        """The library's own hooks step the parameters outside the fused modules with the scaled gradient."""
        if scaler is None:
            return
        outside = [n for n in self.driver.unfused_on_the_fly if self.driver.roles[n] is Role.SGD]  # SIGN: unscaled
        if outside:
            warnings.warn(f"accelerate: the engine divides the loss scale out of the fused SGD steps, but the "
                          f"library's own hooks step {outside[:3]}{' ...' if len(outside) > 3 else ''} (outside the "
                          "fused modules) with the scaled gradient, as they do without the engine", RuntimeWarning,
                          stacklevel=4)

    # -- learning the active set ------------------------------------------------------------------------------
    def roles(self) -> dict[str, Role]:
        """Each parameter's Role as the library has set things up now."""
        optimizer = self.optimizer_ref()
        on_the_fly = Role.SIGN if self.sign else Role.SGD
        roles = {}
        prefixes = list(getattr(optimizer, "active_param_prefixs", [])) if self.kind == "blockoptimizers" else []
        for name, p in optimizer.named_parameters_list:
            if not p.requires_grad:
                roles[name] = Role.FROZEN
            elif self.kind != "blockoptimizers" or any(prefix in name for prefix in prefixes):
                roles[name] = Role.ACTIVE
            else:  # BlockOptimizers: requires_grad but inactive means an SGD target of its hook
                roles[name] = on_the_fly
        return roles

    def learn(self) -> None:
        """Read the library's active set (after its switch) and write the engine's plans and cut from it."""
        if self.closed:
            return
        optimizer = self.optimizer_ref()
        self._library_flags = {name: p.requires_grad for name, p in optimizer.named_parameters_list}
        self.driver.set_roles(self.roles())

    def end_step(self) -> None:
        if not self.closed:
            self.driver.end_step(f"{type(self.optimizer_ref()).__name__} step")

    def close(self) -> None:
        """Back to the library's own behaviour: the engine's plans and cut removed, the ``requires_grad`` flags the
        library set restored (its hooks then fire as before), the step pre-hook removed, ``switch_trainable_params``
        restored (where nothing wrapped it since; otherwise the wrapper stays, as a pass-through), and the model
        unpatched if ``accelerate`` patched it."""
        if self.closed:
            return
        self.closed = True
        self.driver.close()
        optimizer = self.optimizer_ref()
        if self._step_hook is not None:
            self._step_hook.remove()
        if optimizer is not None:
            if self._switch is not None and optimizer.__dict__.get("switch_trainable_params") is self._switch:
                if self._switch.previous is None:
                    del optimizer.__dict__["switch_trainable_params"]
                else:
                    optimizer.__dict__["switch_trainable_params"] = self._switch.previous
            for name, p in optimizer.named_parameters_list:
                if name in self._library_flags:
                    p.requires_grad_(self._library_flags[name])
            if optimizer.__dict__.get(_ATTR) is self:
                del optimizer.__dict__[_ATTR]
        model = self.model_ref()
        if self.patched_here and model is not None and patched_state(model) is not None:
            unpatch(model)

    def __repr__(self) -> str:
        return f"Acceleration({self.kind}{', closed' if self.closed else ''})"


def patch_if_needed(model: nn.Module, options: dict, what: str) -> bool:
    """Patch ``model`` with ``options`` unless it is patched already (then ``options`` must be empty: they could not
    apply); return whether this call patched it."""
    if patched_state(model) is not None:
        if options:
            raise ValueError(f"{what}: patch options {sorted(options)} were given but the model is already patched; "
                             "unpatch it or leave them out")
        return False
    patch(model, **options)
    return True


class _SwitchWrapper:
    """``switch_trainable_params`` on the instance: the library's switch, then the engine learns the new active set.
    Holds the optimizer and the acceleration weakly (the optimizer holds this), so no reference cycle forms."""

    def __init__(self, optimizer, acceleration: Acceleration):
        self.previous = optimizer.__dict__.get("switch_trainable_params")  # an instance attribute, if any
        self.function = type(optimizer).switch_trainable_params
        self.optimizer = weakref.ref(optimizer)
        self.acceleration = weakref.ref(acceleration)

    def __call__(self, *args, **kwargs):
        if self.previous is not None:
            result = self.previous(*args, **kwargs)
        else:
            result = self.function(self.optimizer(), *args, **kwargs)
        acceleration = self.acceleration()
        if acceleration is not None:
            acceleration.learn()
        return result


class _StepPreHook:
    """The optimizer's step pre-hook: report the finished backward's skipped updates (held weakly)."""

    def __init__(self, acceleration: Acceleration):
        self.acceleration = weakref.ref(acceleration)

    def __call__(self, optimizer, args, kwargs):
        acceleration = self.acceleration()
        if acceleration is not None:
            acceleration.end_step()


class _LibraryLr:
    """The library's scheduled lr, ``param_groups[0]["lr"]``, read at backward time (what its SGD hook reads);
    held by plans on the model, so it holds the optimizer weakly."""

    def __init__(self, optimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self) -> float:
        optimizer = self.optimizer()
        if optimizer is None:
            raise RuntimeError("bread_kernels: the optimizer accelerate() was attached to no longer exists")
        return optimizer.param_groups[0]["lr"]


# -- recognising the library -----------------------------------------------------------------------------------
_BLOCKOPTIMIZERS_ATTRIBUTES = ("named_parameters_list", "block_prefix_list", "switch_trainable_params",
                               "active_param_prefixs", "sgd_mode", "param_groups", "step")
_BADAM_ATTRIBUTES = ("named_parameters_list", "block_prefix_list", "switch_trainable_params",
                     "active_param_prefixs", "param_groups", "step", "base_optimizer")
_RATIO_ATTRIBUTES = ("named_parameters_list", "param_groups", "step", "sparse_dict")


def _badam_classes() -> tuple:
    try:
        import badam
    except ImportError:
        return ()
    _check_badam_version()
    return badam.BlockOptimizer, badam.BlockOptimizerRatio


def _check_badam_version() -> None:
    global _warned_version
    try:
        version = importlib.metadata.version("badam")
    except importlib.metadata.PackageNotFoundError:
        return
    if version != TESTED_BADAM and not _warned_version:
        _warned_version = True
        warnings.warn(f"accelerate: badam {version} is installed; this integration reads badam's internals "
                      f"(see bread_kernels.integrations.bcd) and was tested with {TESTED_BADAM}; "
                      "internals_problems(optimizer) lists what no longer matches", RuntimeWarning, stacklevel=4)


def optimizer_kind(optimizer) -> str | None:
    """Which library's BCD optimizer ``optimizer`` is: ``"ratio"`` (badam's BlockOptimizerRatio), ``"badam"``,
    ``"blockoptimizers"`` (Microsoft BlockOptimizers' attributes), or None."""
    classes = _badam_classes()
    if classes and isinstance(optimizer, classes[1]):
        return "ratio"
    if classes and isinstance(optimizer, classes[0]):
        return "badam"
    if all(hasattr(optimizer, a) for a in _BLOCKOPTIMIZERS_ATTRIBUTES):
        return "blockoptimizers"
    return None


def _kind(optimizer) -> str:
    kind = optimizer_kind(optimizer)
    if kind is None:
        raise TypeError(
            f"accelerate: {type(optimizer).__module__}.{type(optimizer).__name__} is not a supported BCD optimizer. "
            "Supported: badam.BlockOptimizer, badam.BlockOptimizerRatio, an optimizer with Microsoft BlockOptimizers' "
            f"attributes ({', '.join(_BLOCKOPTIMIZERS_ATTRIBUTES)}), and bread_kernels.BlockOptimizer. Another "
            "library can drive the engine through the protocol: bread_kernels.EngineDriver(named_parameters, "
            "update=...).set_roles({name: Role}) at each switch and .end_step() at each step (see the README)"
        )
    problems = internals_problems(optimizer, kind)
    if problems:
        raise TypeError(f"accelerate: this {type(optimizer).__name__} does not have the internals the integration "
                        f"reads: {'; '.join(problems)}")
    return kind


def internals_problems(optimizer, kind: str | None = None) -> list[str]:
    """What the integration reads from a library optimizer and does not find (empty when everything is there): a
    test runs it on the real classes so that a library release that changes them fails loudly."""
    kind = kind or optimizer_kind(optimizer) or "blockoptimizers"
    wanted = {"ratio": _RATIO_ATTRIBUTES, "badam": _BADAM_ATTRIBUTES,
              "blockoptimizers": _BLOCKOPTIMIZERS_ATTRIBUTES}[kind]
    problems = [f"no attribute {a!r}" for a in wanted if not hasattr(optimizer, a)]
    if not problems:
        named = optimizer.named_parameters_list
        if not isinstance(named, list) or not all(isinstance(i, tuple) and len(i) == 2 for i in named):
            problems.append("named_parameters_list is not a list of (name, parameter) pairs")
        if kind != "ratio" and not isinstance(getattr(optimizer, "active_param_prefixs"), list):
            problems.append("active_param_prefixs is not a list of name prefixes")
        if kind != "ratio" and not callable(getattr(optimizer, "switch_trainable_params")):
            problems.append("switch_trainable_params is not callable")
    return problems


def _hook_settings(optimizer) -> tuple[float, bool] | None:
    """``(sgd_lr_scaling, sgd_use_sign)`` as BlockOptimizers' SGD hooks hold them: the free variables
    ``lr_scaling`` and ``use_sign`` of a post-accumulate-grad hook whose ``self`` is ``optimizer`` (its
    ``sgd_hook(n, lr_scaling, use_sign)``), on the first parameter that has one; None where none can be read (another
    library, another torch), and then nothing is checked."""
    for _, p in optimizer.named_parameters_list:
        for hook in list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()):
            code, cells = getattr(hook, "__code__", None), getattr(hook, "__closure__", None) or ()
            free = dict(zip(getattr(code, "co_freevars", ()), cells))
            if not {"self", "lr_scaling", "use_sign"} <= free.keys():
                continue
            try:
                if free["self"].cell_contents is optimizer:
                    return free["lr_scaling"].cell_contents, free["use_sign"].cell_contents
            except ValueError:  # an empty cell
                continue
    return None


def _sgd_settings(kind: str, sgd_mode: str, settings: dict,
                  held: tuple[float, bool] | None = None) -> tuple[float | None, bool]:
    """Check the on-the-fly settings against the library's mode and, where they could be read, against the values
    its hooks hold (``held``: :func:`_hook_settings`, which also serves a setting left out); return
    ``(sgd_lr_scaling, sgd_use_sign)`` (None, False where the library makes no on-the-fly update)."""
    given = [k for k in ("sgd_lr_scaling", "sgd_use_sign") if k in settings]
    if sgd_mode not in ("disabled", "all", "partial"):
        raise ValueError(f"accelerate: the optimizer's sgd_mode is {sgd_mode!r}; expected 'disabled', 'all' or "
                         "'partial'")
    if sgd_mode == "disabled":
        if given:
            raise ValueError(f"accelerate: {', '.join(given)} given, but this {kind} optimizer makes no on-the-fly "
                             "update (sgd_mode is 'disabled' or it has none); leave them out")
        return None, False
    missing = [k for k in ("sgd_lr_scaling", "sgd_use_sign") if k not in settings]
    if missing and held is None:
        raise ValueError(f"accelerate: the optimizer has sgd_mode={sgd_mode!r}, whose {' and '.join(missing)} "
                         "live only in its hooks' closures, which could not be read: pass the values you gave its "
                         "constructor, e.g. accelerate(optimizer, model, sgd_lr_scaling=1.0, sgd_use_sign=False)")
    scale = settings["sgd_lr_scaling"] if "sgd_lr_scaling" in settings else held[0]
    sign = settings["sgd_use_sign"] if "sgd_use_sign" in settings else held[1]
    _check_sgd_values(scale, sign, "accelerate")
    if held is not None and (float(held[0]) != float(scale) or bool(held[1]) != sign):
        raise ValueError(f"accelerate: sgd_lr_scaling={scale!r}, sgd_use_sign={sign!r} given, but the optimizer's SGD "
                         f"hooks hold sgd_lr_scaling={held[0]!r}, sgd_use_sign={held[1]!r} (what its constructor got), "
                         "which they keep applying to the parameters outside the fused modules: pass those, or "
                         "leave them out (they are read from the hooks)")
    return float(scale), sign


def _check_sgd_values(scale, sign, what: str) -> None:
    """BlockOptimizers' ``sgd_lr_scaling`` (a finite number >= 0) and ``sgd_use_sign`` (a bool)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{what}: sgd_lr_scaling must be a finite number >= 0, got {scale!r}")
    if not isinstance(sign, bool):
        raise TypeError(f"{what}: sgd_use_sign must be True or False, got {sign!r}")


def _check_model(model, named, what: str) -> nn.Module:
    """The model the optimizer's parameters belong to (given, or the patched one they come from)."""
    if model is None:
        model = owning_patched_model(named, f"accelerate({what})")
        if model is None:
            raise ValueError(f"accelerate: pass the model the {what} was built over: accelerate(optimizer, model)")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    check_parameters_of(model, named, f"accelerate({what})")
    from .deepspeed.internals import any_partitioned  # no DeepSpeed import: its parameter attributes only

    if any_partitioned(p for _, p in named):
        raise NotImplementedError("accelerate: the model is partitioned by DeepSpeed ZeRO-3; use "
                                  "bread_kernels.integrations.deepspeed (ZeroBlockOptimizer and initialize) instead")
    return model


def _own_optimizer(optimizer: BlockOptimizer, model, settings: dict) -> BlockOptimizer:
    if settings:
        raise ValueError(f"accelerate: {sorted(settings)} given for a bread_kernels.BlockOptimizer, which takes its "
                         "settings in its constructor; leave them out")
    if optimizer.closed:
        raise RuntimeError("accelerate: this BlockOptimizer was closed; build a new one")
    if model is not None and optimizer.model is not None and model is not optimizer.model:
        raise ValueError("accelerate: the BlockOptimizer drives another model than the one given")
    if optimizer.engine is None:
        raise ValueError("accelerate: this BlockOptimizer was built over an unpatched model and runs the reference's "
                         "hook path; call bread_kernels.patch(model) before building it (or use "
                         "bread_kernels.integrations.transformers.BreadCallback, which patches before training)")
    return optimizer
