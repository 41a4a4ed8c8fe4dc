"""Where a step's time (forward + backward) goes besides the GEMMs: the profiler's self time split into GEMMs and
everything else.

Meaningful on any CPU (on one that emulates bf16 GEMMs, bf16 *times* mean nothing, but the GEMM call count and the
time outside the GEMMs still compare the engine with the reference).  The profiler adds a few µs to every op, so
``other_ms`` is inflated alike on both sides: it ranks per-op overhead, it is not a wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import quiet_stderr

__all__ = ["GEMM_OPS", "StepProfile", "profile_step"]

#: leaf matmul ops (a composite like ``aten::matmul`` or ``bread_kernels::addmm_if_finite_`` calls one of these)
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm"})


@dataclass
class StepProfile:
    gemm_calls: int
    gemm_ms: float
    attention_ms: float  # fused attention kernels (SDPA's, flash): GEMM work the count above does not see
    other_ms: float
    ops: int  # every op the profiler recorded


def profile_step(model, opt, ids) -> StepProfile:
    """One profiled forward + backward of ``model`` on ``ids`` (causal-LM loss on the ids themselves)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ids.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with quiet_stderr(), torch.profiler.profile(activities=activities) as prof:  # its USDT lines are noise
        model(input_ids=ids, labels=ids).loss.backward()
    opt.zero_grad()
    gemm_calls, gemm_us, attention_us, total_us, ops = 0, 0.0, 0.0, 0.0, 0
    for event in prof.key_averages():
        total_us += event.self_cpu_time_total
        ops += event.count
        if event.key in GEMM_OPS:
            gemm_calls += event.count
            gemm_us += event.self_cpu_time_total
        elif "attention" in event.key:
            attention_us += event.self_cpu_time_total
    return StepProfile(gemm_calls, gemm_us / 1e3, attention_us / 1e3, (total_us - gemm_us - attention_us) / 1e3,
                           ops)
