"""The memory-for-time trade of ``patch(keep_top=k)``, with and without the fused head+loss: forward + backward time
and peak memory of the engine against the best-configured reference (HF checkpointing with the cut), on the bench's
default CPU model.

    python bench/keep_top_trade.py [--dtype bf16] [--repeats 3] [--keep 0 auto 1] [--variants BAdam BREAD-SGD]

Times are medians of alternating runs (drift hits every side alike); peaks from the profiler's allocation events
over forward + backward (``bread_kernels.bench.memory``).
"""

import argparse
import copy
import statistics

import torch

from bread_kernels import patch
from bread_kernels.bench.linear import device_name
from bread_kernels.bench.model import (CPU_SETUP, VARIANTS, _optimizer, build_model, reference_ways, settle,
                                       step_peak_bytes, step_time)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=CPU_SETUP["shape"]["vocab"])
    parser.add_argument("--keep", type=lambda v: v if v == "auto" else int(v), nargs="+", default=[0, "auto", 1],
                        help="keep_top values: ints or auto")
    parser.add_argument("--variants", nargs="+", default=["BAdam", "BREAD-SGD"], choices=list(VARIANTS))
    args = parser.parse_args()
    shape = {**CPU_SETUP["shape"], "vocab": args.vocab}
    base = build_model(**shape, dtype=DTYPES[args.dtype])
    ids = torch.randint(0, shape["vocab"], (CPU_SETUP["batch"], CPU_SETUP["seq"]),
                        generator=torch.Generator().manual_seed(0))
    print(f"keep_top trade on {device_name(torch.device('cpu'))}: Llama {shape['layers']}x{shape['hidden']}, vocab "
          f"{shape['vocab']}, batch {CPU_SETUP['batch']}x{CPU_SETUP['seq']}, {args.dtype}; forward + backward, median "
          f"of {args.repeats}; ratios against the best-configured reference")
    print(f"{'variant':<20}{'block':>6}  {'side':<22}{'step ms':>9}{'peak MiB':>10}{'time':>7}{'memory':>8}")
    for variant in args.variants:
        for active in (1, shape["layers"] - 2):
            best = reference_ways(base, True)["best"]
            sides = [("reference (best)", best, _optimizer(best, variant, active))]
            for keep in args.keep:
                for fused_loss in (False, True):
                    model = patch(copy.deepcopy(base), keep_top=keep, fused_loss=fused_loss).train()
                    sides.append((f"keep_top={keep} fused_loss={'on' if fused_loss else 'off'}", model,
                                  _optimizer(model, variant, active)))
            for _, model, opt in sides:
                settle(model, opt, ids)  # "auto" grows by a block per step
            peaks = {name: step_peak_bytes(model, opt, ids) for name, model, opt in sides}
            times = {name: [] for name, _, _ in sides}
            for _ in range(args.repeats):
                for name, model, opt in sides:
                    times[name].append(step_time(model, opt, ids))
            t0, p0 = statistics.median(times[sides[0][0]]), peaks[sides[0][0]]
            for name, _, _ in sides:
                t = statistics.median(times[name])
                print(f"{variant:<20}{active:>6}  {name:<22}{t * 1e3:>9.0f}{peaks[name] / 2**20:>10.1f}{t / t0:>7.2f}"
                      f"{peaks[name] / p0:>8.2f}")


if __name__ == "__main__":
    main()
