"""The collectives the on-the-fly updates issue, and the local gradients they send, made chunk by chunk.

An on-the-fly update that averages the ranks' gradients never holds a weight's whole gradient: ``fill(start, stop,
out)`` writes the flat elements ``[start, stop)`` of this rank's gradient into a collective's buffer (for a Linear,
the rows of dW = gᵀx that cover them: :func:`linear_grad_fill`), one chunk at a time.  Two users, one per way the
parameters are held:

* sharded flat over the ranks (ZeRO-3): :mod:`bread_kernels.integrations.sharded_update` reduce-scatters the chunks
  and updates this rank's shard;
* replicated on every rank (DistributedDataParallel): :func:`all_reduce_update_` all-reduces each chunk and updates
  the tensor itself, the same on every rank; :func:`gather_row_sums` averages an embedding's row-sparse gradient.

Every rank must issue the same collectives in the same order: the number of chunks depends on the parameter's shape
only, never on the tokens a rank holds.  :data:`comm_stats` counts what these updates issue (tests and benchmarks read
it); the averages at the end of a backward (:mod:`bread_kernels.optim.data_parallel`) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .backends import get_backend
from .rounding import Rounding

__all__ = ["CommStats", "comm_stats", "dense_grad_fill", "linear_grad_fill", "reduce_scatter_", "all_gather_",
           "all_reduce_", "all_reduce_update_", "gather_row_sums"]


@dataclass
class CommStats:
    """Collectives issued through this module's wrappers (the in-backward updates'): calls and bytes handed to the collective (input side), by op name."""

    calls: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)
    enabled: bool = True

    def record(self, op: str, nbytes: int) -> None:
        if self.enabled:
            self.calls[op] = self.calls.get(op, 0) + 1
            self.bytes[op] = self.bytes.get(op, 0) + int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


comm_stats = CommStats()


def dense_grad_fill(grad: torch.Tensor) -> Callable[[int, int, torch.Tensor], None]:
    """``fill(start, stop, out)`` for a gradient that exists whole (a bias, a norm weight)."""
    flat = grad.reshape(-1)

    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(flat[start:stop])

    return fill


def linear_grad_fill(g: torch.Tensor, x: torch.Tensor) -> Callable[[int, int, torch.Tensor], None]:
    """``fill(start, stop, out)`` writing ``flatten(gᵀx)[start:stop]`` for g [M, N], x [M, K]: one GEMM over the
    rows of dW that cover the range (at most ``stop − start + 2K − 2`` elements), never the whole dW."""
    n_cols = x.shape[1]

    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        r0, r1 = start // n_cols, -(-stop // n_cols)
        if start % n_cols == 0 and stop % n_cols == 0 and g.dtype == out.dtype:
            torch.mm(g[:, r0:r1].t(), x, out=out.view(r1 - r0, n_cols))
            return
        block = torch.mm(g[:, r0:r1].t(), x)
        out.copy_(block.view(-1)[start - r0 * n_cols: stop - r0 * n_cols])

    return fill


# torch 2.13 renamed the tensor collectives (the old names warn); same signatures
_ALL_REDUCE = dist.all_reduce
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# Issued async and waited on at once, dropping the Work: torch's gloo backend otherwise keeps each synchronous
# call's temporaries alive for a while, so a weight's chunks pile up (11 MiB retained after 33 chunks of 1 MiB,
# 2 MiB this way; measured on torch 2.13 CPU).
def reduce_scatter_(out: torch.Tensor, send: torch.Tensor, group) -> None:
    comm_stats.record("reduce_scatter", send.numel() * send.element_size())
    work = _REDUCE_SCATTER(out, send, op=dist.ReduceOp.SUM, group=group, async_op=True)
    work.wait()


def all_gather_(out: torch.Tensor, send: torch.Tensor, group) -> None:
    comm_stats.record("all_gather", send.numel() * send.element_size())
    work = _ALL_GATHER(out, send, group=group, async_op=True)
    work.wait()


def all_reduce_(tensor: torch.Tensor, group) -> None:
    """``tensor ← Σ over the group's ranks of tensor``, in place."""
    comm_stats.record("all_reduce", tensor.numel() * tensor.element_size())
    work = _ALL_REDUCE(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    work.wait()


@torch.no_grad()
def all_reduce_update_(
    weight: torch.Tensor,
    fill: Callable[[int, int, torch.Tensor], None],
    *,
    step: float,
    sign: bool,
    rounding: Rounding,
    seed: int,
    divisor: float,
    locally_finite: torch.Tensor,
    group,
    rows_per_chunk: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Average the ranks' gradients of a replicated 2-D ``weight`` [N, K] (any strides; produced chunk by chunk by
    ``fill``, flat row-major indices of dW) and update it, the same on every rank.

    With ``G_r`` the local gradient of rank ``r`` and ``d`` the divisor (the number of ranks)::

        Ḡ = (Σ_r G_r) / d                                          summed in ``dtype``, ``rows_per_chunk`` rows a time
        weight ← round(weight − step · f(Ḡ))                       f = identity (SGD) or sign (SIGN), in fp32

    One buffer of ``rows_per_chunk · K + 1`` elements in ``dtype`` (fp32, or bf16 for a bf16 weight's bf16 gradient,
    which DDP too sums in bf16 and whose range cannot overflow; at least one row).  Each rank adds a flag (1 where its
    ``locally_finite``, a 0-dim bool on the device, is False) after the first chunk, so the first all-reduce tells
    every rank whether any rank's gradient was not finite; every write is gated on that answer on the device (no host
    read) and it is returned: where it is False no rank writes anything.  Stochastic rounding draws element
    ``(i, j)``'s bits from ``(seed, i·K + j)``, as an update of the whole weight in one process does.
    """
    n_rows, n_cols = weight.shape
    rows_per_chunk = max(1, min(rows_per_chunk, n_rows))
    buffer = torch.empty(rows_per_chunk * n_cols + 1, dtype=dtype, device=weight.device)
    backend = get_backend(weight.device)
    ok = None
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        width = (r1 - r0) * n_cols
        fill(r0 * n_cols, r1 * n_cols, buffer[:width])
        if ok is None:
            torch.logical_not(locally_finite, out=buffer[width])  # a sum of 0/1 flags: exact in bf16 to 256 ranks
            all_reduce_(buffer[: width + 1], group)
            ok = buffer[width] == 0
        else:
            all_reduce_(buffer[:width], group)
        grad = buffer[:width].float() if dtype != torch.float32 else buffer[:width]
        backend.apply_update_(weight[r0:r1], grad.div_(divisor).view(r1 - r0, n_cols), step, sign, rounding, seed,
                              offset=r0 * n_cols, ok=ok)
    return ok if ok is not None else torch.ones((), dtype=torch.bool, device=weight.device)


@torch.no_grad()
def gather_row_sums(rows: torch.Tensor, summed: torch.Tensor, group, world: int) \
        -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ranks' row-sparse gradients of one [V, H] table, summed: ``(union, total)`` with ``union`` [U] the sorted
    distinct ids of every rank and ``total`` [U, H] fp32 the sum over the ranks of their rows ``summed`` [R_r, H]
    for ids ``rows`` [R_r] (distinct on each rank) — the same on every rank; None where no rank has a row.

    Two all-gathers (the counts, then ids and rows padded to the largest count): memory and traffic proportional to
    the tokens, never to the vocabulary.  The largest count is read on the host (the buffers' size)."""
    device = summed.device
    hidden = summed.shape[1]
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=device)
    counts = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_(counts, count, group)
    r_max = int(counts.max())
    if r_max == 0:
        return None
    send = torch.zeros(r_max, hidden + 1, dtype=torch.float32, device=device)
    ids = torch.full((r_max,), -1, dtype=torch.int32, device=device)
    ids[: rows.numel()] = rows.to(torch.int32)
    send[:, 0] = ids.view(torch.float32)  # the id's bits ride along in fp32 (an all-gather only moves bytes)
    send[: rows.numel(), 1:] = summed
    received = torch.empty(world * r_max, hidden + 1, dtype=torch.float32, device=device)
    all_gather_(received.view(-1), send.view(-1), group)
    all_ids = received[:, 0].contiguous().view(torch.int32).to(torch.int64)
    keep = all_ids >= 0
    union, inverse = torch.unique(all_ids[keep], return_inverse=True)
    total = torch.zeros(union.numel(), hidden, dtype=torch.float32, device=device)
    total.index_add_(0, inverse, received[keep, 1:])
    return union, total
