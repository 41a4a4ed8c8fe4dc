"""The sharded update maths (no DeepSpeed) on 3 gloo ranks, against the single-process update of the whole tensor.

3 ranks make the ZeRO padding appear (n not divisible by 3, and a rank holding fewer real elements), and the
padding is filled with NaN to prove it is never read or written.  Gradients are small integers, so every sum is
exact and only the division by the ranks (and loss scale) rounds, on both sides.  Compared bit for bit with
``epilogue.apply_update_`` on the full tensor with the averaged gradient: fp32 SGD/SIGN, and bf16 with stochastic
rounding (the random bits are indexed by logical element, so shards reproduce the whole tensor's rounding).
"""

from __future__ import annotations

import datetime
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bread_kernels.backends import epilogue
from bread_kernels.integrations.sharded_update import (ShardLayout, allgather_rows_update_, chunk_elements,
                                                       dense_grad_fill, linear_grad_fill, reduce_scatter_update_)
from bread_kernels.plan import Rounding

WORLD = 3
N_ROWS, N_COLS, TOKENS = 7, 5, 4  # n = 35, P = 12: rank 2 holds 11 real elements and 1 pad
VOCAB, HIDDEN = 11, 4  # embedding 44 elements, P = 15: rank 2 holds 14 and 1 pad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_of(full: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    shard = torch.full((layout.shard_numel,), float("nan"), dtype=full.dtype)
    shard[: layout.valid] = full.reshape(-1)[layout.start: layout.start + layout.valid]
    return shard


def _check(shard, expected_full, layout, what):
    got = shard[: layout.valid]
    want = expected_full.reshape(-1)[layout.start: layout.start + layout.valid]
    assert torch.equal(got, want), f"{what}: rank {layout.rank} shard differs by {(got.float() - want.float()).abs().max()}"
    assert torch.isnan(shard[layout.valid:].float()).all(), f"{what}: rank {layout.rank} padding was written"


