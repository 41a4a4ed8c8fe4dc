"""``bread_kernels.collectives`` on a one-rank gloo group in this process: :class:`InFlight` completes what waits on
its all-reduces in issue order with at most ``depth`` pending, and :func:`all_reduce_update_` applies
``W -= step · Σ dW / divisor`` chunk by chunk — any strides, the last chunk written only once finished, nothing
written where the flag says a rank's gradient was not finite — against float64.  (Two ranks:
``tests/integrations/test_data_parallel.py``.)"""

import datetime

import pytest
import torch
import torch.distributed as dist

from bread_kernels.collectives import InFlight, all_reduce_update_, linear_grad_fill
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
