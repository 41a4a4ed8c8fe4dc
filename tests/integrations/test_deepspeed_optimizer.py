"""ZeroBlockOptimizer in one process, before DeepSpeed partitions anything: its ZeroShards target hands tensors
that are not partitioned to the local write, so it trains exactly like BlockOptimizer; and it is freed after del."""

import gc
import warnings
import weakref

import pytest
import torch

import bread_kernels
from bread_kernels.integrations.deepspeed import ZeroBlockOptimizer, ZeroShards
from tests.model_zoo import batch, llama, loss_of, qwen3_moe


def _build(cls, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()), verbose=0,
                   sgd_mode="all", switch_mode="fixed", start_block=2)


def test_unpartitioned_tensors_take_the_local_update():
    # the ZeRO target's head takes the model's own loss (the fused loss does not drive a custom target), so the
    # plain side does too: the same arithmetic on both sides
    a, b = bread_kernels.patch(llama()), bread_kernels.patch(llama(), fused_loss=False)
    zero, plain = _build(ZeroBlockOptimizer, a), _build(bread_kernels.BlockOptimizer, b)
    assert isinstance(zero.update_target, ZeroShards)
    for step in range(2):
        for model, opt in ((a, zero), (b, plain)):
            loss_of(model, batch(step)).backward()
            if opt is plain:
                opt.step()
            else:  # without DeepSpeed: the base optimizer and the bookkeeping, as ZeroBlockEngine.step does
                opt.base_optimizer.step()
                opt.after_base_step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_zero_block_optimizer_and_its_target_are_collected_after_del():
    model = bread_kernels.patch(llama())
    opt = _build(ZeroBlockOptimizer, model)
    loss_of(model, batch(0)).backward()
    refs = [weakref.ref(opt), weakref.ref(opt.update_target), weakref.ref(model)]
    del opt, model
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_step_outside_the_engine_is_refused_once_connected():
    model = bread_kernels.patch(llama())
    opt = _build(ZeroBlockOptimizer, model)
    opt._ds_engine = object()  # what initialize() connects
    with pytest.raises(RuntimeError, match="call step\\(\\) on the engine"):
        opt.step()
    opt._ds_engine = None


def test_on_the_fly_updates_of_moe_expert_weights_are_refused_before_the_model_is_touched():
    model = bread_kernels.patch(qwen3_moe(layers=3))
    with pytest.raises(NotImplementedError, match=r"MoE expert weights .*not implemented under ZeRO-3"):
        _build(ZeroBlockOptimizer, model)
    assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())  # nothing was installed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        badam = ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), list(model.named_parameters()),
                                   verbose=0, sgd_mode="disabled")
    assert badam.roles["model.layers.2.mlp.experts.gate_up_proj"].name == "ACTIVE"
    badam.close()


@pytest.mark.parametrize("scale, finite", [(1.0, True), (60.0, False)], ids=["fits", "overflows"])
def test_the_zero3_target_counts_an_fp16_dw_overflow_as_a_non_finite_gradient(scale, finite, monkeypatch):
    """Under ZeRO-3 the target builds dW in g's dtype chunk by chunk for the reduce-scatter: an fp16 dW past 65,504
    from finite g and x (40 tokens of 60·60) would be summed as inf into every rank's shard.  The target's local
    flag, which rides in the first chunk's collective so that every rank skips together, counts it as not finite.
    (The sharding itself is replaced by one rank's whole tensor; the collective's maths are tested in
    tests/integrations/test_sharded_update.py and on two DeepSpeed ranks in test_zero3.py.)"""
    from bread_kernels.integrations.deepspeed import shards
    from bread_kernels.integrations.sharded_update import ShardLayout

    flags = []
    monkeypatch.setattr(shards, "is_partitioned", lambda t: True)
    monkeypatch.setattr(shards, "check_shard_device", lambda *args: None)
    monkeypatch.setattr(shards, "shard_layout", lambda p: ShardLayout(None, 1, 0, p.numel(), p.numel()))
    monkeypatch.setattr(shards, "reduce_scatter_update_",
                        lambda shard, layout, fill, **kw: flags.append(kw["locally_finite"]) or kw["locally_finite"])
    weight = torch.zeros(5, 8, dtype=torch.float16)
    weight.ds_tensor = weight.detach().reshape(-1).clone()
    g, x = torch.full((40, 5), scale, dtype=torch.float16), torch.full((40, 8), scale, dtype=torch.float16)
    plan = bread_kernels.WeightPlan(bread_kernels.Role.SGD, bread_kernels.OnTheFlyUpdate(lr=0.1))
    assert ZeroShards().linear_(weight, None, g, x, 0.1, False, plan.update) is finite
    assert flags == [finite]


def test_initialize_with_another_model_than_the_optimizers_is_refused_before_deepspeed_runs(monkeypatch):
    """DeepSpeed would partition the model given while the block optimizer's plans, hooks and cut drive the other."""
    import deepspeed

    from bread_kernels.integrations.deepspeed import initialize

    reached = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: reached.append(kwargs) or (None,) * 4)
    model, other = bread_kernels.patch(llama()), bread_kernels.patch(llama(seed=1))
    opt = _build(ZeroBlockOptimizer, model)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="built over the parameters of another model"):
        initialize(other, opt, config)
    assert not reached
    opt.close()
