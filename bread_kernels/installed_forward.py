"""The forwards ``patch`` installs on a model's modules, bound to their module weakly.

An instance attribute ``module.forward = types.MethodType(fn, module)`` holds its module strongly from the module's
own ``__dict__``: a reference cycle per patched module, so a dropped patched model was freed only when Python's cycle
collector ran — at a time of its choosing, so ``del model; torch.cuda.empty_cache()`` kept a GPU model's weights.
:func:`install_forward` installs an :class:`InstalledForward` instead: called, it calls ``fn(module, ...)``; it reads
as a bound method where libraries look (``__func__``, ``__self__``: accelerate rebinds ``forward.__func__`` under
its autocast; ``inspect.signature``: the Trainer keeps the batch columns the forward names), and a deep copy of the
module gets one bound to the copy, as a bound method's deep copy is.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
import weakref
from typing import Callable

from torch import nn

__all__ = ["InstalledForward", "install_forward", "NOT_PICKLED"]

#: why a patched model (its engine state, its modules' installed forwards) refuses pickling
NOT_PICKLED = ("bread_kernels: a patched model does not pickle whole (its engine state holds its model and optimizer "
               "weakly); save model.state_dict() or save_pretrained(), or bread_kernels.unpatch(model) first")


def _call(self: "InstalledForward", *args, **kwargs):
    module = self._module()
    if module is None:
        raise RuntimeError(
            "bread_kernels: this forward's module was freed: a patched module's forward holds its module weakly "
            "(so a dropped model is freed at once); keep a reference to the model (or the module) while calling "
            "its forward")
    return self.__func__(module, *args, **kwargs)


class InstalledForward:
    """``fn`` bound to ``module`` weakly (see the module docstring); :func:`install_forward` makes each one of a
    subclass whose ``__call__`` is :func:`_call` under a code object of its own."""

    __slots__ = ("__func__", "_module", "__signature__", "__weakref__")

    def __init__(self, fn: Callable, module: nn.Module):
        self.__func__ = fn
        self._module = weakref.ref(module)
        self.__signature__ = inspect.signature(types.MethodType(fn, module))

    @property
    def __self__(self) -> nn.Module:
        return self._module()

    __call__ = _call

    def __getattr__(self, name: str):
        """What a bound method reads through to its function: ``__code__`` (``torch.export`` reads the forward's),
        ``__name__``, ``__qualname__``, ``__wrapped__``, ``__defaults__``."""
        if name == "__func__":  # not set yet (an object under construction): no recursion
            raise AttributeError(name)
        return getattr(self.__func__, name)

    def __deepcopy__(self, memo: dict) -> "InstalledForward":
        return type(self)(self.__func__, copy.deepcopy(self._module(), memo))

    def __reduce__(self):
        raise TypeError(NOT_PICKLED)

    def __repr__(self) -> str:
        module = self._module()
        return f"<installed forward {getattr(self.__func__, '__qualname__', self.__func__)} of {type(module).__name__}>"


#: module class -> {fn's code -> the InstalledForward subclass whose ``__call__`` has a code object of its own}:
#: by the code, so that the function a patch builds afresh for each model (a closure) reuses its subclass; weakly by
#: the class, which a model class defined at run time (``trust_remote_code``) must not outlive
_classes: "weakref.WeakKeyDictionary[type, dict]" = weakref.WeakKeyDictionary()


def _installed_forward_class(fn: Callable, module_class: type) -> type:
    """An :class:`InstalledForward` subclass for ``fn`` on ``module_class``, whose ``__call__`` is :func:`_call`
    with a code object of its own.  ``torch.compile`` caches the graphs of a frame by its code object, at most
    ``recompile_limit`` (8) of them: one shared ``__call__`` for every installed forward of every model (norms,
    blocks, embeddings, the causal LM: a module class and argument dtypes each) reached that limit in one training
    loop with an evaluation or in a process that compiles a second model family, and from there ran eagerly; an
    unpatched model's forwards are one code object per module class."""
    per_class = _classes.setdefault(module_class, {})
    key = getattr(fn, "__code__", fn)
    cls = per_class.get(key)
    if cls is None:
        name = f"{module_class.__name__}_{getattr(fn, '__name__', 'forward')}"
        names = {"co_name": name}
        if sys.version_info >= (3, 11):  # co_qualname is 3.11's
            names["co_qualname"] = f"InstalledForward.{name}"
        call = types.FunctionType(_call.__code__.replace(**names), _call.__globals__, name)
        cls = per_class[key] = type(f"InstalledForward_{name}", (InstalledForward,),
                                    {"__slots__": (), "__call__": call})
    return cls


def install_forward(module: nn.Module, fn: Callable) -> None:
    """``module.forward`` becomes ``fn(module, ...)``, bound weakly (removed by ``module.__dict__.pop("forward")``)."""
    module.forward = _installed_forward_class(fn, type(module))(fn, module)
