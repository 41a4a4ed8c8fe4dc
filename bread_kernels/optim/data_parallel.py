"""Data-parallel training as a block optimizer sees it from inside the forward of the model it drives:
DistributedDataParallel, a DeepSpeed engine, or several ranks with neither.

A block optimizer changes, at each block switch, which parameters require grad; DDP registers the ones that require
grad when it is built (a Trainer builds it after the optimizer: the first block's), so it never averages a later
block's gradients, and the replicas drift apart without an error.  The driver therefore averages the active
parameters' gradients itself, at the end of every backward DDP synchronises (not under ``no_sync()``), before
clipping or the optimizer reads them: over DDP's process group, in place.  A gradient DDP averaged as well is
averaged again (the same value on every rank; an extra all-reduce of that block).  Every rank must train the same
parameters the same way: one all-reduce of a fingerprint of the roles checks it at the first DDP forward after they
change, before any update.

An on-the-fly update (``SGD``/``SIGN``) under DDP takes the ranks' averaged gradient, at every backward (under
``no_sync()`` too, as each micro-batch's backward updates them in one process):

* the fused weights' inside the backward, through :class:`AveragedTarget` on their plans: a Linear's dW and an
  expert weight's are made and all-reduced chunk by chunk (every expert's rows, whichever a rank's tokens reached)
  and the embedding's rows all-gathered, so no gradient of theirs exists whole, as in one process; the fused
  head+loss's dW, which it accumulates in its forward, all-reduced in chunks;
* the hook path's small weights' at the end of the backward (:func:`average_gradients_`, then the update): DDP may
  write its own average into their ``.grad`` after the hook.

Every rank issues the same collectives, whatever its tokens: collectives whose number depended on them (which
experts run, vocabulary tiles sized by the tokens) would hang.

In a process group of several ranks without DDP they are refused, unless the updates go to ZeRO-3's shards (whose
target averages them) or ``BREAD_INDEPENDENT_RANKS=1`` says each rank trains a model of its own.  A DeepSpeed engine
around a model whose optimizer is not the ZeRO-3 integration's is refused (ZeRO-1/2 replace the optimizer's
parameters with flat partitions, ZeRO-3 partitions the weights, the Trainer's ``deepspeed=`` replaces the optimizer
it was given).

torch has no public API for "the DDP whose forward is running" or "run this when the backward ends".  This module
reads ``DistributedDataParallel._get_active_ddp_module()`` (the class method TorchDynamo's DDP optimizer reads) and
its ``process_group``, ``require_backward_grad_sync``, ``find_unused_parameters`` and ``static_graph``, resets its
reducer where a backward left it waiting (``reducer._reset_state()``, which DDP's ``_update_process_group`` calls),
queues with
``torch.autograd.Variable._execution_engine.queue_callback`` (what DDP's reducer uses), and knows a DeepSpeed engine
by the forward pre-hook it registers on its module (``DeepSpeedEngine._create_module_forward_pre_hook``).  They are
isolated here; :func:`check_internals` raises when torch changes them, and tests call it and run a DeepSpeed engine.
"""

from __future__ import annotations

import os
import weakref
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from ..backends import get_backend
from ..backends.chunked import chunk_budget_bytes
from ..collectives import InFlight, all_reduce_update_, dense_grad_fill, experts_grad_fill, gather_row_sums, \
    linear_grad_fill
from ..update import LOCAL, UpdateTarget, dw_finite

