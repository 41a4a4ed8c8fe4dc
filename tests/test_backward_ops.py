"""What one patched backward costs besides its GEMMs, counted rather than timed: host syncs and aten ops.

Each count is taken with a ``TorchDispatchMode`` over the second backward of a run (the first one of a block
learns which recomputed outputs need a placeholder, see ``functions/recompute.py``).  The reference for the op
count is plain autograd with BlockOptimizers' own post-accumulate-grad hooks (``p.add_(grad or sign(grad),
alpha=-lr·s)``), written here from its published semantics, with and without HF gradient checkpointing.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bread_kernels
from bread_kernels.plan import FiniteChecks, WeightPlan
from tests import model_zoo as models

ACTIVE_BLOCK = 1
LR, SCALE = 1e-3, 0.5
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")

VARIANTS = {  # name: (BlockOptimizer arguments, whether the model carries peft LoRA adapters)
    "badam": (dict(sgd_mode="disabled"), False),
    "sgd": (dict(sgd_mode="all"), False),
    "sign": (dict(sgd_mode="all", sgd_use_sign=True), False),
    "bread": (dict(lora_mode="all"), True),
}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in SYNC_OPS)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def forward_context(autocast: torch.dtype | None):
    """The forward's context: ``torch.autocast`` in ``autocast`` (HF Trainer's bf16=True), or none."""
    return torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()


def engine_backward(variant: str, dtype: torch.dtype, recompute: bool = True,
                    autocast: torch.dtype | None = None, hook_update_numel: int = 0) -> OpCounter:
    arguments, lora = VARIANTS[variant]
    model = models.llama(dtype=dtype)
    if lora:
        model = models.with_lora(model)
    bread_kernels.patch(model, recompute=recompute, hook_update_numel=hook_update_numel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), list(model.named_parameters()),
                                           switch_block_every=100, switch_mode="fixed", start_block=ACTIVE_BLOCK,
                                           sgd_lr_scaling=SCALE, verbose=0, **arguments)
    with forward_context(autocast):
        first = models.loss_of(model, models.batch(0))
    first.backward()
    opt.step()
    opt.zero_grad()
    with forward_context(autocast):
        loss = models.loss_of(model, models.batch(1))
    with OpCounter() as counter:
        loss.backward()
    opt.step()
    opt.close()
    return counter


def reference_backward(variant: str, dtype: torch.dtype, checkpointing: bool,
                       autocast: torch.dtype | None = None) -> OpCounter:
    """Plain autograd and BlockOptimizers' hooks: the active block trains (its .grad kept), every other parameter
    gets ``p -= lr·s·f(grad)`` from its hook (sgd_mode='all')."""
    arguments, _ = VARIANTS[variant]
    model = models.llama(dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
    active = f"model.layers.{ACTIVE_BLOCK}."
    sign = arguments.get("sgd_use_sign", False)
    on_the_fly = arguments.get("sgd_mode") == "all"

    def hook(p):
        grad, p.grad = p.grad, None
        with torch.no_grad():
            p.add_(grad.sign() if sign else grad, alpha=-LR * SCALE)

    handles = []
    for name, p in model.named_parameters():
        if name.startswith(active):
            continue
        p.requires_grad_(on_the_fly)
        if on_the_fly:
            handles.append(p.register_post_accumulate_grad_hook(hook))
    with forward_context(autocast):
        first = models.loss_of(model, models.batch(0))
    first.backward()
    with forward_context(autocast):
        loss = models.loss_of(model, models.batch(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with OpCounter() as counter:
            loss.backward()
    for handle in handles:
        handle.remove()
    return counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend_name", ["native", "torch"])
@pytest.mark.parametrize("hook_update_numel", [0, 1 << 20], ids=["fused", "hooked"])
def test_a_patched_backward_never_waits_for_the_device(monkeypatch, backend_name, variant, dtype, hook_update_numel):
    """Every block linear fused, or (hooked: patch's hook_update_numel) every on-the-fly one updated by the driver's
    hook on autograd's dW: its finiteness flag stays on the device as well."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    counter = engine_backward(variant, dtype, hook_update_numel=hook_update_numel)
    assert counter.syncs == 0, {name: counter.counts[name] for name in SYNC_OPS}
    assert counter.counts["aten.mm"] + counter.counts["aten.addmm"] > 0  # the count saw the backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["sgd", "sign"])
@pytest.mark.parametrize("hook_update_numel", [0, 1 << 20], ids=["fused", "hooked"])
def test_the_on_the_fly_backward_runs_no_more_ops_than_autograd_with_hooks(variant, dtype, hook_update_numel):
    """On the default CPU backend; with the recompute against HF checkpointing, and without it against plain
    autograd (the torch backend's epilogue is a dozen element-wise torch ops per weight: the fallback).  Hooked:
    every block linear's update in the driver's hook, whose flag-gated write is a few ops more than the reference
    hook's ``add_`` (and the rest of the engine fewer)."""
    engine = engine_backward(variant, dtype, hook_update_numel=hook_update_numel)
    reference = reference_backward(variant, dtype, checkpointing=True)
    assert engine.total <= reference.total, (engine.total, reference.total)
    engine = engine_backward(variant, dtype, recompute=False, hook_update_numel=hook_update_numel)
    reference = reference_backward(variant, dtype, checkpointing=False)
    assert engine.total <= reference.total, (engine.total, reference.total)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend_name", ["native", "torch"])
def test_a_patched_backward_under_autocast_never_waits_for_the_device(monkeypatch, backend_name, variant):
    """fp32 weights, the forward under bf16 autocast (HF Trainer's bf16=True): the on-the-fly updates take the
    chunked bf16 dW and the fp32 epilogue, still gated on the device flag."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    counter = engine_backward(variant, torch.float32, autocast=torch.bfloat16)
    assert counter.syncs == 0, {name: counter.counts[name] for name in SYNC_OPS}
    assert counter.counts["aten.mm"] + counter.counts["aten.addmm"] > 0


@pytest.mark.parametrize("variant", ["sgd", "sign"])
def test_the_on_the_fly_backward_under_autocast_runs_no_more_ops_than_autograd_with_hooks(variant):
    """As above, both sides' forward under bf16 autocast: the engine casts each weight to bf16 once more (for dX:
    it keeps no bf16 copy of W from the forward) but saves the hooks' cast of dW, their ``add_`` and ``t``."""
    for recompute in (True, False):
        engine = engine_backward(variant, torch.float32, recompute=recompute, autocast=torch.bfloat16)
        reference = reference_backward(variant, torch.float32, checkpointing=recompute, autocast=torch.bfloat16)
        assert engine.total <= reference.total, (recompute, engine.total, reference.total)


def test_a_steps_finiteness_flags_are_read_at_once_and_each_skip_reported():
    checks = FiniteChecks()
    reports = []
    plans = [WeightPlan(name=f"w{i}", reporter=lambda name, reason: reports.append((name, reason)))
             for i in range(4)]
    for i, plan in enumerate(plans):
        plan.checks = checks
        plan.record_finite(torch.tensor(i != 2), "not finite")
    assert len(checks) == 4 and reports == []  # nothing read yet
    with OpCounter() as counter:
        assert checks.resolve() == 1
    assert counter.syncs == 0  # one tolist() of the stacked flags: a copy, not a scalar read per flag
    assert reports == [("w2", "not finite")] and plans[2].skipped_updates == 1 and len(checks) == 0


def test_a_plan_without_checks_reads_its_flag_at_once():
    with pytest.warns(RuntimeWarning, match="skipped the on-the-fly"):
        WeightPlan(name="w").record_finite(torch.tensor(False), "its gradient is not finite")
