"""``python -m bread_kernels.bench [linear|model] [options]``: run a benchmark and print its table.

The default (no arguments) is the fused-linear benchmark on a TinyLlama-sized MLP weight (5632×2048, 2048 tokens,
fp32) on the CPU: backward time and peak memory of the fused SGD / SIGN update against autograd plus a
post-accumulate-grad hook.  ``model`` runs the BCD variants (BAdam, BREAD-SGD, -partial, -sign; BREAD and
BREAD-partial on a peft LoRA model with ``--variants BREAD BREAD-partial``) on a Llama against the same variants done
the reference way (plain autograd + hooks + HF gradient checkpointing).
"""

import argparse

import torch

from . import linear, lora, model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bread_kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", default="linear", choices=["linear", "lora", "model"],
                        help="linear: one fused linear backward; lora: one LoRA layer's backward against peft "
                             "(--lora-rank); model: BCD variants on a Llama (see --help text)")
    parser.add_argument("--out-features", type=int, default=5632)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group = parser.add_argument_group("model suite")
    group.add_argument("--layers", type=int, default=8)
    group.add_argument("--hidden", type=int, default=512)
    group.add_argument("--intermediate", type=int, default=1376)
    group.add_argument("--heads", type=int, default=8)
    group.add_argument("--vocab", type=int, default=4096)
    group.add_argument("--batch", type=int, default=4)
    group.add_argument("--seq", type=int, default=256)
    group.add_argument("--positions", type=int, nargs="+", default=[1, 4, 6], help="active block indices")
    group.add_argument("--variants", nargs="+", default=list(model.DEFAULT_VARIANTS), choices=list(model.VARIANTS),
                       help="BREAD and BREAD-partial run on a peft LoRA model (--lora-rank)")
    group.add_argument("--lora-rank", type=int, default=8)
    group.add_argument("--no-recompute", action="store_true", help="keep activations; reference without checkpointing")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.suite == "linear":
        linear.run(args.out_features, args.in_features, args.tokens, DTYPES[args.dtype], args.repeats, args.device)
    elif args.suite == "lora":
        lora.run(args.out_features, args.in_features, args.tokens, args.lora_rank, DTYPES[args.dtype], args.repeats,
                 args.device)
    else:
        if any(not 0 <= p < args.layers for p in args.positions):
            parser.error(f"--positions must be block indices in [0, {args.layers})")
        model.run(tuple(args.positions), tuple(args.variants), args.batch, args.seq, DTYPES[args.dtype], args.repeats,
                  not args.no_recompute, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                  heads=args.heads, vocab=args.vocab, lora_rank=args.lora_rank, device=args.device)


if __name__ == "__main__":
    main()
