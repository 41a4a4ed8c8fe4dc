"""``python -m bread_kernels.bench host``: the host time of one fused linear backward (and its forward) on tiny
shapes.

On shapes where the GEMMs cost nothing, a backward's time is what the host spends around them: Python, autograd
and the dispatcher.  On a GPU that is what decides whether kernels queue faster than they run.  Each role's fused
backward is timed against what the reference runs for it: ``nn.Linear``'s autograd backward, plus for SGD/SIGN
BlockOptimizers' post-accumulate-grad hook (``p.add_(grad or sign(grad), alpha=-lr·s)``); the forward that
precedes it (``fused_linear`` against ``nn.Linear``), which a recomputed block runs twice, is timed beside it.
Median over ``calls`` calls after a warm-up; µs per call.  The engine's plan keeps its finiteness flags as
:class:`~bread_kernels.BlockOptimizer`'s plans do (read once per step, outside the timing): a plan without an
optimizer reads its flag at once, a host sync per update.

A weight this small is not fused by default (``patch``'s ``hook_update_numel``): the ``SGD hook`` and ``SIGN hook``
rows time what the engine runs for it instead, ``nn.Linear`` with the update in the
:class:`~bread_kernels.optim.driver.EngineDriver`'s own post-accumulate-grad hook (its flags read once per step,
outside the timing), against the same reference.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..backends import get_backend
from ..functions.linear import fused_linear
from ..optim.driver import EngineDriver
from ..plan import FiniteChecks, OnTheFlyUpdate, Role, WeightPlan
from .linear import device_name, synchronize

__all__ = ["host_times_us", "run"]

LR = 1e-4


def _reference_layer(role: Role, n_in: int, n_out: int, dtype, device) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device)
    layer.weight.requires_grad_(role is not Role.FROZEN)
    if role.updates_on_the_fly:
        sign = role is Role.SIGN

        def hook(p):
            grad, p.grad = p.grad, None
            with torch.no_grad():
                p.add_(grad.sign() if sign else grad, alpha=-LR)

        layer.weight.register_post_accumulate_grad_hook(hook)
    return layer


def host_times_us(role: Role, engine: bool, tokens=8, n_in=16, n_out=16, dtype=torch.float32, device="cpu",
                  calls=1000, hook: bool = False) -> dict[str, float]:
    """Median µs of one forward and of one backward call, each timed on its own: ``{"forward": µs, "backward":
    µs}``.  ``hook``: the engine's hook path for an on-the-fly role (the driver's hook on ``nn.Linear``) instead of
    the fused linear."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    g = torch.randn(tokens, n_out, generator=gen).to(dtype=dtype, device=device)
    driver = None
    if engine and hook:
        layer = nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device)
        driver = EngineDriver([("weight", layer.weight)], update=OnTheFlyUpdate(lr=LR), what="bench host")
        driver.set_roles({"weight": role})
        forward = lambda: layer(x)  # noqa: E731
    elif engine:
        weight = torch.randn(n_out, n_in, generator=gen).to(dtype=dtype, device=device)
        weight.requires_grad_(role is Role.ACTIVE)
        # as BlockOptimizer's plans: the finiteness flags are kept and read once per step, outside the timing
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR) if role.updates_on_the_fly else None, checks=FiniteChecks())
        forward = lambda: fused_linear(x, weight, None, plan)  # noqa: E731
    else:
        layer = _reference_layer(role, n_in, n_out, dtype, device)
        forward = lambda: layer(x)  # noqa: E731
    times = {"forward": [], "backward": []}
    device = torch.device(device)  # once: the timed region holds the calls alone
    for i in range(calls + 50):
        synchronize(device)
        start = time.perf_counter()
        y = forward()
        synchronize(device)
        between = time.perf_counter()
        y.backward(g)
        synchronize(device)
        if i >= 50:
            times["forward"].append(between - start)
            times["backward"].append(time.perf_counter() - between)
        x.grad = None
        if driver is not None:
            driver.end_step()
        elif engine:
            plan.checks.resolve()
    if driver is not None:
        driver.close()
    return {phase: statistics.median(t) * 1e6 for phase, t in times.items()}


def run(dtype=torch.float32, device="cpu", calls=1000, print_fn=print) -> dict:
    """The table: per role, the backward's µs (engine, reference, ratio) and then the forward's.  The backend is
    found first: a bad ``BREAD_BACKEND`` raises before any row is printed."""
    backend = get_backend(torch.device(device)).name
    print_fn(f"host time of one linear backward (and forward) on {device_name(torch.device(device))}, 8 tokens, "
             f"16x16, {str(dtype).removeprefix('torch.')}, backend {backend}; median of {calls} calls")
    print_fn(f"{'role':<8}{'engine us':>11}{'reference us':>14}{'ratio':>8}   "
             f"{'fwd engine us':>14}{'fwd ref us':>12}{'ratio':>8}")
    rows = {}
    cases = [(Role.ACTIVE, False), (Role.SGD, False), (Role.SIGN, False), (Role.FROZEN, False), (Role.SGD, True),
             (Role.SIGN, True)]
    for role, hook in cases:
        engine = host_times_us(role, True, dtype=dtype, device=device, calls=calls, hook=hook)
        reference = host_times_us(role, False, dtype=dtype, device=device, calls=calls)
        name = f"{role.name} hook" if hook else role.name
        rows[name] = {"engine_us": engine["backward"], "reference_us": reference["backward"],
                      "engine_forward_us": engine["forward"], "reference_forward_us": reference["forward"]}
        print_fn(f"{name:<10}{engine['backward']:>9.1f}{reference['backward']:>14.1f}"
                 f"{engine['backward'] / reference['backward']:>8.2f}   {engine['forward']:>14.1f}"
                 f"{reference['forward']:>12.1f}{engine['forward'] / reference['forward']:>8.2f}")
    return rows
