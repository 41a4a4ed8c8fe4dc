"""``python -m bread_kernels.bench [linear] [options]``: run a benchmark and print its table.

The default (no arguments) is the fused-linear benchmark on a TinyLlama-sized MLP weight (5632×2048, 2048 tokens,
fp32) on the CPU: backward time and peak memory of the fused SGD / SIGN update against autograd plus a
post-accumulate-grad hook.
"""

import argparse

import torch

from . import linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bread_kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", default="linear", choices=["linear"])
    parser.add_argument("--out-features", type=int, default=5632)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    linear.run(args.out_features, args.in_features, args.tokens, DTYPES[args.dtype], args.repeats, args.device)


if __name__ == "__main__":
    main()
