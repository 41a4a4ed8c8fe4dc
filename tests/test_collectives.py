"""``bread_kernels.collectives`` on a one-rank gloo group in this process: :class:`InFlight` completes what waits on
its all-reduces in issue order with at most ``depth`` pending, and :func:`all_reduce_update_` applies
``W -= step · Σ dW / divisor`` chunk by chunk — any strides, the last chunk written only once finished, nothing
written where the flag says a rank's gradient was not finite — against float64; the DDP target's expert update
(every expert's rows, zeros where no token went) and its update from a whole dW (the fused head+loss's).  (Two
ranks: ``tests/integrations/test_data_parallel.py``.)"""

import datetime

import pytest
import torch
import torch.distributed as dist

from bread_kernels.collectives import InFlight, all_reduce_update_, experts_grad_fill, linear_grad_fill
from bread_kernels.rounding import Rounding
from tests.integrations.ranks import free_port


@pytest.fixture(scope="module")
def group():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def test_in_flight_completes_in_issue_order_with_at_most_depth_pending(group):
    done = []
    flight = InFlight(depth=1)
    for i in range(3):
        flight.all_reduce(torch.full((3,), float(i)), group, lambda i=i: done.append(i))
        assert len(flight) == 1 and done == list(range(i))
    flight.finish()
    assert done == [0, 1, 2] and len(flight) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("column_major", [False, True], ids=["rows", "column-major"])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 100])
def test_all_reduce_update_applies_the_average_chunk_by_chunk(group, dtype, column_major, rows_per_chunk):
    torch.manual_seed(0)
    g, x = torch.randn(13, 7).to(dtype), torch.randn(13, 5).to(dtype)
    weight = torch.randn(7, 5).to(dtype)
    if column_major:
        weight = weight.t().contiguous().t()
    original = weight.clone()
    expected = original.double() - 0.1 * (g.double().t() @ x.double()) / 2.0  # the divisor: 2 ranks' worth
    flight = InFlight(depth=1)
    ok = all_reduce_update_(weight, linear_grad_fill(g, x), step=0.1, sign=False, rounding=Rounding.NEAREST, seed=0,
                            divisor=2.0, locally_finite=torch.tensor(True), group=group,
                            rows_per_chunk=rows_per_chunk, dtype=dtype, in_flight=flight)
    last = (6 // min(rows_per_chunk, 7)) * min(rows_per_chunk, 7)  # the first row of the last chunk
    assert len(flight) == 1 and torch.equal(weight[last:], original[last:]), "the last chunk was written in flight"
    flight.finish()
    assert bool(ok) and weight.stride() == original.stride()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(weight.double(), expected, **tol)


def test_a_rank_without_a_finite_gradient_leaves_the_weight_untouched(group):
    g, x = torch.randn(9, 4), torch.randn(9, 3)
    weight = torch.randn(4, 3)
    original = weight.clone()
    ok = all_reduce_update_(weight, linear_grad_fill(g, x), step=0.1, sign=False, rounding=Rounding.NEAREST, seed=0,
                            divisor=1.0, locally_finite=torch.tensor(False), group=group, rows_per_chunk=1)
    assert not bool(ok) and torch.equal(weight, original)


def test_a_plan_that_reads_its_flag_at_once_gets_the_settled_answer(group):
    """Inside a backward the averaged update's flag is filled when its all-reduce completes (at the end of the
    backward); a plan without ``checks`` reads it at once, so the target settles first — else a non-finite gradient's
    skip went unreported (the weight itself untouched either way)."""
    from bread_kernels.optim.data_parallel import AveragedTarget
    from bread_kernels.plan import OnTheFlyUpdate, Role, WeightPlan
    from bread_kernels.update import update_linear_

    weight = torch.randn(4, 3)
    original = weight.clone()
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1), name="w", target=AveragedTarget(group, 1))
    g = torch.randn(9, 4)
    g[0, 0] = float("inf")

    def hook(grad):
        update_linear_(plan, Role.SGD, weight, None, [(g, torch.randn(9, 3))])
        return grad

    leaf = torch.ones(1, requires_grad=True)
    leaf.register_hook(hook)
    with pytest.warns(RuntimeWarning, match="skipped the on-the-fly SGD update of w: its gradient is not finite"):
        (leaf * 2).sum().backward()
    assert torch.equal(weight, original)


def _experts_pairs(dtype, n_experts=5, n_rows=4, n_cols=3, without=(1, 3)):
    """Per-expert (g [M_e, N], x [M_e, K]) pairs, none for the experts in ``without`` (no token reached them)."""
    torch.manual_seed(1)
    return {e: (torch.randn(2 + e, n_rows).to(dtype), torch.randn(2 + e, n_cols).to(dtype))
            for e in range(n_experts) if e not in without}