__all__ = ["DataParallelForward", "data_parallel_forward", "queue_after_backward", "average_gradients_",
           "AveragedTarget", "check_internals", "check_same_parameters", "several_ranks", "INDEPENDENT_RANKS_ENV",
           "DEEPSPEED_HOOK", "runs_under_deepspeed"]

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
    from torch._C._distributed_c10d import Reducer
    from torch.nn.parallel import DistributedDataParallel

    missing = [name for name, owner in (("_get_active_ddp_module", DistributedDataParallel),
                                        ("queue_callback", torch.autograd.Variable._execution_engine),
                                        ("_reset_state", Reducer))
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
    syncs = bool(ddp.require_backward_grad_sync)
    _release_waiting_reducer(ddp, syncs)
    return DataParallelForward(group=ddp.process_group, world=world, syncs=syncs)


#: each DDP seen by :func:`data_parallel_forward` -> whether its last forward with grad synchronised
_LAST_SYNCED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _release_waiting_reducer(ddp, syncs: bool) -> None:
    """At the first forward under ``no_sync()`` after a synchronised one, reset the reducer of ``ddp``
    (``find_unused_parameters=True``), which a synchronised backward that reached none of its parameters left waiting.

    DDP registers the parameters that require grad when it is built — a Trainer builds it after the optimizer: the
    first block's.  Its reducer expects their hooks from each synchronised forward on, and marks the unused ones
    ready at the first such hook.  Where none comes (BAdam on a later block, whose backward stops above the first),
    it goes on expecting them, and the next backward under ``no_sync()`` that reaches them (the first block active
    again, with gradient accumulation) marked them twice (``RuntimeError: ... marked as ready twice``).  After a
    backward that finished its reduction the reset changes nothing: the reducer expects no hook under ``no_sync()``,
    its used-parameter map is clear, and with ``find_unused_parameters`` its buckets are never rebuilt.  (DDP's own
    ``_update_process_group`` resets it so: "ensure forward can run despite previous backward not succeeding".)
    Every rank trains the same blocks, so every rank resets; nothing is lost, as the driver averages the active
    block's gradients itself (see the module docstring)."""
    last, _LAST_SYNCED[ddp] = _LAST_SYNCED.get(ddp, False), syncs
    if syncs or not last or not getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        return
    ddp.reducer._reset_state()


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


class AveragedTarget(UpdateTarget):
    """Where an on-the-fly update writes under DDP: the replicated tensor itself, on every rank, from the ranks'
    average gradient — inside the backward, as in one process, with no whole gradient of the weight on any rank.

    A linear's dW = gᵀx is made and all-reduced in chunks of whole rows of the weight as its layer uses it (any
    strides: GPT-2's ``Conv1D`` weights are transposed views), summed in fp32 (in bf16 for a bf16 weight whose dW is
    bf16, as DDP sums it), each chunk applied once averaged
    (:func:`~bread_kernels.collectives.all_reduce_update_`; ``BREAD_CHUNK_BYTES``, the single-process update's
    budget, bounds the buffers); a bias's db in one all-reduce; an embedding's rows are all-gathered and summed
    (:func:`~bread_kernels.collectives.gather_row_sums`), never a vocabulary-sized gradient; a 3-D expert weight's
    rows likewise, every expert's (zero where a rank routed it no token); the fused head+loss's whole dW (which it
    accumulates in its forward) in chunks of rows.  The finiteness flag rides in each weight's first all-reduce, so
    every rank skips together, gated on the device.

    Every rank must call it for the same weights in the same order, with gradients of the same shapes, whatever its
    tokens (:attr:`~bread_kernels.update.UpdateTarget.collective_calls`): the fused Linears, the input embedding,
    the experts (called with no pairs where no token reached them) and the fused head+loss (its whole dW, never
    tiles sized by the tokens) do; the hook path's small weights go to the end of the backward instead
    (:func:`average_gradients_`).

    Args:
        group: the process group of the DDP whose forward built the graph (held weakly: a target kept in a plan
            does not keep a destroyed group alive).
        world: its number of ranks (the divisor of the average).
    """

    skip_reason = "its gradient is not finite on some rank"
    collective_calls = True

    def __init__(self, group, world: int):
        self._group, self.world = weakref.ref(group), world
        #: the last chunk's sum may travel while the backward goes on; finished at the end of the backward
        self.in_flight = InFlight(depth=1)
        self._finish_queued = False

    def finish(self) -> None:
        """Complete the updates still in flight: at the end of the backward (queued); after a backward that raised,
        at the next forward of the model, block switch or ``close()``."""
        self._finish_queued = False
        self.in_flight.finish()

    settle = finish

    def _queue_finish(self) -> None:
        if self._finish_queued or not len(self.in_flight):
            return
        try:
            queue_after_backward(self.finish)
            self._finish_queued = True
        except RuntimeError:  # not inside a backward
            self.finish()

    @property
    def group(self):
        group = self._group()
        if group is None:
            raise RuntimeError("bread_kernels: the process group of the DistributedDataParallel this model's plans "
                               "average over was destroyed; run the forward again (under the new DDP, or without)")
        return group

    def linear_(self, weight, bias, g, x, step, sign, update) -> torch.Tensor:
        """``weight`` [N, K] (any strides) with dW = gᵀx."""
        ok = self._all_reduce_update(weight, linear_grad_fill(g, x), g.dtype, dw_finite(g, x), step, sign, update)
        if bias is not None:
            self._bias(bias, g.sum(0, dtype=torch.float32), ok, step, sign, update)
        self._queue_finish()
        return ok

    def linear_grad_(self, weight, bias, grad_weight, grad_bias, step, sign, update) -> torch.Tensor:
        """``weight`` [N, K] (any strides) from its whole local dW ``grad_weight`` (the fused head+loss's,
        accumulated in its forward) and ``bias`` from ``grad_bias``; one flag over both."""
        checked = (grad_weight,) if grad_bias is None else (grad_weight, grad_bias)
        locally_finite = get_backend(grad_weight.device).finite_flag(*checked)
        ok = self._all_reduce_update(weight, dense_grad_fill(grad_weight), grad_weight.dtype, locally_finite, step,
                                     sign, update)
        if bias is not None:
            self._bias(bias, grad_bias.float(), ok, step, sign, update)
        self._queue_finish()
        return ok

    def experts_(self, weight, per_expert, step, sign, update) -> torch.Tensor:
        """A 3-D expert weight [E, N, K]: every expert's rows are all-reduced, zero where no token of this rank
        reached it, so the collectives depend on the weight's shape only, never on the routing; one flag over
        every expert's operands on every rank gates the whole weight, as in one process.  As rows of [E·N, K]
        where the layout allows (chunks then span experts), else expert by expert.  Summed as the weight's dtype
        says (not the gradient's, which a rank that routed no token does not have): in bf16 for a bf16 weight."""
        n_experts, n_rows, n_cols = weight.shape
        dtype = weight.dtype
        locally_finite = torch.ones((), dtype=torch.bool, device=weight.device)
        for g, x in per_expert.values():
            locally_finite = locally_finite & dw_finite(g, x)
        seed = update.next_seed()  # one for the whole parameter, as the local target draws
        if weight.stride(0) == n_rows * weight.stride(1):
            ok = self._all_reduce_update(weight.view(n_experts * n_rows, n_cols),
                                         experts_grad_fill(per_expert, n_rows, n_cols), dtype, locally_finite, step,
                                         sign, update, seed=seed)
        else:
            flags = [self._all_reduce_update(weight[e], experts_grad_fill({0: per_expert[e]} if e in per_expert
                                                                          else {}, n_rows, n_cols),
                                             dtype, locally_finite, step, sign, update, seed=seed,
                                             offset=e * n_rows * n_cols)
                     for e in range(n_experts)]
            ok = flags[0]  # every one is the same answer: each carries the whole parameter's flags
        self._queue_finish()
        return ok

    def _all_reduce_update(self, weight, fill, grad_dtype, locally_finite, step, sign, update, seed=None,
                           offset=0) -> torch.Tensor:
        """:func:`~bread_kernels.collectives.all_reduce_update_` of a 2-D ``weight`` whose local gradient is
        ``fill``'s, in ``grad_dtype``: summed in bf16 for a bf16 weight's bf16 gradient (as DDP sums it), else in
        fp32; chunks of whole rows within ``BREAD_CHUNK_BYTES`` (two may be alive: one in flight)."""
        low = weight.dtype == torch.bfloat16 and grad_dtype == torch.bfloat16
        # bytes per chunk element: the fp32 buffer a GEMM writes, or a bf16/fp16 block and the buffer (or its copy)
        per_element = 4 if grad_dtype == torch.float32 else 6
        rows = chunk_budget_bytes() // (2 * per_element * weight.shape[1])
        return all_reduce_update_(weight, fill, step=step, sign=sign, rounding=update.rounding,
                                  seed=update.next_seed() if seed is None else seed, divisor=self.world,
                                  locally_finite=locally_finite, group=self.group, rows_per_chunk=rows,
                                  dtype=torch.bfloat16 if low else torch.float32, in_flight=self.in_flight,
                                  offset=offset)

    def _bias(self, bias, grad_bias, ok, step, sign, update) -> None:
        """A bias's update from its fp32 local ``grad_bias`` [N], in one all-reduce, gated on its weight's ``ok``."""
        seed, world, rounding = update.next_seed(), self.world, update.rounding

        def then():  # holds neither the target nor the update (no cycle through the pending queue)
            get_backend(bias.device).apply_update_(bias, grad_bias.div_(world), step, sign, rounding, seed, ok=ok)

        self.in_flight.all_reduce(grad_bias, self.group, then)

    def rows_(self, weight, rows, summed, step, sign, update):
        self.finish()  # the all-gathers wait anyway
        gathered = gather_row_sums(rows, summed, self.group, self.world)
        if gathered is None:
            return True
        union, total = gathered
        return LOCAL.rows_(weight, union, total.div_(self.world), step, sign, update)

    def dense_(self, param, grad, step, sign, update):
        raise RuntimeError("bread_kernels: a hook-path weight's on-the-fly update under DDP is applied at the end of "
                           "the backward (DDP may write its gradient after the hook), not through AveragedTarget")


def check_same_parameters(entries: list[str], group, what: str, device: torch.device) -> None:
    """Raise unless every rank of ``group`` trains the same parameters the same way (a fingerprint of ``entries``,
    each rank's description of its training, compared with one all-reduce on ``device``): ranks training different
    blocks would average one layer's gradient with another's, and ranks whose updates go different ways would issue
    different collectives."""
    fingerprint = zlib.crc32("\n".join(entries).encode())
    both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both[0].item() != -both[1].item():
        raise RuntimeError(f"{what}: the ranks train different parameters, or update them differently (another "
                           "active block on some rank, or patch() or optimizer options that differ between ranks), so "
                           "their gradients cannot be averaged. Every rank must switch blocks alike: seed every rank "
                           "the same before building the optimizer (transformers.set_seed, torch.manual_seed) when "
                           "the order is random, or use an ordered switch_mode; and patch and build the optimizer "
                           "with the same options on every rank (BREAD_HOOK_UPDATE_NUMEL, BREAD_CHUNK_BYTES and, under "
                           "ZeRO-3, BREAD_ZERO_CHUNK_BYTES alike)")


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
