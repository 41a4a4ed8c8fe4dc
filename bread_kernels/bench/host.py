"""``python -m bread_kernels.bench host``: the host time of one fused linear backward on tiny shapes.

On shapes where the GEMMs cost nothing, a backward's time is what the host spends around them: Python, autograd
and the dispatcher.  On a GPU that is what decides whether kernels queue faster than they run.  Each role's fused
backward is timed against what the reference runs for it: ``nn.Linear``'s autograd backward, plus for SGD/SIGN
BlockOptimizers' post-accumulate-grad hook (``p.add_(grad or sign(grad), alpha=-lr·s)``).  Median over ``calls``
backward calls after a warm-up; µs per call.  The engine's plan keeps its finiteness flags as
:class:`~bread_kernels.BlockOptimizer`'s plans do (read once per step, outside the timing): a plan without an
optimizer reads its flag at once, a host sync per update.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..functions.linear import fused_linear
from ..plan import FiniteChecks, OnTheFlyUpdate, Role, WeightPlan
from .linear import device_name, synchronize

__all__ = ["host_time_us", "run"]

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


def host_time_us(role: Role, engine: bool, tokens=8, n_in=16, n_out=16, dtype=torch.float32, device="cpu",
                 calls=1000) -> float:
    """Median µs of one backward call (forward outside the timing)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    g = torch.randn(tokens, n_out, generator=gen).to(dtype=dtype, device=device)
    if engine:
        weight = torch.randn(n_out, n_in, generator=gen).to(dtype=dtype, device=device)
        weight.requires_grad_(role is Role.ACTIVE)
        # as BlockOptimizer's plans: the finiteness flags are kept and read once per step, outside the timing
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR) if role.updates_on_the_fly else None, checks=FiniteChecks())
        forward = lambda: fused_linear(x, weight, None, plan)  # noqa: E731
    else:
        layer = _reference_layer(role, n_in, n_out, dtype, device)
        forward = lambda: layer(x)  # noqa: E731
    times = []
    for i in range(calls + 50):
        y = forward()
        synchronize(torch.device(device))
        start = time.perf_counter()
        y.backward(g)
        synchronize(torch.device(device))
        if i >= 50:
            times.append(time.perf_counter() - start)
        x.grad = None
        if engine:
            plan.checks.resolve()
    return statistics.median(times) * 1e6


def run(dtype=torch.float32, device="cpu", calls=1000, print_fn=print) -> dict:
    print_fn(f"host time of one linear backward on {device_name(torch.device(device))}, 8 tokens, 16x16, "
             f"{str(dtype).removeprefix('torch.')}; median of {calls} calls")
    print_fn(f"{'role':<8}{'engine us':>11}{'reference us':>14}{'ratio':>8}")
    rows = {}
    for role in (Role.ACTIVE, Role.SGD, Role.SIGN, Role.FROZEN):
        engine = host_time_us(role, True, dtype=dtype, device=device, calls=calls)
        reference = host_time_us(role, False, dtype=dtype, device=device, calls=calls)
        rows[role.name] = {"engine_us": engine, "reference_us": reference}
        print_fn(f"{role.name:<8}{engine:>11.1f}{reference:>14.1f}{engine / reference:>8.2f}")
    return rows
