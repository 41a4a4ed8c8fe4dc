"""Data-parallel training as a block optimizer sees it from inside the forward of the model it drives:
DistributedDataParallel, a DeepSpeed engine, or several ranks with neither.

A block optimizer changes, at each block switch, which parameters require grad; DDP registers the ones that require
grad when it is built (a Trainer builds it after the optimizer: the first block's), so it never averages a later
block's gradients, and the replicas drift apart without an error.  The driver therefore averages the active
parameters' gradients itself, at the end of every backward DDP synchronises (not under ``no_sync()``), before
clipping or the optimizer reads them: over DDP's process group, in place.  A gradient DDP averaged as well is
averaged again (the same value on every rank; an extra all-reduce of that block).  An on-the-fly update
(``SGD``/``SIGN``) cannot run inside a DDP backward, where each rank has only its own gradient: under DDP those
weights are written ACTIVE (their gradients land in ``.grad``) and their updates are applied at the end of every
backward (under ``no_sync()`` too) from the ranks' average.  In a process group of several ranks without DDP they
are refused, unless the updates go to ZeRO-3's shards (whose target averages them) or ``BREAD_INDEPENDENT_RANKS=1``
says each rank trains a model of its own.  A DeepSpeed engine around a model whose optimizer is not the ZeRO-3
integration's is refused (ZeRO-1/2 replace the optimizer's parameters with flat partitions, ZeRO-3 partitions the
weights, the Trainer's ``deepspeed=`` replaces the optimizer it was given).

torch has no public API for "the DDP whose forward is running" or "run this when the backward ends".  This module
reads ``DistributedDataParallel._get_active_ddp_module()`` (the class method TorchDynamo's DDP optimizer reads) and
its ``process_group`` and ``require_backward_grad_sync``, queues with
``torch.autograd.Variable._execution_engine.queue_callback`` (what DDP's reducer uses), and knows a DeepSpeed engine
by the forward pre-hook it registers on its module (``DeepSpeedEngine._create_module_forward_pre_hook``).  They are
isolated here; :func:`check_internals` raises when torch changes them, and tests call it and run a DeepSpeed engine.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["DataParallelForward", "data_parallel_forward", "queue_after_backward", "average_gradients_",
           "check_internals", "check_same_parameters", "several_ranks", "INDEPENDENT_RANKS_ENV", "DEEPSPEED_HOOK",
           "runs_under_deepspeed"]

#: set to 1 when each rank of a process group trains a model of its own (not data-parallel): on-the-fly updates are
#: then allowed with this rank's gradient
INDEPENDENT_RANKS_ENV = "BREAD_INDEPENDENT_RANKS"
#: the qualified name of the forward pre-hook a DeepSpeed engine registers on its module (deepspeed 0.19)
DEEPSPEED_HOOK = "DeepSpeedEngine._create_module_forward_pre_hook.<locals>._module_forward_pre_hook"


@dataclass(frozen=True)
class DataParallelForward:
    """The DDP forward that runs now: its process group, its size, and whether its backward averages gradients
    (False under ``ddp.no_sync()``, gradient accumulation's local micro-steps)."""

    group: object
    world: int
    syncs: bool


def check_internals() -> None:
    """Raise if this torch lacks the DDP and autograd-engine internals this module reads."""
    if not dist.is_available():
        return
    from torch.nn.parallel import DistributedDataParallel

    missing = [name for name, owner in (("_get_active_ddp_module", DistributedDataParallel),
                                        ("queue_callback", torch.autograd.Variable._execution_engine))
               if not callable(getattr(owner, name, None))]
    if missing:
        raise RuntimeError(f"bread_kernels: torch {torch.__version__} has no {', '.join(missing)} (DDP and autograd "
                           "internals bread_kernels.optim.data_parallel reads); this torch is not supported")


def data_parallel_forward() -> DataParallelForward | None:
    """The DistributedDataParallel whose forward is running, over more than one rank; None otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    check_internals()
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return None
    world = dist.get_world_size(ddp.process_group)
    if world < 2:
        return None
    return DataParallelForward(group=ddp.process_group, world=world, syncs=bool(ddp.require_backward_grad_sync))


def queue_after_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the backward that is running now ends (call it from a hook inside that backward)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def average_gradients_(params: Iterable[torch.Tensor], group, world: int) -> None:
    """``p.grad ← (Σ over the group's ranks of p.grad) / world``, in place (one all-reduce each: no flat copy of a
    block's gradients), for every ``p`` with a gradient on some rank: a rank where ``p`` got none (a module its data
    did not reach) takes part with zeros, so every rank issues the same all-reduces (one small all-reduce of which
    parameters have gradients comes first).  Every rank must pass the same parameters in the same order (the same
    block is active on every rank)."""
    params = list(params)
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def check_same_parameters(names: list[str], group, what: str, device: torch.device) -> None:
    """Raise unless every rank of ``group`` averages the same parameters (a fingerprint of ``names``, compared with
    one all-reduce on ``device``): ranks training different blocks would average one layer's gradient with
    another's."""
    fingerprint = zlib.crc32("\n".join(names).encode())
    both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both[0].item() != -both[1].item():
        raise RuntimeError(f"{what}: the ranks train different parameters (another active block on some rank), so "
                           "their gradients cannot be averaged. Every rank must switch blocks alike: seed every rank "
                           "the same before building the optimizer (transformers.set_seed, torch.manual_seed) when "
                           "the order is random, or use an ordered switch_mode")


def several_ranks() -> int:
    """The default process group's size where it has more than one rank and ``BREAD_INDEPENDENT_RANKS`` is not 1;
    0 otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or os.environ.get(INDEPENDENT_RANKS_ENV) == "1":
        return 0
    world = dist.get_world_size()
    return world if world > 1 else 0


def runs_under_deepspeed(module: torch.nn.Module) -> bool:
    """Whether a DeepSpeed engine wraps ``module`` (its forward pre-hook is on the module)."""
    return any(getattr(hook, "__qualname__", "") == DEEPSPEED_HOOK for hook in module._forward_pre_hooks.values())
