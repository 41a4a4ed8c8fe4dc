"""The memory-for-time trade of ``patch(keep_top=k)``: backward time and peak memory of the engine with the top
k blocks keeping their activations, against k=0 (every block recomputed), on the bench's default CPU model.

    python bench/keep_top_trade.py [--repeats 3] [--vocab 4096]

Times are medians of alternating runs (drift hits every side alike); peaks from the profiler's allocation events
over forward + backward (``bread_kernels.bench.memory``).
"""

import argparse
import copy
import statistics

import torch

from bread_kernels import patch
from bread_kernels.bench.linear import device_name
from bread_kernels.bench.model import CPU_SETUP, backward_time, _optimizer, step_peak_bytes, build_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=CPU_SETUP["shape"]["vocab"])
    parser.add_argument("--keep", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    shape = {**CPU_SETUP["shape"], "vocab": args.vocab}
    base = build_model(**shape, dtype=torch.float32)
    ids = torch.randint(0, shape["vocab"], (CPU_SETUP["batch"], CPU_SETUP["seq"]),
                        generator=torch.Generator().manual_seed(0))
    print(f"keep_top trade on {device_name(torch.device('cpu'))}: Llama {shape['layers']}x{shape['hidden']}, vocab "
          f"{shape['vocab']}, batch {CPU_SETUP['batch']}x{CPU_SETUP['seq']}, fp32; median of {args.repeats}")
    print(f"{'variant':<20}{'block':>6}{'keep':>6}{'backward ms':>13}{'peak MiB':>10}{'time':>7}{'memory':>8}")
    for variant, active in (("BAdam", shape["layers"] - 2), ("BAdam", 1), ("BREAD-SGD", 1)):
        sides = []
        for keep in args.keep:
            model = patch(copy.deepcopy(base), keep_top=keep).train()
            sides.append((keep, model, _optimizer(model, variant, active)))
        peaks = {keep: step_peak_bytes(model, opt, ids) for keep, model, opt in sides}
        times = {keep: [] for keep, _, _ in sides}
        for _ in range(args.repeats):
            for keep, model, opt in sides:
                times[keep].append(backward_time(model, opt, ids))
        t0, p0 = statistics.median(times[args.keep[0]]), peaks[args.keep[0]]
        for keep, _, _ in sides:
            t = statistics.median(times[keep])
            print(f"{variant:<20}{active:>6}{keep:>6}{t * 1e3:>13.0f}{peaks[keep] / 2**20:>10.1f}{t / t0:>7.2f}"
                  f"{peaks[keep] / p0:>8.2f}")


if __name__ == "__main__":
    main()
