"""The layer-streaming backward: which blocks of the stack run under autograd, and how they are recomputed.

Forward, for block ℓ of L, with the cut c (the lowest block whose backward the step needs):

* ℓ < c: the block runs under ``no_grad`` and stores nothing — no backward will ever reach it.
* ℓ ≥ c, ``recompute=True``: the block runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved):
  its graph is built but only its input is kept; the backward recomputes the saved tensors — stopping as soon as
  the last one the backward needs exists, so a pre-norm block's last GEMM is never recomputed (see
  :mod:`bread_kernels.functions.recompute`) — and the fused Linear functions inside apply each weight's Role.
  The lowest needed block's input needs no gradient, so autograd computes no dX for it.
* ℓ ≥ c, ``recompute=False``: the block runs under plain autograd (activations kept); the fused Linear functions
  still apply the Roles.

A block with on-the-fly work whose input does not require grad (the lowest needed block) is still visited by the
backward: its fused functions take a backward trigger.  Other arguments (attention mask, rotary cos/sin, any tensor
that requires grad) are passed through to every run of the block; the checkpoint carries their gradients too.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .functions.recompute import recomputing

__all__ = ["StreamConfig", "streamed_block_forward"]


@dataclass
class StreamConfig:
    """Shared by every block of one patched model; the block optimizer writes ``cut``."""

    recompute: bool = True
    cut: int = 0
    #: how many times each block was recomputed in a backward, by block index; for tests and benchmarks
    backward_calls: dict = field(default_factory=dict)


def block_has_work(block: nn.Module) -> bool:
    """Whether the block's backward would do anything: a parameter needs a gradient or a fused on-the-fly update."""
    for module in block.modules():
        plan = getattr(module, "_bread_plan", None)
        if plan is not None and plan.role.updates_on_the_fly:
            return True
    return any(p.requires_grad for p in block.parameters())


# the KV cache's names across transformers versions (5.24 renamed ``past_key_values`` to ``cache``)
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def streamed_block_forward(block: nn.Module, original: Callable, config: StreamConfig, index: int,
                           *args: Any, **kwargs: Any):
    """The forward installed on each block by :func:`bread_kernels.patch`."""
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    if getattr(block, "gradient_checkpointing", False):
        block.gradient_checkpointing = False  # HF's checkpointing was enabled after patch(): ours replaces it
        warnings.warn("bread_kernels: the model's gradient checkpointing is replaced by the streaming backward's own "
                      "recompute; turned the layers' gradient_checkpointing flag off", RuntimeWarning, stacklevel=2)
    if index < config.cut:
        with torch.no_grad():
            return original(*args, **kwargs)
    if not config.recompute:
        return original(*args, **kwargs)

    bound = _signature(original).bind(*args, **kwargs)
    arguments = bound.arguments
    hidden_name = next(iter(arguments))
    hidden = arguments[hidden_name]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"bread_kernels: block {index}'s first argument is {type(hidden).__name__}, not hidden states")
    # a recomputed block must not write a KV cache a second time (what HF's own checkpointing does too); layers
    # that only read the cache say so with HF's ``_can_checkpoint_with_cache`` and keep it
    if not getattr(block, "_can_checkpoint_with_cache", False):
        for name in _CACHE_ARGUMENTS:
            if arguments.get(name) is not None:
                arguments[name] = None
    if arguments.get("use_cache"):
        arguments["use_cache"] = False
    other_tensors_need_grad = any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for name, value in arguments.items() if name != hidden_name
        for t in (value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else (value,))
    )

    calls = 0

    def run(h):
        # the autograd graph keeps ``run`` until it is freed: holding no hidden state here keeps a block's
        # recomputed input (and its .grad) from living on after the block's backward
        nonlocal calls
        calls += 1
        recompute = calls > 1  # checkpoint calls ``run`` once in the forward, again in the backward
        if recompute:
            config.backward_calls[index] = config.backward_calls.get(index, 0) + 1
        arguments[hidden_name] = h
        try:
            with recomputing() if recompute else contextlib.nullcontext():
                return original(*bound.args, **bound.kwargs)
        finally:
            arguments[hidden_name] = None

    if not (hidden.requires_grad or other_tensors_need_grad or block_has_work(block)):
        with torch.no_grad():
            return run(hidden)
    return checkpoint(run, hidden, use_reentrant=False, preserve_rng_state=True)


@functools.lru_cache(maxsize=1024)
def _signature(forward) -> inspect.Signature:
    """The signature of a block's bound forward (without ``self``); one entry per patched block."""
    return inspect.signature(forward)
