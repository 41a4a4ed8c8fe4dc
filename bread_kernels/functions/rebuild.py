"""Inputs a fused function rebuilds in its backward instead of saving them: the output of a cheap elementwise
function whose own inputs are saved anyway (selective activation checkpointing, by hand).

In a block that keeps its activations (a top block the stream keeps, see :mod:`bread_kernels.stream`), a linear
with an on-the-fly, LoRA or ACTIVE role saves its input ``x`` (for dW, or the adapters' dA).  In a Llama block
those inputs are

    n₁ = RMSNorm(h)          [T, K]   for q, k, v     (the norm saves h and rstd [T, 1] itself)
    n₂ = RMSNorm(h₁)         [T, K]   for gate, up    (the norm saves h₁ and rstd)
    m  = silu(a) · u         [T, I]   for down        (the product saves a and u)

so a block keeps ``2K + I`` values per token (of about ``9K + 3I`` in all) that one elementwise pass over what is
saved anyway gives back bit for bit.  Inside :func:`rebuilding_outputs` the producers attach to their output how
to rebuild it (:func:`mark_rebuildable`: a function and the tensors it reads); a consumer saves those tensors in
place of its input (:func:`saved_input`), which then costs no storage of its own, and its backward calls
:meth:`SavedInput.restore`.  Consumers of one output (q, k and v read the same n₁) share one rebuild: the first
backward computes it, the last one frees it.  Less memory per kept block lets the stream keep more blocks in the
same budget, and a kept block saves its whole recompute (a block's GEMMs and attention) for these few passes.

The rebuild runs the producer's own ops on the same tensors, so its values are the forward's bit for bit; a
tensor the rebuild reads that is a parameter is read from a copy taken in the forward (its size is a weight's
row: an RMSNorm's [K]), so an update of that parameter before the backward, or its partitioning by ZeRO-3, cannot
change the rebuilt values.  Outside :func:`rebuilding_outputs` (blocks the stream recomputes, whose saved tensors
live only during their own backward) nothing is marked and every input is saved as it is.

The same sharing serves the LoRA adapters in every block: peft keeps a bf16 model's adapters in fp32, and each
adapter's dA = s·vᵀx̃ reads x̃ = fp32(x) [T, K].  A LoRA function saves x (not x̃) and casts it in its backward;
``saved_input(x, share=True)`` lets the consumers of one x (q, k, v; gate, up) make that cast once, kept only
until the last of them has run.  A cast is shared only by consumers that read x at one version: a write between
two consumers' forwards, or a count a forward dropped without its backward left too high, gets a cast of its own.
A write to a marked output, or to a tensor its rebuild reads, before a consumer saves it makes that consumer save
the output as it is.  A double backward through a rebuilt input is refused (the rebuild has no graph).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .recompute import ThreadFlag

__all__ = ["rebuilding_outputs", "is_rebuilding_outputs", "mark_rebuildable", "rebuildable", "saved_input",
           "SavedInput"]

_state = ThreadFlag()
_RECIPE_ATTR = "_bread_kernels_rebuild"


@contextlib.contextmanager
def rebuilding_outputs():
    """Within this context (thread-local), the producers mark their outputs rebuildable (:func:`mark_rebuildable`)
    and the consumers save the rebuild's tensors in place of such an output."""
    outer = is_rebuilding_outputs()
    _state.active = True
    try:
        yield
    finally:
        _state.active = outer


def is_rebuilding_outputs() -> bool:
    return _state.active


class _Shared:
    """What the consumers of one input share in their backward while some have yet to run (``uses``): the rebuilt
    input, and its casts (a LoRA adapter's fp32 copy of a bf16 input), each made by the first that needs it."""

    __slots__ = ("value", "casts", "uses")

    def __init__(self):
        self.value, self.casts, self.uses = None, {}, 0


class _Recipe:
    """``rebuild(*tensors)`` gives the output's values while the output and the tensors are as when marked
    (``versions``: theirs then; a write since makes a consumer save the output as it is)."""

    __slots__ = ("rebuild", "tensors", "shared", "versions")

    def __init__(self, rebuild, tensors, versions):
        self.rebuild, self.tensors, self.shared, self.versions = rebuild, tensors, _Shared(), versions


