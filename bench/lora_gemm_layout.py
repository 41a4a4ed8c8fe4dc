"""Benchmark (not a test): the CPU backends' LoRA adapter gradients (``backends/lora_gemm.py``) with the rank-r
operand on the left (``vᵀ = Bᵀ gᵀ``, ``dBᵀ = s · uᵀ g``) against the same products as ``g B`` and ``gᵀ u``, with what
the fused LoRA backward does around them (the casts of the saved layer-dtype input and of ``g`` to the adapters'
dtype, ``dX += s · v A`` into the layer-dtype dX, ``dB`` accumulated into a contiguous ``B.grad``); median time per
call and the largest difference relative to the largest value.

    python -m bench.lora_gemm_layout [--tokens 1024] [--rank 8] [--repeats 40]

Shapes: the bench model's linears (hidden 512, intermediate 1376); dtypes: a bf16 layer with peft's default fp32
adapters (``autocast_adapter_dtype=True``), bf16 adapters, and fp32 throughout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bread_kernels.backends.lora_gemm import lora_grads_gemm
from bread_kernels.bench.linear import device_name


def as_written(grad_output, input, u, lora_b, scaling, need_a, need_b):
    """The products as the formulas read: ``v = g B``, ``dB = s · gᵀ u``, ``dA = s · vᵀ x``."""
    g = grad_output.to(lora_b.dtype)
    v = g @ lora_b
    grad_b = torch.mm(g.t(), u.to(lora_b.dtype)).mul_(scaling) if need_b else None
    grad_a = torch.mm(v.t(), input.to(lora_b.dtype)).mul_(scaling) if need_a else None
    return v, grad_a, grad_b


def _median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    m, r = args.tokens, args.rank
    print(f"LoRA adapter gradients + dX term, {device_name('cpu')}, "
          f"torch {torch.__version__}, M={m}, r={r}")
    for layer_dtype, adapter_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.float32, torch.float32)):
        for n, k in ((1376, 512), (512, 1376), (512, 512)):
            x = torch.randn(m, k, dtype=layer_dtype)  # the layer's input, saved; cast for the adapters
            lora_a, lora_b = torch.randn(r, k, dtype=adapter_dtype), torch.randn(n, r, dtype=adapter_dtype)
            g, u = torch.randn(m, n, dtype=layer_dtype), x.to(adapter_dtype) @ lora_a.t()
            grad_x, grad_lora_b = torch.zeros(m, k, dtype=layer_dtype), torch.zeros(n, r, dtype=adapter_dtype)

            def step(fn):
                v, _, grad_b = fn(g, x, u, lora_b, 2.0, True, True)
                grad_lora_b.add_(grad_b)
                if grad_x.dtype == lora_a.dtype:
                    grad_x.addmm_(v, lora_a, alpha=2.0)
                else:
                    grad_x.add_(torch.mm(v, lora_a).mul_(2.0).to(grad_x.dtype))

            before = _median_ms(lambda: step(as_written), args.repeats)
            after = _median_ms(lambda: step(lora_grads_gemm), args.repeats)
            diff = max(((p - q).abs().max() / p.abs().max()).item()
                       for p, q in zip(as_written(g, x, u, lora_b, 2.0, True, True),
                                       lora_grads_gemm(g, x, u, lora_b, 2.0, True, True)))
            print(f"layer {str(layer_dtype)[6:]:8s} adapters {str(adapter_dtype)[6:]:8s} N={n:5d} K={k:5d}: "
                  f"g B / gᵀ u {before:.3f} ms, rank-r left {after:.3f} ms ({before / after:.2f}x), "
                  f"largest relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
