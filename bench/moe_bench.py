"""BREAD-SGD on a CPU-sized mixture-of-experts model: the engine's backward against the reference way.

Model: transformers' Qwen3-MoE (random init, no downloads), every layer an MoE layer, fp32.  Method: BREAD-SGD
(``sgd_mode="all"``), the active block fixed at layer 1, so every other layer's weights — the 3-D expert weights
included — take the on-the-fly update ``W -= lr·dW`` inside the backward.

* engine: ``bread_kernels.patch`` + ``BlockOptimizer`` (the fused experts function: per-expert ``addmm_`` update,
  no [E, ·, ·] gradient), with the streaming recompute (default) and with ``recompute=False``;
* reference: the same ``BlockOptimizer`` on the unpatched model — plain autograd, every inactive weight's whole
  gradient materialised and read back by a post-accumulate-grad hook (what BlockOptimizers' ``block_optim.py``
  does), with the config's experts implementation (grouped_mm), with and without Hugging Face gradient
  checkpointing.

Per case: the median backward time over the repeats (forward untimed), the bytes the forward left alive
(activations), the peak extra bytes during the backward, and their sum (peak memory of the step on top of the
weights), from the profiler's allocation events (``bread_kernels.bench.memory``) in the warm-up step, which is not
timed.  Not a test.

    python bench/moe_bench.py [--out DIR] [--layers 4 --hidden 384 --experts 8 --top-k 2 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's bread_kernels, run from anywhere

import torch
import transformers

import bread_kernels
from bread_kernels.bench.memory import trace_allocations
from bread_kernels.patch import fused_fraction

MIB = 1 << 20


def build(args, seed=0):
    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
        moe_intermediate_size=args.moe_intermediate, intermediate_size=4 * args.hidden, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=2 * args.seq,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(config).float().train()


def run_case(name, args, ids):
    model = build(args)
    patched = name.startswith("engine")
    if patched:
        bread_kernels.patch(model, recompute=name != "engine, recompute=False")
    elif "checkpointing" in name:
        model.gradient_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpatched model's slow-path warning
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                                           list(model.named_parameters()), switch_mode="fixed", start_block=1,
                                           switch_block_every=10 ** 6, sgd_mode="all", verbose=0)
    times = []
    for repeat in range(args.repeats + 1):  # the first (a warm-up) measures memory, the others time
        holder = {}

        def forward():
            holder["loss"] = model(input_ids=ids, labels=ids).loss

        def backward():
            holder.pop("loss").backward()

        if repeat == 0:  # the profiler's allocation events: their overhead stays out of the times
            forward_trace, backward_trace = trace_allocations(forward), trace_allocations(backward)
        else:
            forward()
            start = time.perf_counter()
            backward()
            times.append(time.perf_counter() - start)
        opt.step()
        opt.zero_grad()
    fraction = fused_fraction(model) if patched else None
    row = {
        "case": name,
        "backward_ms": 1e3 * statistics.median(times),
        "backward_ms_all": [1e3 * t for t in times],
        "forward_retained_mib": forward_trace.retained_bytes / MIB,
        "backward_peak_mib": backward_trace.peak_bytes / MIB,
    }
    row["step_peak_mib"] = row["forward_retained_mib"] + row["backward_peak_mib"]
    if fraction is not None:
        row["fused_fraction_of_linear_and_expert"] = fraction["fraction_of_linear_and_expert"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-name", default=None, help="how to name this CPU in the results")
    parser.add_argument("--out", default=".",
                        help="directory for the results (default: the current one; the committed ones are in "
                             "bench/results)")
    args = parser.parse_args()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    cases = ["engine (recompute)", "engine, recompute=False", "reference (autograd + hooks)",
             "reference (autograd + hooks), HF checkpointing"]
    rows = [run_case(name, args, ids) for name in cases]
    model = build(args)
    expert_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n) / MIB
    device = args.device_name or f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = (f"BREAD-SGD (sgd_mode='all', active block 1) backward on {device}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}: Qwen3-MoE {args.layers} layers x hidden {args.hidden}, "
              f"{args.experts} experts top-{args.top_k} (moe_intermediate {args.moe_intermediate}), vocab "
              f"{args.vocab}, batch {args.batch}x{args.seq}, float32; expert weights {expert_mib:.1f} MiB in all; "
              f"median of {args.repeats} backwards after a warm-up")
    lines = [header, "", f"{'case':<48} {'backward ms':>12} {'activations MiB':>16} {'bwd peak MiB':>13} "
             f"{'step peak MiB':>14}"]
    reference = rows[2]
    for row in rows:
        lines.append(f"{row['case']:<48} {row['backward_ms']:>12.0f} {row['forward_retained_mib']:>16.1f} "
                     f"{row['backward_peak_mib']:>13.1f} {row['step_peak_mib']:>14.1f}")
    lines.append("")
    for row in rows[:2]:
        lines.append(f"{row['case']}: time {row['backward_ms'] / reference['backward_ms']:.2f}x, step peak "
                     f"{row['step_peak_mib'] / reference['step_peak_mib']:.2f}x, backward peak "
                     f"{row['backward_peak_mib'] / reference['backward_peak_mib']:.2f}x the reference without "
                     f"checkpointing; fused fraction of linear+expert weights "
                     f"{100 * row['fused_fraction_of_linear_and_expert']:.0f}%")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_cpu_float32.txt").write_text(text + "\n")
    (out / "moe_cpu_float32.json").write_text(json.dumps({"device": device, "dtype": "float32", "header": header,
                                                          "args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