def mark_rebuildable(output: torch.Tensor, rebuild: Callable[..., torch.Tensor],
                     *tensors: torch.Tensor) -> torch.Tensor:
    """Within :func:`rebuilding_outputs`: attach to ``output`` that ``rebuild(*tensors)`` gives its values bit for
    bit (parameters among ``tensors`` are copied: see the module docstring).  Returns ``output``."""
    if not torch.compiler.is_compiling() and is_rebuilding_outputs():
        kept = tuple(t.detach().clone() if isinstance(t, torch.nn.Parameter) else t for t in tensors)
        setattr(output, _RECIPE_ATTR, _Recipe(rebuild, kept, _versions(output, kept)))
    return output


def rebuildable(x: torch.Tensor) -> bool:
    """Whether ``x`` is an output marked rebuildable and unchanged since (a consumer that saves it saves less)."""
    return _live_recipe(x) is not None


def _live_recipe(x: torch.Tensor) -> _Recipe | None:
    """``x``'s recipe, where neither ``x`` nor a tensor the rebuild reads was written since marking."""
    recipe = getattr(x, _RECIPE_ATTR, None)
    return recipe if recipe is not None and recipe.versions == _versions(x, recipe.tensors) else None


class SavedInput:
    """How a consumer's backward gets its input back from what it saved: that tensor itself, or a rebuild shared
    with the input's other consumers.  It holds no tensor (they go through ``ctx.save_for_backward``, so
    saved-tensor hooks and checkpointing see them)."""

    __slots__ = ("_rebuild", "_shared", "_version")

    def __init__(self, rebuild=None, shared=None, version=0):
        self._rebuild, self._shared, self._version = rebuild, shared, version

    def restore(self, saved: tuple[torch.Tensor, ...], cast_to: torch.dtype | None = None):
        """The input, from ``saved``: the entries of ``ctx.saved_tensors`` that :func:`saved_input` gave.  With
        ``cast_to``: ``(input, input in that dtype)``, the cast made once for all the consumers that share it."""
        shared = self._shared
        if shared is None:
            x = saved[0] if saved else None
            return x if cast_to is None else (x, _cast(x, cast_to))
        if self._rebuild is not None and torch.is_grad_enabled():
            raise RuntimeError(
                "bread_kernels: a double backward (create_graph=True) reached a linear of a kept block, whose input "
                "is rebuilt without its graph; patch the model with keep_top=0 to differentiate the backward")
        x = shared.value
        if x is None:
            x = self._rebuild(*saved) if self._rebuild is not None else saved[0]
        cast = None
        if cast_to is not None:  # keyed by x's version in the forward: a write between two consumers' forwards,
            key = (cast_to, self._version)  # or a count left high by a graph dropped unrun, gets its own cast
            cast = shared.casts.get(key)
            if cast is None:
                cast = _cast(x, cast_to)
        shared.uses -= 1
        if shared.uses > 0:
            shared.value = x if self._rebuild is not None else None
            if cast is not None and cast is not x:
                shared.casts[key] = cast
        else:  # the last consumer's backward frees what they shared
            shared.value, shared.casts = None, {}
        return x if cast_to is None else (x, cast)


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _versions(output: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return (output._version, *(t._version for t in tensors))


_AS_IS = SavedInput()
_SHARED_ATTR = "_bread_kernels_shared_input"


def saved_input(x: torch.Tensor | None, share: bool = False) -> tuple[tuple[torch.Tensor, ...], SavedInput]:
    """What a consumer saves for its input ``x`` (None: nothing) and how its backward gets ``x`` back: the tensors
    ``x``'s rebuild reads where ``x`` is an output marked in :func:`rebuilding_outputs`, else ``x`` itself.  The
    backward calls :meth:`SavedInput.restore` once (a shared input counts its consumers).  ``share``: ``x`` as it
    is is shared too, so the consumers' backward casts it once (a LoRA layer's adapters, whose fp32 copy of a bf16
    input q, k and v would each make)."""
    if x is None:
        return (), _AS_IS
    recipe = _live_recipe(x)
    if recipe is not None:
        recipe.shared.uses += 1
        return recipe.tensors, SavedInput(recipe.rebuild, recipe.shared, x._version)
    if not share or torch.compiler.is_compiling():
        return (x,), _AS_IS
    shared = getattr(x, _SHARED_ATTR, None)
    if shared is None:
        shared = _Shared()
        setattr(x, _SHARED_ATTR, shared)
    shared.uses += 1
    return (x,), SavedInput(None, shared, x._version)
