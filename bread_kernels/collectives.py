"""The collectives the on-the-fly updates issue, and the local gradients they send, made chunk by chunk.

An on-the-fly update that averages the ranks' gradients never holds a weight's whole gradient: ``fill(start, stop,
out)`` writes the flat elements ``[start, stop)`` of this rank's gradient into a collective's buffer (for a Linear,
the rows of dW = gᵀx that cover them: :func:`linear_grad_fill`), one chunk at a time.  Two users, one per way the
parameters are held:

* sharded flat over the ranks (ZeRO-3): :mod:`bread_kernels.integrations.sharded_update` reduce-scatters the chunks
  and updates this rank's shard;
* replicated on every rank (DistributedDataParallel): :func:`all_reduce_update_` all-reduces each chunk and updates
  the tensor itself, the same on every rank — asynchronously through :class:`InFlight`, so the backward goes on
  while a chunk's sum travels; :func:`gather_row_sums` averages an embedding's row-sparse gradient.

Every rank must issue the same collectives in the same order: the number of chunks depends on the parameter's shape
only, never on the tokens a rank holds.  :data:`comm_stats` counts what these updates issue (tests and benchmarks read
it); the averages at the end of a backward (:mod:`bread_kernels.optim.data_parallel`) are not counted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .backends import get_backend
from .interrupts import mark_partly_written
from .rounding import Rounding

__all__ = ["CommStats", "comm_stats", "dense_grad_fill", "linear_grad_fill", "experts_grad_fill", "reduce_scatter_",
           "all_gather_", "InFlight", "all_reduce_update_", "gather_row_sums"]


@dataclass
class CommStats:
    """Collectives issued through this module's wrappers (the in-backward updates'): calls and bytes handed to the
    collective (input side), by op name."""

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


def experts_grad_fill(per_expert: dict[int, tuple[torch.Tensor, torch.Tensor]], n_rows: int, n_cols: int) \
        -> Callable[[int, int, torch.Tensor], None]:
    """``fill(start, stop, out)`` writing the flat elements ``[start, stop)`` of a 3-D expert weight's gradient
    [E, N, K] (``n_rows`` N, ``n_cols`` K) as rows of [E·N, K], ``start`` and ``stop`` on row boundaries: expert
    ``e``'s rows are ``gₑᵀxₑ`` for its pair (g [M_e, N], x [M_e, K]) in ``per_expert``, zero where it has none (no
    token reached it) — one GEMM per expert the range covers, never a whole expert's dW beyond the range."""
    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        if start % n_cols or stop % n_cols:
            raise ValueError("experts_grad_fill: the range must cover whole rows of the expert weight")
        r0, r1 = start // n_cols, stop // n_cols
        rows = out.view(r1 - r0, n_cols)
        for e in range(r0 // n_rows, -(-r1 // n_rows)):
            a, b = max(r0, e * n_rows), min(r1, (e + 1) * n_rows)
            pair = per_expert.get(e)
            if pair is None:
                rows[a - r0:b - r0].zero_()
                continue
            g, x = pair
            block = g[:, a - e * n_rows:b - e * n_rows].t()
            if g.dtype == out.dtype:
                torch.mm(block, x, out=rows[a - r0:b - r0])
            else:
                rows[a - r0:b - r0].copy_(block @ x)

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


class InFlight:
    """All-reduces issued asynchronously, each with what needs its result (applying a chunk's update), completed in
    the order they were issued once more than ``depth`` are pending, and all of them by :meth:`finish`.  With
    ``depth`` 1 the next weight's GEMMs run while a chunk's sum travels; 0 waits for each at once.

    Args:
        depth: how many all-reduces may stay pending after one is issued.
    """

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._pending: deque = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def all_reduce(self, tensor: torch.Tensor, group, then: Callable[[], None]) -> None:
        """Issue ``tensor ← Σ over the group's ranks of tensor`` (in place); ``then()`` runs once it is complete."""
        comm_stats.record("all_reduce", tensor.numel() * tensor.element_size())
        self._pending.append((_ALL_REDUCE(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True), then))
        while len(self._pending) > self.depth:
            self._complete_one()

    def finish(self) -> None:
        """Complete every pending all-reduce and what waits on it."""
        while self._pending:
            self._complete_one()

    def _complete_one(self) -> None:
        work, then = self._pending.popleft()
        work.wait()
        then()


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
    in_flight: InFlight | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Average the ranks' gradients of a replicated 2-D ``weight`` [N, K] (any strides; produced chunk by chunk by
    ``fill``, flat row-major indices of dW) and update it, the same on every rank.

    With ``G_r`` the local gradient of rank ``r`` and ``d`` the divisor (the number of ranks)::

        Ḡ = (Σ_r G_r) / d                                          summed in ``dtype``, ``rows_per_chunk`` rows a time
        weight ← round(weight − step · f(Ḡ))                       f = identity (SGD) or sign (SIGN), in fp32

    One buffer of ``rows_per_chunk · K (+ 1)`` elements in ``dtype`` per chunk (fp32, or bf16 for a bf16 weight's
    bf16 gradient, which DDP too sums in bf16 and whose range cannot overflow; at least one row).  Each rank adds a
    flag (1 where its ``locally_finite``, a 0-dim bool on the device, is False) after the first chunk, so the first
    all-reduce tells every rank whether any rank's gradient was not finite; every write is gated on that answer on
    the device (no host read).  It is returned, a 0-dim bool filled when the first chunk's sum is complete: where it
    is False no rank writes anything.  With ``in_flight`` the chunks' sums and updates complete there (the caller
    finishes them, before the weight is read again); without, before this returns.  Stochastic rounding draws
    element ``(i, j)``'s bits from ``(seed, offset + i·K + j)``, as an update of the whole weight in one process
    does (``offset``: where ``weight`` starts in a larger parameter whose elements share the seed, an expert's
    slice).
    """
    n_rows, n_cols = weight.shape
    rows_per_chunk = max(1, min(rows_per_chunk, n_rows))
    flight = in_flight if in_flight is not None else InFlight(depth=0)
    backend = get_backend(weight.device)
    ok = torch.ones((), dtype=torch.bool, device=weight.device)
    written = [0]  # rows written so far (in order: the chunks complete in the order they were issued)

    def partly(exc: BaseException) -> None:
        # each chunk waits for its collective: a failure between two cannot be prevented (interrupts.py)
        if 0 < written[0] < n_rows:
            mark_partly_written(exc, f"a data-parallel weight of shape {tuple(weight.shape)} (its first {written[0]} "
                                     f"of {n_rows} rows written)")

    try:
        for r0 in range(0, n_rows, rows_per_chunk):
            r1 = min(n_rows, r0 + rows_per_chunk)
            width, first = (r1 - r0) * n_cols, r0 == 0
            buffer = torch.empty(width + first, dtype=dtype, device=weight.device)  # its own: one may be in flight
            fill(r0 * n_cols, r1 * n_cols, buffer[:width])
            if first:
                torch.logical_not(locally_finite, out=buffer[width])  # a sum of 0/1 flags: exact in bf16 to 256 ranks

            def then(buffer=buffer, r0=r0, r1=r1, width=width, first=first):
                if first:
                    torch.eq(buffer[width], 0, out=ok)
                # the backend widens a bf16 sum itself, and step/d·Σ is step·Σ/d (exactly, for a power-of-two d): no
                # pass over the chunk to widen or divide it; sign(Σ/d) is sign(Σ)
                try:
                    backend.apply_update_(weight[r0:r1], buffer[:width].view(r1 - r0, n_cols),
                                          step if sign else step / divisor, sign, rounding, seed,
                                          offset=offset + r0 * n_cols, ok=ok)
                except BaseException as exc:  # also where it runs later, completing another weight's collectives
                    partly(exc)
                    raise
                written[0] = r1

            flight.all_reduce(buffer, group, then)
    except BaseException as exc:
        partly(exc)
        raise
    return ok


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
