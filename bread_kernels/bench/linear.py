"""Benchmark of the fused SGD / SIGN linear backward against the way the reference implementations do it.

Reference ("autograd + hook"): ``F.linear`` with ``W.requires_grad``, and a post-accumulate-grad hook that
applies ``W -= lr·s·f(W.grad)`` and drops ``.grad`` — the full dW is materialised and read back (BAdam's /
BlockOptimizers' ``sgd_mode``).  Fused: :func:`bread_kernels.fused_linear` with the SGD / SIGN role.  Both compute
dX (a layer in the middle of a network) and time only the backward.  One :func:`make_case` serves the CLI and
the pytest-benchmark suite in ``bench/``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import get_backend
from ..functions.linear import fused_linear
from ..plan import OnTheFlyUpdate, Role, Rounding, WeightPlan
from .memory import trace_allocations

LR = 1e-5


@dataclass
class LinearCase:
    """One backward, ready to run: ``prepare()`` builds the graph (untimed), ``backward()`` runs it."""

    name: str
    prepare: Callable[[], None]
    backward: Callable[[], None]
    dw_bytes: int


def make_case(kind: str, role: Role, n_out: int, n_in: int, tokens: int, dtype: torch.dtype, device="cpu",
              needs_dx: bool = True, rounding: Rounding = Rounding.AUTO):
    """kind: "fused" or "reference"; role: Role.SGD or Role.SIGN; ``needs_dx=False`` leaves only the update;
    ``rounding`` applies to the fused case (the reference always rounds to nearest)."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(n_out, n_in, generator=gen) * 0.02).to(dtype).to(device)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype).to(device).requires_grad_(needs_dx)
    g = torch.randn(tokens, n_out, generator=gen).to(dtype).to(device)
    state = {}

    if kind == "fused":
        plan = WeightPlan(role, OnTheFlyUpdate(lr=LR, rounding=rounding))

        def prepare():
            x.grad = None
            state["y"] = fused_linear(x, weight, None, plan)

    elif kind == "reference":
        weight.requires_grad_(True)
        sign = role is Role.SIGN

        def hook(p):
            with torch.no_grad():
                p.add_(p.grad.sign() if sign else p.grad, alpha=-LR)
            p.grad = None

        weight.register_post_accumulate_grad_hook(hook)

        def prepare():
            x.grad = None
            state["y"] = F.linear(x, weight)

    else:
        raise ValueError(f"kind must be 'fused' or 'reference', got {kind!r}")

    def backward():
        state.pop("y").backward(g)

    suffix = f"-{rounding.value}" if kind == "fused" and rounding is not Rounding.AUTO else ""
    return LinearCase(f"{kind}-{role.name}{suffix}", prepare, backward, weight.numel() * weight.element_size())


@dataclass
class Measurement:
    name: str
    median_s: float
    p20_s: float
    p80_s: float
    peak_extra_bytes: int  #: the whole backward (dX included)
    update_peak_bytes: int  #: the weight update alone (a backward with no dX)
    dw_bytes: int


def measure(case: LinearCase, update_only: LinearCase, repeats: int, warmup: int = 1, device="cpu") -> Measurement:
    for _ in range(warmup):
        case.prepare()
        case.backward()
    times = []
    for _ in range(repeats):
        case.prepare()
        synchronize(device)
        start = time.perf_counter()
        case.backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peaks = []
    for c in (case, update_only):
        c.prepare()
        peaks.append(trace_allocations(c.backward, device).peak_bytes)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return Measurement(case.name, statistics.median(times), q[0], q[-1], *peaks, case.dw_bytes)


def synchronize(device="cpu") -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a wall-clock interval covers it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device="cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def run(n_out=5632, n_in=2048, tokens=2048, dtype=torch.float32, repeats=5, device="cpu", print_fn=print):
    backend = get_backend(device).name
    print_fn(f"linear backward, W {n_out}x{n_in}, {tokens} tokens, {dtype}, backend {backend}, "
             f"on {device_name(device)}")
    print_fn(f"{'case':<26}{'median ms':>11}{'p20':>9}{'p80':>9}{'time ratio':>12}{'bwd peak MiB':>14}"
             f"{'update peak MiB':>17}{'of dW':>8}{'mem ratio':>11}")
    # low precision: the fused default rounds stochastically; "nearest" is the like-for-like row (it drops small
    # updates exactly as the reference does)
    roundings = [Rounding.AUTO] + ([Rounding.NEAREST] if dtype != torch.float32 else [])
    rows = []
    for role in (Role.SGD, Role.SIGN):
        def case(kind, needs_dx, rounding=Rounding.AUTO):
            return make_case(kind, role, n_out, n_in, tokens, dtype, device, needs_dx, rounding)

        ref = measure(case("reference", True), case("reference", False), repeats, device=device)
        fused = [measure(case("fused", True, r), case("fused", False, r), repeats, device=device) for r in roundings]
        for m in (ref, *fused):
            print_fn(
                f"{m.name:<26}{m.median_s * 1e3:>11.1f}{m.p20_s * 1e3:>9.1f}{m.p80_s * 1e3:>9.1f}"
                f"{m.median_s / ref.median_s:>12.3f}{m.peak_extra_bytes / 2**20:>14.2f}"
                f"{m.update_peak_bytes / 2**20:>17.2f}{m.update_peak_bytes / m.dw_bytes:>8.3f}"
                f"{m.peak_extra_bytes / max(ref.peak_extra_bytes, 1):>11.3f}"
            )
        rows.append((ref, *fused))
    print_fn("time ratio: median backward time / reference's; mem ratio: backward peak / reference's; "
             "'of dW': the update's own peak as a fraction of one dW")
    return rows
