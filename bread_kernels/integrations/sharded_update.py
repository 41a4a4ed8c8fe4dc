"""On-the-fly SGD/SIGN updates of a parameter that is sharded flat across the ranks of a process group.

Nothing here knows DeepSpeed: a :class:`ShardLayout` says how the parameter is cut (ZeRO-3's layout, built by
:mod:`bread_kernels.integrations.deepspeed`), and the functions take this rank's 1-D shard.

Layout.  The full parameter has ``n`` elements, flattened row-major.  With ``w`` ranks in the group and
``P = ceil(n / w)``, rank ``r`` owns ``flat[r·P : r·P + valid_r]`` with ``valid_r = clamp(n − r·P, 0, P)``; its shard
tensor has ``P`` elements and the tail past ``valid_r`` is padding with undefined contents (never read, never
written here).

Dense gradients (a Linear's dW, a bias, a norm weight): :func:`reduce_scatter_update_`.  With ``G_r`` the local
gradient of rank ``r`` (any 1/GAS factor already inside it) and ``d`` the divisor (``w`` times the loss scale),

    Ḡ = (Σ_r G_r) / d                                             the data-parallel average, unscaled
    shard[:valid] ← round(shard[:valid] − step · f(Ḡ[own range]))   f = identity (SGD) or sign (SIGN), in fp32

The sum is a ``reduce_scatter`` in fp32, done in chunks aligned with the ranks' ranges: chunk ``j`` reduces the
elements ``[r·P + j·S, r·P + (j+1)·S)`` of every rank ``r`` at once, so each rank receives exactly its next ``S``
elements.  Only one chunk of the local gradient exists at a time (``fill`` computes it on demand: for a Linear,
the rows of dW = gᵀx that cover the chunk).  Peak extra memory for one parameter, in elements:
``w·(S+1)`` (fp32 send buffer) + ``S+1`` (fp32 receive buffer) + ``S + 2K`` (one GEMM block of dW rows, in the
weight's dtype; K = columns) + the update epilogue's temporaries on ``S`` elements.  ``S`` comes from the chunk
budget (:func:`chunk_elements`).

Non-finite gradients.  Each rank appends a flag (1 if its local gradient or input is not finite) to every rank's
piece of the first chunk; the reduce-scatter sums the flags, so every rank learns in the same collective whether
any rank saw a non-finite value, and all of them skip the update together (no extra collective, no hang).

Row-sparse gradients (the input embedding): :func:`allgather_rows_update_`.  Each rank has the summed fp32 rows
``G_r`` [R_r, H] of its distinct token ids.  The ranks all-gather (ids, rows) — memory and traffic proportional to
the tokens, never to the vocabulary — sum the rows of equal ids, divide by ``d`` and update the part of those
rows that lies in their own range.  Every rank then holds the same summed rows, so the finiteness check agrees
without a flag.

Stochastic rounding draws its bits from ``(seed, logical element index)`` exactly as a single-process update of
the whole tensor would, so the shards of all ranks together equal the single-process result bit for bit (given
the same averaged gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backends import get_backend
from ..backends.chunked import env_bytes
from ..collectives import (CommStats, all_gather_, comm_stats, dense_grad_fill, gather_row_sums, linear_grad_fill,
                           reduce_scatter_)
from ..interrupts import mark_partly_written
from ..rounding import Rounding

__all__ = ["ShardLayout", "CommStats", "comm_stats", "chunk_elements", "reduce_scatter_update_",
           "allgather_rows_update_", "linear_grad_fill", "dense_grad_fill", "all_gather_shards"]

DEFAULT_CHUNK_BYTES = 32 << 20
CHUNK_ENV = "BREAD_ZERO_CHUNK_BYTES"


@dataclass(frozen=True)
class ShardLayout:
    """How one parameter is sharded: ``numel`` elements over ``world`` ranks, ``shard_numel`` (P) each."""

    group: object  # a torch.distributed ProcessGroup (None: the default group)
    world: int
    rank: int  # this rank's position in ``group`` (not the global rank)
    numel: int  # n: elements of the full parameter
    shard_numel: int  # P: elements of every rank's shard, padding included

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"ShardLayout: rank {self.rank} is not in a group of {self.world}")
        if self.shard_numel * self.world < self.numel:
            raise ValueError(f"ShardLayout: {self.world} shards of {self.shard_numel} cannot hold {self.numel} elements")

    @property
    def start(self) -> int:
        """Flat index of this rank's first element in the full parameter."""
        return self.rank * self.shard_numel

    @property
    def valid(self) -> int:
        """Elements of this rank's shard that are real (the rest is padding)."""
        return self.valid_of(self.rank)

    def valid_of(self, rank: int) -> int:
        return max(0, min(self.shard_numel, self.numel - rank * self.shard_numel))


def chunk_budget_bytes() -> int:
    """The budget of one collective's fp32 send buffer: ``BREAD_ZERO_CHUNK_BYTES``, default 32 MiB."""
    return env_bytes(CHUNK_ENV, DEFAULT_CHUNK_BYTES)


