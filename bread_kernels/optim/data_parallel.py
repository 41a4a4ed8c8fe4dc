"""DistributedDataParallel as a block optimizer sees it from inside the forward of the model it drives.

A block optimizer changes, at each block switch, which parameters require grad; DDP registers the ones that require
grad when it is built (a Trainer builds it after the optimizer: the first block's), so it never averages a later
block's gradients, and the replicas drift apart without an error.  The driver therefore averages the active
parameters' gradients itself, at the end of every backward DDP synchronises (not under ``no_sync()``), before
clipping or the optimizer reads them: over DDP's process group, in place.  A gradient DDP averaged
as well is averaged again (the same value on every rank; an extra all-reduce of that block).  An on-the-fly update
(``SGD``/``SIGN``) inside a DDP backward is refused: it would use this rank's gradient alone.

torch has no public API for "the DDP whose forward is running" or "run this when the backward ends".  This module
reads ``DistributedDataParallel._get_active_ddp_module()`` (the class method TorchDynamo's DDP optimizer reads) and
its ``process_group`` and ``require_backward_grad_sync``, and queues with
``torch.autograd.Variable._execution_engine.queue_callback`` (what DDP's reducer uses).  They are isolated here;
:func:`check_internals` raises when torch changes them, and a test calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["DataParallelForward", "data_parallel_forward", "queue_after_backward", "average_gradients_",
           "check_internals"]


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
    """``p.grad ← (Σ over the group's ranks of p.grad) / world`` for every ``p`` with a gradient, in place (one
    all-reduce each: no flat copy of a block's gradients).  Every rank must pass the same parameters in the same
    order (the same block is active on every rank)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)