def _dense_cases(rank):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(N_ROWS, N_COLS, generator=gen)
    # small integers: every product and sum is exact in fp32, so only the final division rounds, as on one process
    gs = [torch.randint(-3, 4, (TOKENS, N_ROWS), generator=gen).float() for _ in range(WORLD)]
    xs = [torch.randint(-3, 4, (TOKENS, N_COLS), generator=gen).float() for _ in range(WORLD)]
    layout = ShardLayout(None, WORLD, rank, weight.numel(), -(-weight.numel() // WORLD))
    average = sum(g.t() @ x for g, x in zip(gs, xs)) / (WORLD * 2.0)  # loss scale 2
    for dtype, rounding in ((torch.float32, Rounding.NEAREST), (torch.bfloat16, Rounding.STOCHASTIC)):
        w = weight.to(dtype)
        for sign in (False, True):
            for budget in (8, 40, None):  # S = 1, 9 (chunks not aligned with rows), whole shard
                expected = w.clone()
                epilogue.apply_update_(expected, average, 0.1, sign, rounding, seed=1234)
                shard = _shard_of(w, layout)
                ok = reduce_scatter_update_(shard, layout, linear_grad_fill(gs[rank], xs[rank]),
                                            step=0.1, sign=sign, rounding=rounding, seed=1234, divisor=WORLD * 2.0,
                                            locally_finite=True, budget_bytes=budget)
                assert ok
                _check(shard, expected, layout, f"dense {dtype} sign={sign} budget={budget}")
    # a weight stored transposed ([K, N], GPT-2's Conv1D): its flat layout is dWᵀ = xᵀg
    stored = weight.t().contiguous()
    layout_t = ShardLayout(None, WORLD, rank, stored.numel(), -(-stored.numel() // WORLD))
    expected = stored.clone()
    epilogue.apply_update_(expected, average.t(), 0.1, False, Rounding.NEAREST, seed=7)
    shard = _shard_of(stored, layout_t)
    assert reduce_scatter_update_(shard, layout_t, linear_grad_fill(xs[rank], gs[rank]), step=0.1, sign=False,
                                  rounding=Rounding.NEAREST, seed=7, divisor=WORLD * 2.0, locally_finite=True,
                                  budget_bytes=40)
    _check(shard, expected, layout_t, "transposed weight")
    # one rank's non-finite gradient: every rank skips, nothing changes
    shard = _shard_of(weight, layout)
    ok = reduce_scatter_update_(shard, layout, dense_grad_fill(average), step=0.1, sign=False,
                                rounding=Rounding.NEAREST, seed=0, divisor=1.0, locally_finite=rank != 1,
                                budget_bytes=8)
    assert ok is False, f"rank {rank} did not skip"
    _check(shard, weight, layout, "skipped update")


def _embedding_cases(rank):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(VOCAB, HIDDEN, generator=gen)
    rows_per_rank = [torch.tensor([0, 3, 7]), torch.tensor([3, 4, 10]), torch.tensor([], dtype=torch.int64)]
    grads = [torch.randint(-5, 6, (len(r), HIDDEN), generator=gen).float() for r in rows_per_rank]
    layout = ShardLayout(None, WORLD, rank, table.numel(), -(-table.numel() // WORLD))
    dense = torch.zeros(VOCAB, HIDDEN)
    for r, g in zip(rows_per_rank, grads):
        dense.index_add_(0, r, g)
    dense /= WORLD
    union = torch.unique(torch.cat(rows_per_rank))
    for dtype, rounding in ((torch.float32, Rounding.NEAREST), (torch.bfloat16, Rounding.STOCHASTIC)):
        t = table.to(dtype)
        for sign in (False, True):
            expected = t.clone()
            selected = expected.index_select(0, union)  # what the single-process fused embedding does
            epilogue.apply_update_(selected, dense[union], 0.1, sign, rounding, seed=99)
            expected.index_copy_(0, union, selected)
            shard = _shard_of(t, layout)
            assert allgather_rows_update_(shard, layout, rows_per_rank[rank], grads[rank], step=0.1, sign=sign,
                                          rounding=rounding, seed=99, divisor=float(WORLD))
            _check(shard, expected, layout, f"embedding {dtype} sign={sign}")


def _worker(rank, port, errors):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        torch.set_num_threads(1)
        _dense_cases(rank)
        _embedding_cases(rank)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sharded_updates_on_three_ranks(monkeypatch):
    # the torch backend: the ranks skip loading the native extension (backends are compared bit for bit elsewhere)
    monkeypatch.setenv("BREAD_BACKEND", "torch")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, f"{len(alive)} rank(s) hung (killed after 120 s); errors: {messages}"
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_layout_and_chunk_size():
    layout = ShardLayout(None, 3, 2, 35, 12)
    assert (layout.start, layout.valid) == (24, 11)
    assert ShardLayout(None, 4, 3, 5, 2).valid == 0  # a rank holding padding only
    assert chunk_elements(3, 12, budget_bytes=40) == 2  # 3 ranks · (2 + 1 flag) · 4 bytes = 36 <= 40
    assert chunk_elements(3, 12, budget_bytes=1) == 1
    assert chunk_elements(3, 12, budget_bytes=1 << 20) == 12
    with pytest.raises(ValueError, match="cannot hold"):
        ShardLayout(None, 2, 0, 10, 4)
    with pytest.raises(ValueError, match="positive"):
        chunk_elements(2, 4, budget_bytes=0)


@pytest.mark.parametrize("value", ["32MiB", "0", "-1", "3.5e7"])
def test_a_bad_chunk_budget_in_the_environment_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("BREAD_ZERO_CHUNK_BYTES", value)
    with pytest.raises(ValueError, match=f"BREAD_ZERO_CHUNK_BYTES must be a positive number of bytes .*got '{value}'"):
        chunk_elements(2, 4)
    monkeypatch.setenv("BREAD_ZERO_CHUNK_BYTES", "40")
    assert chunk_elements(3, 12) == 2
