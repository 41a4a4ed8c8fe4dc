"""The plan: Roles, the on-the-fly update rule (step size, seeds), rounding, and the multi-use bookkeeping."""

import warnings

import pytest
import torch

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan
from bread_kernels.plan import BACKWARD_TRIGGER, backward_accumulates, begin_forward


def test_unknown_rounding_and_role_names_are_refused():
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        OnTheFlyUpdate(lr=0.1, rounding="up")
    with pytest.raises(ValueError, match="unknown role 'adam'"):
        WeightPlan("adam")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WeightPlan("sgd", OnTheFlyUpdate(lr=0.1, rounding="nearest")).role is Role.SGD


def test_step_size_is_read_when_asked_and_must_be_finite_and_non_negative():
    lr = [0.5]
    update = OnTheFlyUpdate(lr=lambda: lr[0], scale=0.2)
    assert update.step_size() == pytest.approx(0.1)
    lr[0] = 1.0
    assert update.step_size() == pytest.approx(0.2)
    for bad in (float("nan"), float("inf"), -1.0):
        lr[0] = bad
        with pytest.raises(ValueError, match="lr·scale must be finite and >= 0"):
            update.step_size()
    with pytest.raises(TypeError, match="lr must be a number or a zero-argument callable"):
        OnTheFlyUpdate(lr="1e-5")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=float("nan")), ValueError, "lr must be finite and >= 0, got nan"),
    (dict(lr=-1e-3), ValueError, "lr must be finite and >= 0, got -0.001"),
    (dict(lr=float("inf")), ValueError, "lr must be finite and >= 0, got inf"),
    (dict(lr=0.1, scale=-1.0), ValueError, "scale must be finite and >= 0, got -1.0"),
    (dict(lr=0.1, scale=float("nan")), ValueError, "scale must be finite and >= 0, got nan"),
    (dict(lr=0.1, scale="2"), TypeError, "scale must be a number"),
    (dict(lr=0.1, loss_scale=0.0), ValueError, "loss_scale must be finite and > 0, got 0.0"),
    (dict(lr=True), TypeError, "lr must be a number or a zero-argument callable"),
], ids=["lr_nan", "lr_negative", "lr_inf", "scale_negative", "scale_nan", "scale_str", "loss_scale_zero", "lr_bool"])
def test_numbers_an_update_cannot_step_with_are_refused_when_it_is_built(kwargs, error, match):
    """As torch.optim refuses a negative lr at construction: a number given to the update is checked when it is
    built, not in the middle of the first backward that reads it (a callable's value is checked there)."""
    with pytest.raises(error, match=match):
        OnTheFlyUpdate(**kwargs)


def test_a_callable_lr_that_returns_no_number_is_refused_naming_the_lr():
    update = OnTheFlyUpdate(lr=lambda: "auto")
    with pytest.raises(TypeError, match="lr read for the on-the-fly update must be a number, got 'auto'"):
        update.step_size()
    assert OnTheFlyUpdate(lr=lambda: torch.tensor(0.5), scale=0.2).step_size() == pytest.approx(0.1)


@pytest.mark.parametrize("args, match", [
    ((1,), "role must be a bread_kernels.Role or its name"),
    ((Role.SGD, 0.1), "update must be a bread_kernels.OnTheFlyUpdate or None, got float"),
    ((Role.SGD, lambda: 0.1), "update must be a bread_kernels.OnTheFlyUpdate or None, got function"),
], ids=["role_int", "update_number", "update_callable"])
def test_a_plan_of_no_role_or_an_update_of_another_type_is_refused_when_it_is_built(args, match):
    with pytest.raises(TypeError, match=match):
        WeightPlan(*args)
    plan = WeightPlan(Role.FROZEN)
    plan.role = args[0] if len(args) == 1 else Role.SGD
    plan.update = args[1] if len(args) > 1 else None
    with pytest.raises(TypeError, match=match):  # changed after: refused at the fused function's forward
        plan.check()


def test_each_draw_is_a_fresh_seed_and_a_rerun_reproduces_them():
    a, b = OnTheFlyUpdate(lr=0.1, seed=3), OnTheFlyUpdate(lr=0.1, seed=3)
    seeds = [a.next_seed() for _ in range(4)]
    assert len(set(seeds)) == 4 and a.draws == 4
    assert [b.next_seed() for _ in range(4)] == seeds
    assert OnTheFlyUpdate(lr=0.1, seed=4).next_seed() != seeds[0]
    assert all(0 <= s < 2**64 for s in seeds)


def test_auto_rounding_is_stochastic_for_low_precision_only():
    assert Rounding.AUTO.resolve(torch.bfloat16) is Rounding.STOCHASTIC
    assert Rounding.AUTO.resolve(torch.float16) is Rounding.STOCHASTIC
    assert Rounding.AUTO.resolve(torch.float32) is Rounding.NEAREST
    assert Rounding.NEAREST.resolve(torch.bfloat16) is Rounding.NEAREST


def test_uses_of_one_forward_are_released_together_after_the_last_backward():
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1))
    begin_forward()
    first, second = plan.register_use(), plan.register_use()
    assert plan.finish_use(second, "b") is None  # the first use's backward has not run
    assert plan.finish_use(first, "a") == ["b", "a"]
    begin_forward()
    only = plan.register_use()
    assert plan.finish_use(only, "c") == ["c"]