def _experts_dw(pairs, n_experts=5, n_rows=4, n_cols=3) -> torch.Tensor:
    """The float64 gradient [E, N, K]: gₑᵀxₑ, zero for the experts without a pair."""
    dw = torch.zeros(n_experts, n_rows, n_cols, dtype=torch.float64)
    for e, (g, x) in pairs.items():
        dw[e] = g.double().t() @ x.double()
    return dw


@pytest.mark.parametrize("start_row, stop_row", [(0, 20), (2, 11), (5, 6), (3, 4)])
def test_experts_grad_fill_writes_every_experts_rows_with_zeros_where_no_token_went(start_row, stop_row):
    pairs = _experts_pairs(torch.float32)
    out = torch.full(((stop_row - start_row) * 3,), float("nan"))
    experts_grad_fill(pairs, 4, 3)(start_row * 3, stop_row * 3, out)
    expected = _experts_dw(pairs).reshape(20, 3)[start_row:stop_row].reshape(-1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "experts_strided"])
@pytest.mark.parametrize("chunk_bytes", [None, 150])  # 150: chunks of 6 rows, across experts
def test_the_averaged_targets_expert_update_is_the_average_of_every_experts_gradient(group, layout, chunk_bytes,
                                                                                      monkeypatch):
    """``AveragedTarget.experts_`` (one rank: the average is this rank's gradient) against float64 — as rows of
    [E·N, K] (chunks across experts where ``BREAD_CHUNK_BYTES`` is small) or, where the layout does not allow that
    view, expert by expert; experts without a pair are all-reduced as zeros and left as they were; a call with no
    pair at all (a rank whose tokens reached none of the experts) still issues the all-reduces."""
    from bread_kernels.collectives import comm_stats
    from bread_kernels.optim.data_parallel import AveragedTarget
    from bread_kernels.plan import OnTheFlyUpdate

    if chunk_bytes is not None:
        monkeypatch.setenv("BREAD_CHUNK_BYTES", str(chunk_bytes))
    torch.manual_seed(2)
    weight = torch.randn(5, 4, 3) if layout == "contiguous" else torch.randn(4, 5, 3).transpose(0, 1)
    original = weight.clone()
    pairs = _experts_pairs(torch.float32)
    target = AveragedTarget(group, 1)
    update = OnTheFlyUpdate(lr=0.1, rounding="nearest")
    ok = target.experts_(weight, pairs, 0.1, False, update)
    target.finish()
    assert bool(ok)
    torch.testing.assert_close(weight.double(), original.double() - 0.1 * _experts_dw(pairs), atol=1e-6, rtol=1e-6)
    assert torch.equal(weight[1], original[1]) and torch.equal(weight[3], original[3])

    comm_stats.reset()
    before = weight.clone()
    assert bool(target.experts_(weight, {}, 0.1, False, update)) and torch.equal(weight, before)
    target.finish()
    assert comm_stats.calls.get("all_reduce", 0) > 0


@pytest.mark.parametrize("bias", [False, True])
def test_the_averaged_targets_update_from_a_whole_dw_is_the_average(group, bias):
    """``AveragedTarget.linear_grad_`` (the fused head+loss's whole dW) against float64; one flag over dW and db:
    a non-finite db leaves both untouched."""
    from bread_kernels.optim.data_parallel import AveragedTarget
    from bread_kernels.plan import OnTheFlyUpdate

    torch.manual_seed(3)
    weight, grad = torch.randn(7, 5), torch.randn(7, 5)
    b, db = (torch.randn(7), torch.randn(7)) if bias else (None, None)
    original, original_b = weight.clone(), (b.clone() if bias else None)
    target = AveragedTarget(group, 1)
    update = OnTheFlyUpdate(lr=0.1, rounding="nearest")
    ok = target.linear_grad_(weight, b, grad, db, 0.1, False, update)
    target.finish()
    assert bool(ok)
    torch.testing.assert_close(weight.double(), original.double() - 0.1 * grad.double(), atol=1e-6, rtol=1e-6)
    if bias:
        torch.testing.assert_close(b.double(), original_b.double() - 0.1 * db.double(), atol=1e-6, rtol=1e-6)
        db = db.clone()
        db[2] = float("nan")
        before, before_b = weight.clone(), b.clone()
        ok = target.linear_grad_(weight, b, grad, db, 0.1, False, update)
        target.finish()
        assert not bool(ok) and torch.equal(weight, before) and torch.equal(b, before_b)
