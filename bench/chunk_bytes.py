"""How the CPU backends' chunk budget (``BREAD_CHUNK_BYTES``) trades memory for speed: the time of one fused SIGN
update (the chunked path: GEMM into a buffer, then the native epilogue) per budget, for weights of the bench's
default model and of Llama-3-8B's widths, against autograd's one dW GEMM.

    python bench/chunk_bytes.py [--tokens 1024] [--repeats 5]
"""

import argparse
import os
import statistics
import time

import torch

from bread_kernels import OnTheFlyUpdate, Role, WeightPlan, fused_linear
from bread_kernels.bench.linear import device_name

BUDGETS_MIB = (1, 4, 16, 64)
SHAPES = ((1376, 512), (512, 1376), (4096, 1024), (14336, 1024))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"SIGN update of one weight on {device_name(torch.device('cpu'))}, {args.tokens} tokens, {args.dtype}; "
          f"median of {args.repeats} (ms); autograd: the reference's dW GEMM alone")
    print(f"{'weight':>14}{'dW MiB':>8}{'autograd':>10}" + "".join(f"{f'{b} MiB':>9}" for b in BUDGETS_MIB))
    for n, k in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.tokens, k, generator=gen).to(dtype)
        g = torch.randn(args.tokens, n, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        plan = WeightPlan(Role.SIGN, OnTheFlyUpdate(lr=1e-6))
        timings = {b: [] for b in BUDGETS_MIB}
        timings["autograd"] = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            torch.mm(g.t(), x)
            timings["autograd"].append(time.perf_counter() - start)
            for budget in BUDGETS_MIB:
                os.environ["BREAD_CHUNK_BYTES"] = str(budget << 20)
                y = fused_linear(x, w, None, plan)
                start = time.perf_counter()
                y.backward(g)
                timings[budget].append(time.perf_counter() - start)
        ms = {key: statistics.median(v[1:]) * 1e3 for key, v in timings.items()}
        print(f"{f'{n}x{k}':>14}{n * k * dtype.itemsize / 2**20:>8.1f}{ms['autograd']:>10.1f}"
              + "".join(f"{ms[b]:>9.1f}" for b in BUDGETS_MIB))


if __name__ == "__main__":
    main()
