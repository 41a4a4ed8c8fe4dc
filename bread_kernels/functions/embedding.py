"""The input embedding ``y = W[ids]`` with a backward that obeys the weight's :class:`~bread_kernels.plan.Role`.

Shapes: ``ids`` [...] integer token ids, ``W`` [V, H] (fp32, bf16 or fp16), ``y`` [..., H].  With ``g = ∂L/∂y``
flattened to [M, H] and the distinct ids ``u`` (R ≤ M of them, the padding id left out), the backward computes

    G = Σ_{m: ids_m = u_r} g_m          [R, H] in fp32: the only rows of dW that are not zero
    ACTIVE:  dW = scatter(G) [V, H]      returned to autograd (dense, like nn.Embedding), accumulating into .grad
    SGD:     W[u] -= lr·s · G            rounded once to W's dtype (stochastically where the plan says so)
    SIGN:    W[u] -= lr·s · sign(G)      the sign of the *summed* row gradient
    FROZEN:  nothing

so the on-the-fly roles use memory proportional to the tokens (G, and a gathered copy of the R rows), never a
V×H dW.  The padding row gets no gradient, as in ``nn.Embedding``.  A non-finite ``g`` skips the update (W
untouched) and is reported on the plan.  ``max_norm``, ``scale_grad_by_freq``, ``sparse`` and subclasses with their
own forward are not supported: :func:`fusable_embedding` says so and :func:`bread_kernels.patch` leaves such an
embedding on plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..plan import Role, WeightPlan, trigger_gradient
from ..quantized import quantized_weight
from ..rounding import FLOAT_DTYPES
from ..update import update_rows_
from .linear import trigger_for

__all__ = ["FusedEmbeddingFunction", "fused_embedding", "fusable_embedding", "row_gradients"]


def fusable_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose backward this function reproduces exactly: not a subclass with its own forward
    (Gemma's scaled embeddings multiply the rows by ``embed_scale`` there), no ``max_norm``, no frequency scaling,
    not sparse, and a weight of plain elements (not quantized: :func:`~bread_kernels.quantized.quantized_weight`)."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
            and quantized_weight(module.weight) is None)


def row_gradients(ids: torch.Tensor, grad_output: torch.Tensor, padding_idx: int | None):
    """(rows, G): the distinct ids (padding left out; int64, whatever the ids' integer dtype: ``index_copy_`` takes
    no other) and their summed gradients, G [R, H] in fp32."""
    hidden = grad_output.shape[-1]
    rows, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    rows = rows.long()  # int32 ids, as nn.Embedding takes them
    summed = torch.zeros(rows.numel(), hidden, dtype=torch.float32, device=grad_output.device)
    summed.index_add_(0, inverse, grad_output.reshape(-1, hidden).float())
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, summed = rows[keep], summed[keep]
    return rows, summed


class FusedEmbeddingFunction(torch.autograd.Function):
    """See the module docstring.  Inputs: ids, weight, padding_idx (or None), plan, trigger (or None)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, plan: WeightPlan, trigger):
        ctx.plan, ctx.role, ctx.padding_idx = plan, plan.role, padding_idx
        # the uses of one update: this forward's, and other forwards' whose losses one backward sums
        ctx.use = plan.register_use(ctx) if plan.role.updates_on_the_fly else None
        # the table the update writes, itself: a saved-tensor hook may hand a copy back (linear.start_weight_role)
        ctx.written = weight if plan.role.updates_on_the_fly else None
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        ids, weight = ctx.saved_tensors
        if ctx.role in (Role.FROZEN, Role.LORA) or (ctx.role is Role.ACTIVE and not ctx.needs_input_grad[1]):
            return None, None, None, None, trigger_gradient(ctx.needs_input_grad[4])
        rows, summed = row_gradients(ids, grad_output, ctx.padding_idx)
        if ctx.role is Role.ACTIVE:
            grad_weight = torch.zeros_like(weight)
            grad_weight.index_copy_(0, rows, summed.to(weight.dtype))
            return None, grad_weight, None, None, trigger_gradient(ctx.needs_input_grad[4])
        pending = ctx.plan.finish_use(ctx.use, (rows, summed))
        if pending is not None:
            update_rows_(ctx.plan, ctx.role, ctx.written, *_merged_rows(pending))
        return None, None, None, None, trigger_gradient(ctx.needs_input_grad[4])


def _merged_rows(pending: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, G) of several uses' (rows, G) pairs: the distinct rows and their gradients summed in fp32."""
    if len(pending) == 1:
        return pending[0]
    rows, inverse = torch.unique(torch.cat([r for r, _ in pending]), return_inverse=True)
    summed = torch.zeros(rows.numel(), pending[0][1].shape[1], dtype=torch.float32, device=rows.device)
    summed.index_add_(0, inverse, torch.cat([g for _, g in pending]))
    return rows, summed


@torch.compiler.disable  # under torch.compile: a graph break (see fused_linear)
def fused_embedding(ids: torch.Tensor, weight: torch.Tensor, plan: WeightPlan, padding_idx: int | None = None):
    """``W[ids]`` whose backward follows ``plan`` (see the module docstring)."""
    if not isinstance(plan, WeightPlan):
        raise TypeError(f"fused_embedding: plan must be a bread_kernels.WeightPlan, got {type(plan).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fused_embedding: ids must be int32 or int64 token ids, got {ids.dtype}")
    if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fused_embedding: weight must be a 2-D float32/bfloat16/float16 [vocab, hidden] table, got "
                        f"{tuple(weight.shape)} {weight.dtype}; cast the model to one of those dtypes (model.float()) "
                        "or unpatch it (bread_kernels.unpatch)")
    if ids.device != weight.device:
        raise ValueError(f"fused_embedding: ids are on {ids.device} but the weight is on {weight.device}")
    plan.check()
    trigger = trigger_for(plan)
    return FusedEmbeddingFunction.apply(ids, weight, padding_idx, plan, trigger)
