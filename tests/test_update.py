"""The one update path: every on-the-fly update (fused linear, fused embedding, the optimizer's hook path) goes
through ``bread_kernels.update`` and writes where its plan's target says; a skip is decided on the device and reported
through the plan."""

import warnings

import pytest
import torch

import bread_kernels
from bread_kernels import OnTheFlyUpdate, Role, WeightPlan, fused_linear
from bread_kernels.functions import fused_embedding
from bread_kernels.update import LOCAL, UpdateTarget, all_finite, update_dense_
from tests.model_zoo import batch, llama, loss_of


class RecordingTarget(UpdateTarget):
    """Writes nothing, records each call; ``finite=False`` answers as a target that saw a non-finite gradient."""

    skip_reason = "recorded as not finite"

    def __init__(self, finite=True):
        self.calls, self.finite = [], finite

    def linear_(self, weight, bias, g, x, step, sign, update):
        self.calls.append(("linear", weight.shape, tuple(g.shape), step, sign))
        update.next_seed()
        return self.finite

    def rows_(self, weight, rows, summed, step, sign, update):
        self.calls.append(("rows", weight.shape, tuple(rows.tolist()), step, sign))
        update.next_seed()
        return self.finite

    def dense_(self, param, grad, step, sign, update):
        self.calls.append(("dense", param.shape, tuple(grad.shape), step, sign))
        update.next_seed()
        return self.finite


def test_the_fused_linear_writes_through_the_plans_target():
    target = RecordingTarget()
    w = torch.randn(5, 7)
    before = w.clone()
    plan = WeightPlan(Role.SIGN, OnTheFlyUpdate(lr=0.5, scale=0.2), name="w", target=target)
    fused_linear(torch.randn(3, 4, 7), w, None, plan).sum().backward()
    assert target.calls == [("linear", (5, 7), (12, 5), pytest.approx(0.1), True)]
    assert torch.equal(w, before)  # the target decides where the bytes go: here, nowhere


def test_the_fused_embedding_writes_through_the_plans_target():
    target = RecordingTarget()
    table = torch.randn(11, 6)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.1), target=target)
    fused_embedding(torch.tensor([[3, 1, 3]]), table, plan).sum().backward()
    assert target.calls == [("rows", (11, 6), (1, 3), pytest.approx(0.1), False)]


def test_the_optimizers_hook_path_writes_through_its_target():
    class Recording(bread_kernels.BlockOptimizer):
        update_target = RecordingTarget()

    model = bread_kernels.patch(llama())
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Recording(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                        sgd_mode="all", switch_mode="fixed", start_block=3, verbose=0)
    loss_of(model, batch(0)).backward()
    kinds = {call[0] for call in Recording.update_target.calls}
    assert kinds == {"linear", "rows", "dense"}  # the block linears, the embedding, the norms (hook path)
    dense = [c for c in Recording.update_target.calls if c[0] == "dense"]
    assert len(dense) == sum(1 for n in norms if ".layers.3." not in n)  # layer 3's norms are active
    for n, p in model.named_parameters():
        if n in norms and ".layers.3." not in n:
            assert torch.equal(p, norms[n]) and p.grad is None, n
    opt.close()


def test_a_skipped_update_is_reported_and_consumes_its_seed_like_an_applied_one():
    """The host cannot know during the backward that the device skipped the write, so the seed stream advances
    either way: a rerun from the same state reproduces the same bits whatever was skipped."""
    reports = []
    update = OnTheFlyUpdate(lr=0.1)
    plan = WeightPlan(Role.SGD, update, name="w", reporter=lambda n, r: reports.append((n, r)),
                      target=RecordingTarget(finite=False))
    p = torch.randn(4, 3)
    assert update_dense_(plan, p, torch.randn(4, 3)) is False
    assert update.draws == 1 and plan.skipped_updates == 1
    assert reports == [("w", "recorded as not finite")]


@pytest.mark.parametrize("sign", [False, True])
def test_the_local_target_matches_float64(sign):
    gen = torch.Generator().manual_seed(0)
    p, grad = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    expected = p.double() - 0.05 * (grad.double().sign() if sign else grad.double())
    plan = WeightPlan(Role.SIGN if sign else Role.SGD, OnTheFlyUpdate(lr=0.05))
    assert update_dense_(plan, p, grad)
    torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=1e-6)
    bad = grad.clone()
    bad[1, 2, 3] = float("inf")
    before = p.clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert not update_dense_(plan, p, bad)
    assert torch.equal(p, before)


def test_all_finite_sees_nan_and_inf_anywhere():
    t = torch.randn(7, 3)
    assert all_finite(t, torch.randn(2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[4, 1] = bad
        assert not all_finite(torch.randn(2), u)
    assert all_finite(torch.empty(0))


def test_a_role_without_on_the_fly_update_is_refused():
    with pytest.raises(ValueError, match="takes no on-the-fly update"):
        update_dense_(WeightPlan(Role.FROZEN), torch.zeros(2), torch.zeros(2))
    assert LOCAL.skip_reason == "its gradient is not finite"
