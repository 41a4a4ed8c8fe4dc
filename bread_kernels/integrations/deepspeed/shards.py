"""Where an on-the-fly update writes under ZeRO-3: this rank's shard ``param.ds_tensor``.

:class:`ZeroShards` is the :class:`~bread_kernels.update.UpdateTarget` that :class:`ZeroBlockOptimizer` puts on
every plan it writes.  For a partitioned parameter it reduce-scatters dW (chunk by chunk, averaged over the
parameter's process group, the loss scale undone) and updates this rank's shard only; a tensor that is not
partitioned goes to :data:`~bread_kernels.update.LOCAL`.  The non-finite check rides in the first chunk's
collective, so every rank skips together; it covers g and x and the dW the chunks build in g's dtype
(:func:`~bread_kernels.update.dw_all_finite`: an fp16 dW overflows from finite operands, so in fp16 its GEMMs run
once more to decide before the first chunk; bf16/fp32 take a bound, no GEMM).  It also owns the refresh of persistent parameters (``ds_persist``):
their gathered copy is rewritten from the updated shards at the end of the backward that updated them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ...update import LOCAL, UpdateTarget, all_finite, dw_all_finite
from ..sharded_update import (all_gather_shards, allgather_rows_update_, chunk_budget_bytes, dense_grad_fill,
                              linear_grad_fill, reduce_scatter_update_)
from .internals import check_shard_device, inside_engine_forward, is_partitioned, is_persistent, shard_layout

__all__ = ["ZeroShards"]


class ZeroShards(UpdateTarget):
    """The ZeRO-3 shards of the parameters; one per :class:`ZeroBlockOptimizer`.

    Args:
        loss_scale: returns the current loss scale (fp16) of the engine :func:`initialize` made; None until it
            connects one (the scale is then 1.0) and after that engine's ``destroy()``.
    """

    skip_reason = "its gradient is not finite on some rank"

    def __init__(self, loss_scale: Callable[[], float] | None = None):
        self.loss_scale = loss_scale
        #: the DeepSpeed engine that :func:`initialize` connected, weakly (None: none connected)
        self.ds_engine: Callable | None = None
        self._updated_persistent: dict[int, torch.nn.Parameter] = {}
        self._refresh_queued = False

    def check_forward(self, under_deepspeed: bool) -> None:
        """Refuse a DeepSpeed engine that :func:`~.engine.initialize` did not make: ``deepspeed.initialize`` given
        the block optimizer fails inside DeepSpeed, and given its base optimizer it trains the first block for
        ever, since no block switch rebuilds DeepSpeed's optimizer."""
        if under_deepspeed and self.loss_scale is None:  # no engine of initialize's connected
            raise RuntimeError("ZeroBlockOptimizer: a DeepSpeed engine that bread_kernels.integrations.deepspeed."
                               "initialize did not make drives this model (deepspeed.initialize, or the Trainer's "
                               "deepspeed= without BreadCallback): it never switches blocks (given the base "
                               "optimizer it would train the first block for ever). Build the engine with "
                               "bread_kernels.integrations.deepspeed.initialize(model, optimizer, config) and train "
                               "with a loop over the engine it returns, or give the Trainer BreadCallback (the "
                               "ZeroBlockOptimizer from its create_optimizer; python/zero3_example.py shows both)")
        engine = self.ds_engine() if self.ds_engine is not None else None
        if under_deepspeed and engine is not None and engine.gradient_accumulation_steps() > 1 and \
                not inside_engine_forward():
            self._refuse_forward_outside_the_engine(engine.gradient_accumulation_steps())

    def ranks_group(self):
        """Every rank of the job: each rank's shard update of a weight reduce-scatters its dW with the other ranks'
        dW of the same weight, and DeepSpeed's optimizer reduces the active block's gradients likewise, so ranks that
        train different blocks (a random block order drawn from generators seeded apart) would hang in the first
        backward, or, where the blocks' shapes agree, sum one block's gradients with another's."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def ranks_fingerprint(self) -> list[str]:
        """The collectives' chunk budget (``BREAD_ZERO_CHUNK_BYTES``): ranks given different budgets would split a
        weight's reduce-scatters differently, and hang in them."""
        return [f"zero chunk bytes {chunk_budget_bytes()}"]

    @staticmethod
    def _refuse_forward_outside_the_engine(gas: int) -> None:
        """A forward called on ``engine.module`` (or below it) under gradient accumulation: DeepSpeed's stage-3
        optimizer learns where a step's micro-batches begin and end from the backward prologue that the engine's
        ``forward`` hooks on its outputs, and without it reduces the active block's gradients wrongly (measured with
        DeepSpeed alone: another result than ``engine(...)``'s)."""
        raise RuntimeError(f"ZeroBlockOptimizer: this forward did not go through the DeepSpeed engine (it was called "
                           f"on engine.module or below it, e.g. engine.module.model(...) of a custom loss) while "
                           f"DeepSpeed accumulates {gas} micro-batches per step: DeepSpeed's stage-3 optimizer learns "
                           "where a step begins and ends only from a forward through the engine, and without it "
                           "accumulates the active block's gradients wrongly (DeepSpeed alone does too). Call the "
                           "engine (engine(input_ids=..., ...)) and compute the loss from its outputs (logits, or "
                           "hidden states with output_hidden_states=True), or train with gradient_accumulation_steps "
                           "1, where a forward below the engine trains as one through it")

    def _loss_scale(self) -> float:
        return float(self.loss_scale()) if self.loss_scale is not None else 1.0

    # -- the three update shapes --------------------------------------------------------------------------------
    def linear_(self, weight, bias, g, x, step, sign, update) -> bool:
        """``weight`` is the parameter [N, K], or a transposed view of a parameter stored [K, N] (GPT-2's
        ``Conv1D``), whose flat layout is then that of dWᵀ = xᵀg."""
        if is_partitioned(weight):
            fill = linear_grad_fill(g, x)
        elif weight._base is not None and is_partitioned(weight._base):
            if not (weight.shape == weight._base.shape[::-1] and weight.stride() == (1, weight.shape[0])):
                raise RuntimeError("bread_kernels: a weight is a view of a ZeRO-3 parameter other than its transpose; "
                                   "its shard layout is unknown")
            weight, fill = weight._base, linear_grad_fill(x, g)
        else:
            return LOCAL.linear_(weight, bias, g, x, step, sign, update)
        # the fill builds dW in g's dtype: an fp16 one can overflow from finite g and x (a loss-scaled backward)
        finite = all_finite(g, x) and dw_all_finite(g, x)
        if not self._dense(weight, fill, finite, step, sign, update, g.device):
            return False
        if bias is not None:
            self._dense(bias, dense_grad_fill(g.sum(0, dtype=torch.float32)), True, step, sign, update, g.device)
        return True

    def rows_(self, weight, rows, summed, step, sign, update) -> bool:
        if not is_partitioned(weight):
            return LOCAL.rows_(weight, rows, summed, step, sign, update)
        check_shard_device(weight, summed.device)
        layout = shard_layout(weight)
        ok = allgather_rows_update_(weight.ds_tensor, layout, rows, summed, step=step, sign=sign,
                                    rounding=update.rounding, seed=update.next_seed(),
                                    divisor=layout.world * self._loss_scale())
        if ok:
            self.mark_updated(weight)
        return ok

    def dense_(self, param, grad, step, sign, update) -> bool:
        if not is_partitioned(param):
            return LOCAL.dense_(param, grad, step, sign, update)
        return self._dense(param, dense_grad_fill(grad), all_finite(grad), step, sign, update, grad.device)

    def _dense(self, param, fill, locally_finite: bool, step: float, sign: bool, update, device) -> bool:
        check_shard_device(param, device)
        layout = shard_layout(param)
        ok = reduce_scatter_update_(param.ds_tensor, layout, fill, step=step, sign=sign, rounding=update.rounding,
                                    seed=update.next_seed(), divisor=layout.world * self._loss_scale(),
                                    locally_finite=locally_finite)
        if ok:
            self.mark_updated(param)
        return ok

    # -- persistent parameters ----------------------------------------------------------------------------------
    def mark_updated(self, param) -> None:
        """Queue a persistent parameter's gathered copy for a refresh at the end of this backward (a parameter
        that is not persistent is gathered afresh from its shard at its next use)."""
        if not is_persistent(param):
            return
        self._updated_persistent[id(param)] = param
        if not self._refresh_queued:
            self._refresh_queued = True
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self.refresh_persistent)
            except RuntimeError:  # not inside a backward
                self.refresh_persistent()

    @torch.no_grad()
    def refresh_persistent(self) -> None:
        """Copy the updated shards of persistent parameters into their gathered ``data`` (one all-gather per group
        and dtype).  Runs at the end of the backward that updated them: a refresh earlier in that backward could
        change a weight a later op of the same backward still needs (dX from the old weight)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = list(self._updated_persistent.values())
        self._updated_persistent.clear()
        self._refresh_queued = False
        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault((id(p.ds_process_group), p.ds_tensor.dtype), []).append(p)
        for members in groups.values():
            layouts = [shard_layout(p) for p in members]
            fulls = all_gather_shards([p.ds_tensor for p in members], layouts, members[0].ds_process_group)
            for p, full in zip(members, fulls):
                if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel:
                    p.data.copy_(full.view(p.ds_shape))
