"""Benchmark of one LoRA layer's backward: the fused function against peft's own autograd.

A peft ``lora.Linear`` (rank r, frozen base weight ``W`` [N, K], trainable A and B, no dropout) in the middle of a
network (the input needs dX).  peft: plain autograd through ``base(x) + B(A(x))·s``.  Fused:
:func:`bread_kernels.fused_lora_linear` with the base weight's role LORA (``v = gB``, ``dA``, ``dB`` from the
backend's ``lora_grads``: three GEMMs, or on a GPU with ``BREAD_LORA_KERNEL=triton`` one Triton kernel).  Only the
backward is timed.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..backends import get_backend
from ..functions.lora import fused_lora_linear
from ..plan import Role, WeightPlan
from .linear import device_name, synchronize
from .memory import trace_allocations


def _layer(n_out, n_in, rank, dtype, device):
    import peft

    host = torch.nn.Module()
    host.proj = torch.nn.Linear(n_in, n_out, bias=False)
    layer = peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
                                         host).proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    layer.to(device=device, dtype=dtype)
    layer.base_layer.weight.requires_grad_(False)
    return layer


def _timed(prepare, backward, repeats, device):
    prepare()
    backward()  # warm-up (and Triton compilation)
    times = []
    for _ in range(repeats):
        prepare()
        synchronize(device)
        start = time.perf_counter()
        backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    prepare()
    peak = trace_allocations(backward, device).peak_bytes
    return statistics.median(times), peak


def run(n_out=5632, n_in=2048, tokens=2048, rank=8, dtype=torch.float32, repeats=5, device="cpu", print_fn=print):
    layer = _layer(n_out, n_in, rank, dtype, device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype).to(device).requires_grad_(True)
    g = torch.randn(tokens, n_out, generator=gen).to(dtype).to(device)
    plan = WeightPlan(Role.LORA, name="proj")
    state = {}

    def prepare_peft():
        x.grad = a.grad = b.grad = None
        state["y"] = layer(x)

    def prepare_fused():
        x.grad = a.grad = b.grad = None
        state["y"] = fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, layer.scaling["default"], plan)

    def backward():
        state.pop("y").backward(g)

    backend = get_backend(device).name
    print_fn(f"LoRA linear backward, W {n_out}x{n_in} frozen, r={rank}, {tokens} tokens, {dtype}, backend {backend}, "
             f"on {device_name(device)}")
    t_peft, m_peft = _timed(prepare_peft, backward, repeats, device)
    t_fused, m_fused = _timed(prepare_fused, backward, repeats, device)
    print_fn(f"{'case':<8}{'median ms':>11}{'time ratio':>12}{'bwd peak MiB':>14}{'mem ratio':>11}")
    for name, t, m in (("peft", t_peft, m_peft), ("fused", t_fused, m_fused)):
        print_fn(f"{name:<8}{t * 1e3:>11.3f}{t / t_peft:>12.3f}{m / 2**20:>14.2f}{m / max(m_peft, 1):>11.3f}")
    return (t_peft, m_peft), (t_fused, m_fused)