def chunk_elements(world: int, shard_numel: int, budget_bytes: int | None = None) -> int:
    """S: elements per rank and per collective, so the fp32 send buffer ``w·(S+1)·4`` stays within the budget
    (:func:`chunk_budget_bytes` where none is given); at least 1, at most P."""
    if budget_bytes is None:
        budget_bytes = chunk_budget_bytes()
    elif budget_bytes <= 0:
        raise ValueError(f"{CHUNK_ENV} must be a positive number of bytes, got {budget_bytes}")
    return max(1, min(shard_numel, budget_bytes // (4 * world) - 1))


@torch.no_grad()
def reduce_scatter_update_(
    shard: torch.Tensor,
    layout: ShardLayout,
    fill: Callable[[int, int, torch.Tensor], None],
    *,
    step: float,
    sign: bool,
    rounding: Rounding,
    seed: int,
    divisor: float,
    locally_finite: bool,
    budget_bytes: int | None = None,
) -> bool:
    """Average the ranks' dense gradients (produced chunk by chunk by ``fill``) and update this rank's shard.

    Returns False, on every rank, and leaves every shard untouched if any rank's ``locally_finite`` is False.
    """
    w, P = layout.world, layout.shard_numel
    device = shard.device
    S = chunk_elements(w, P, budget_bytes)
    send_flat = torch.empty(w * (S + 1), dtype=torch.float32, device=device)
    recv = torch.empty(S + 1, dtype=torch.float32, device=device)
    backend = get_backend(device)
    flag = 0.0 if locally_finite else 1.0
    written = [0]  # elements of the shard written so far
    try:
        return _reduce_scatter_chunks(shard, layout, fill, S, send_flat, recv, backend, flag, written, step=step,
                                      sign=sign, rounding=rounding, seed=seed, divisor=divisor)
    except BaseException as exc:
        # each chunk waits for its collective: a failure between two cannot be prevented (interrupts.py)
        if 0 < written[0] < layout.valid:
            mark_partly_written(exc, f"this rank's ZeRO-3 shard of a parameter of {layout.numel} elements (its "
                                     f"first {written[0]} of {layout.valid} elements written)")
        raise


def _reduce_scatter_chunks(shard, layout, fill, S, send_flat, recv, backend, flag, written, *, step, sign, rounding,
                           seed, divisor) -> bool:
    """The chunks of :func:`reduce_scatter_update_`; ``written[0]``: the shard's elements written so far."""
    w, P = layout.world, layout.shard_numel
    for offset in range(0, P, S):
        width = min(S, P - offset)
        send = send_flat[: w * (width + 1)].view(w, width + 1)  # row r: rank r's piece, then the flag
        for r in range(w):
            start = r * P + offset
            real = max(0, min(width, layout.numel - start))  # elements of this piece inside the parameter
            if real:
                fill(start, start + real, send[r, :real])
            send[r, real:width].zero_()  # padding at the end of the parameter
        send[:, width] = flag
        reduce_scatter_(recv[: width + 1], send.view(-1), layout.group)
        if offset == 0 and recv[width].item() > 0:
            return False  # some rank's gradient was not finite: every rank skips, having seen the same flag sum
        mine = max(0, min(width, layout.valid - offset))
        if mine:
            grad = recv[:mine].div_(divisor)
            backend.apply_update_(shard[offset: offset + mine], grad, step, sign, rounding, seed,
                                  offset=layout.start + offset)
            written[0] = offset + mine
    return True


@torch.no_grad()
def allgather_rows_update_(
    shard: torch.Tensor,
    layout: ShardLayout,
    rows: torch.Tensor,
    summed: torch.Tensor,
    *,
    step: float,
    sign: bool,
    rounding: Rounding,
    seed: int,
    divisor: float,
) -> bool:
    """Row-sparse update of a [V, H] table sharded flat: ``rows`` [R] distinct ids, ``summed`` [R, H] fp32.

    Returns False (every rank alike, nothing updated) if the averaged rows are not finite.  Random bits for
    stochastic rounding are indexed like the single-process fused embedding's: element ``(k, c)`` of the sorted
    union of ids has index ``k·H + c``.
    """
    gathered = gather_row_sums(rows, summed, layout.group, layout.world)
    if gathered is None:
        return True
    union, total = gathered
    device, hidden = summed.device, summed.shape[1]
    total.div_(divisor)
    if not bool(torch.isfinite(total).all()):
        return False
    lo, hi = layout.start, layout.start + layout.valid
    row_start = union * hidden
    k_a = int(torch.searchsorted(row_start + hidden, torch.tensor(lo, device=device), right=True))
    k_b = int(torch.searchsorted(row_start, torch.tensor(hi, device=device), right=False))
    if k_a >= k_b:
        return True
    e_a = k_a * hidden + max(0, lo - int(row_start[k_a]))
    e_b = (k_b - 1) * hidden + min(hidden, hi - int(row_start[k_b - 1]))
    e = torch.arange(e_a, e_b, dtype=torch.int64, device=device)
    position = union[e // hidden] * hidden + e % hidden - lo  # where element e of the union lives in the shard
    values = shard.index_select(0, position)
    get_backend(device).apply_update_(values, total.view(-1)[e_a:e_b], step, sign, rounding, seed, offset=e_a)
    shard.index_copy_(0, position, values)
    return True


@torch.no_grad()
def all_gather_shards(shards: list[torch.Tensor], layouts: list[ShardLayout], group) -> list[torch.Tensor]:
    """The full flat tensors of several parameters sharded over the same group, in one all-gather."""
    w = layouts[0].world
    sizes = [lay.shard_numel for lay in layouts]
    if len({s.dtype for s in shards}) != 1:
        raise TypeError("all_gather_shards: the shards must share one dtype (gather each dtype separately)")
    send = torch.cat([s[:p] for s, p in zip(shards, sizes)])
    recv = torch.empty(w * send.numel(), dtype=send.dtype, device=send.device)
    all_gather_(recv, send, group)
    per_rank = recv.view(w, send.numel())
    out, offset = [], 0
    for lay, p in zip(layouts, sizes):
        out.append(per_rank[:, offset: offset + p].reshape(-1)[: lay.numel])
        offset += p
    return out
