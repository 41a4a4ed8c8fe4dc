"""The layer-streaming backward: one ``autograd.Function`` per block of the stack.

Forward, for block ℓ of L, with the cut c (the lowest block whose backward the step needs):

* ℓ < c: the block runs under ``no_grad`` and stores nothing — no backward will ever reach it.
* ℓ ≥ c, ``recompute=True``: :class:`BlockFunction` runs the block under ``no_grad`` and saves only its input
  (and the RNG state); its backward recomputes the block with grad enabled, runs the block's backward — the fused
  Linear functions inside apply each weight's Role — and returns dX, or nothing for the lowest needed block.
* ℓ ≥ c, ``recompute=False``: the block runs under plain autograd (activations kept); the fused Linear functions
  still apply the Roles.

A block with on-the-fly work but whose input does not require grad (the lowest needed block) is given a backward
trigger so autograd still visits it.  Tensor arguments other than the hidden states (attention mask, rotary
cos/sin) are passed through unchanged and must not require grad.
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

from .functions.linear import backward_trigger

__all__ = ["StreamConfig", "BlockFunction", "streamed_block_forward"]


@dataclass
class StreamConfig:
    """Shared by every block of one patched model; the block optimizer writes ``cut``."""

    recompute: bool = True
    cut: int = 0
    #: how many block backwards ran (recompute + backward), by block index; for tests and benchmarks
    backward_calls: dict = field(default_factory=dict)


def _rng_state(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _restored_rng(state, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        yield


def _split_output(output):
    """(tensors, rebuild): the floating tensors of a block's output and how to put the output back together."""
    if isinstance(output, torch.Tensor):
        return (output,), lambda ts: ts[0]
    if isinstance(output, (tuple, list)):
        positions = [i for i, o in enumerate(output) if isinstance(o, torch.Tensor) and o.is_floating_point()]
        kind = type(output)

        def rebuild(ts):
            items = list(output)
            for i, t in zip(positions, ts):
                items[i] = t
            return kind(items) if kind in (tuple, list) else kind(*items)

        return tuple(output[i] for i in positions), rebuild
    raise TypeError(
        f"bread_kernels: a block returned {type(output).__name__}; the streaming backward supports blocks that return "
        "a tensor or a tuple of tensors (patch(model, recompute=False) runs any block under plain autograd)"
    )


class BlockFunction(torch.autograd.Function):
    """Inputs: run (hidden -> output of the block), config, index, meta (receives ``rebuild``), hidden, trigger.

    Returns the floating tensors of the block's output; ``meta["rebuild"]`` puts them back into the block's own
    output structure (non-tensor items such as ``None`` come from the no-grad forward).
    """

    @staticmethod
    def forward(ctx, run: Callable, config: StreamConfig, index: int, meta: dict, hidden: torch.Tensor, trigger):
        ctx.run, ctx.config, ctx.index = run, config, index
        ctx.rng = _rng_state(hidden.device)
        ctx.save_for_backward(hidden)
        with torch.no_grad():
            output = run(hidden)
        tensors, meta["rebuild"] = _split_output(output)
        meta["count"] = len(tensors)
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        (hidden,) = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[4]
        ctx.config.backward_calls[ctx.index] = ctx.config.backward_calls.get(ctx.index, 0) + 1
        inp = hidden.detach().requires_grad_(needs_dx)
        with torch.enable_grad(), _restored_rng(ctx.rng, hidden.device):
            tensors, _ = _split_output(ctx.run(inp))
        pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return None, None, None, None, (inp.grad if needs_dx else None), None


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
    for name, value in arguments.items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else (value,)
        for t in values:
            if name != hidden_name and isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"bread_kernels: block argument {name!r} requires grad; the streaming backward only carries the "
                    "hidden states' gradient. Use patch(model, recompute=False) for this model."
                )

    def run(h):
        # the autograd graph keeps ``run`` (in ctx) until it is freed: holding no hidden state here keeps a block's
        # recomputed input (and its .grad) from living on after the block's backward
        arguments[hidden_name] = h
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            arguments[hidden_name] = None

    trigger = None
    if not hidden.requires_grad:
        if not block_has_work(block):
            with torch.no_grad():
                return run(hidden)
        trigger = backward_trigger()
    meta: dict = {}
    out = BlockFunction.apply(run, config, index, meta, hidden, trigger)
    return meta["rebuild"](out if meta["count"] > 1 else (out,))


@functools.lru_cache(maxsize=1024)
def _signature(forward) -> inspect.Signature:
    """The signature of a block's bound forward (without ``self``); one entry per patched block."""
    return inspect.signature(forward)