def test_a_use_dropped_without_backward_skips_its_forward_and_reports():
    reports = []
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1), name="w", reporter=lambda n, r: reports.append((n, r)))
    begin_forward()
    kept, dropped = plan.register_use(), plan.register_use()
    assert plan.finish_use(kept, "a") is None
    del dropped  # its graph was freed without a backward
    begin_forward()
    plan.register_use()
    assert plan.skipped_updates == 1 and reports and reports[0][0] == "w"


def test_uses_of_two_forwards_that_one_backward_reaches_are_released_together():
    """Two forwards' losses summed into one backward: a use waits for the other forward's use the same backward
    reaches (autograd's private ``_will_engine_execute_node``, whose absence fails here), and both are released
    together; backwards of their own release each forward's use at once."""
    from bread_kernels import plan as plan_module

    assert plan_module._WILL_ENGINE_EXECUTE_NODE is not None, "torch lost _will_engine_execute_node"
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1))
    released = []

    class Use(torch.autograd.Function):  # as a fused function with an on-the-fly role: it takes the trigger
        @staticmethod
        def forward(ctx, x, tag, trigger):
            ctx.use, ctx.tag = plan.register_use(ctx), tag
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            released.append(plan.finish_use(ctx.use, ctx.tag))
            return grad, None, None

    x = torch.ones(2, requires_grad=True)
    begin_forward()
    a = Use.apply(x, "a", BACKWARD_TRIGGER)
    begin_forward()
    b = Use.apply(x, "b", BACKWARD_TRIGGER)
    (a.sum() + b.sum()).backward()
    assert released == [None, ["b", "a"]]
    released.clear()
    begin_forward()
    a = Use.apply(x, "a", BACKWARD_TRIGGER)
    begin_forward()
    b = Use.apply(x, "b", BACKWARD_TRIGGER)
    b.sum().backward()
    a.sum().backward()
    assert released == [["b"], ["a"]]


def test_only_a_backward_that_accumulates_releases_a_use():
    """``torch.autograd.grad`` (a gradient probe or penalty) and a backward given ``inputs=`` execute only the
    paths to what they name, not the trigger's accumulator: no on-the-fly update, as no post-accumulate-grad hook of
    the reference fires for a weight they do not name; a later full backward of the same graph releases the use.
    Fails if torch's ``_will_engine_execute_node`` changes what it answers for a leaf's accumulator."""
    from bread_kernels import plan as plan_module

    assert torch.autograd.graph.get_gradient_edge(BACKWARD_TRIGGER).node is plan_module._TRIGGER_NODE
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1))
    answers, released = [], []

    class Use(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, trigger):
            ctx.use = plan.register_use(ctx)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            answers.append(backward_accumulates())
            released.append(plan.finish_use(ctx.use, "g"))
            return grad * 2, None

    x, other = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    begin_forward()
    loss = (Use.apply(x, BACKWARD_TRIGGER) * other).sum()
    torch.autograd.grad(loss, [x], retain_graph=True)
    loss.backward(inputs=[x], retain_graph=True)
    assert answers == [False, False] and released == [None, None] and other.grad is None
    loss.backward()
    assert answers[2] is True and released[2] == ["g"]
    assert backward_accumulates()  # outside a backward: a caller handing contributions over itself


def test_a_probe_before_the_full_backward_of_a_weight_used_twice_keeps_one_update_of_the_summed_gradient():
    """``torch.autograd.grad(..., retain_graph=True)`` before ``backward()`` of the same graph: the probe finishes no
    use, so the full backward still takes one SIGN step of the gradient summed over both uses (two steps of the
    partial gradients, each written before the other use's dX, otherwise)."""
    from bread_kernels.functions.linear import fused_linear

    torch.manual_seed(0)
    weight0, x, a = torch.randn(4, 4), torch.randn(3, 4), torch.randn(4, requires_grad=True)
    reference = weight0.clone().requires_grad_()
    ((torch.tanh((x * a.detach()) @ reference.t()) @ reference.t()) ** 2).sum().backward()
    for probe in (False, True):
        weight = weight0.clone()
        plan = WeightPlan(Role.SIGN, OnTheFlyUpdate(lr=0.1))
        begin_forward()
        loss = (fused_linear(torch.tanh(fused_linear(x * a, weight, None, plan)), weight, None, plan) ** 2).sum()
        if probe:
            torch.autograd.grad(loss, [a], retain_graph=True)
            assert torch.equal(weight, weight0)
        loss.backward()
        torch.testing.assert_close(weight, weight0 - 0.1 * reference.grad.sign(), rtol=0, atol=1e-7)


def test_running_backward_tells_one_backward_from_another():
    """``running_backward`` (autograd's private ``_current_graph_task_id``, whose absence fails here): the same id
    at every hook of one backward, another in the next backward of the same graph, -1 outside; the stale-graph
    guard lets a forward's later outputs through by it."""
    from bread_kernels.plan import running_backward

    assert running_backward() == -1, "torch lost _current_graph_task_id, or its answer outside a backward changed"
    seen = []
    leaf = torch.ones(2, requires_grad=True)
    a, b = leaf * 2, leaf * 3
    a.register_hook(lambda grad: seen.append(running_backward()))
    b.register_hook(lambda grad: seen.append(running_backward()))
    (a + b).sum().backward(retain_graph=True)
    (a + b).sum().backward()
    assert seen[0] == seen[1] != seen[2] == seen[3] and -1 not in seen
