"""Benchmark (not a test): the fused head+loss (``patch(model, fused_loss=True)``) against the unfused engine and the
reference, on a Llama whose head dominates the step: peak memory and time of forward + backward.

    python -m bench.head_loss_bench [--vocab 32000 128256] [--layers 2] [--hidden 512] [--batch 4] [--seq 512]
                                   [--variants BAdam BREAD-SGD] [--dtype fp32] [--repeats 2] [--out DIR]

Sides, for each variant (the active block is the 2nd-to-last layer; BREAD-SGD updates the head on the fly):

* ``fused``: ``bread_kernels.patch(model, fused_loss=True)`` + ``BlockOptimizer``;
* ``engine``: ``bread_kernels.patch(model, fused_loss=False)`` (the fused linear head, the logits and HF's loss) +
  ``BlockOptimizer``;
* ``reference``: plain autograd + the optimizer's hooks, HF gradient checkpointing as its users run it (the input
  embeddings require grad, so the backward runs through every layer);
* ``reference-cut``: the same with ``disable_input_require_grads()`` (autograd stops at the lowest trainable block);
* ``liger``: ``reference-cut`` with Liger-Kernel's fused linear cross-entropy forward (``lce_forward``, what
  ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` installs, bound to this one model) — on a GPU
  with ``liger-kernel`` installed, or with ``--liger`` (under ``TRITON_INTERPRET=1`` on a CPU: a check, not a time).

The fused loss does the head's backward work (dh, and the head's dW for an Adam-trained head) in the forward, chunk by
chunk, so its *backward* alone is not comparable: the headline is forward + backward (``step``), and the backward
alone is reported too.  Peak memory is the peak of live bytes allocated on top of what exists before the forward,
over forward + backward (``bread_kernels.bench.memory.trace_allocations``: the profiler's allocation events on a
CPU, the caching allocator's peak on a GPU), measured in an untimed warm-up.  Before timing, the fused side's loss
must equal the reference's (rtol 1e-4; 1e-2 for bf16/fp16 weights, whose logits the reference rounds) from the same
weights.  Results: ``<out>/head_loss_<device>_<dtype>.json``
and a table on stdout (saved by the caller as ``.txt``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import types
import warnings
from pathlib import Path

import torch

import bread_kernels
from bread_kernels.bench.__main__ import DTYPES
from bread_kernels.bench.linear import device_name, synchronize
from bread_kernels.bench.memory import trace_allocations
from bread_kernels.bench.model import build_model, reference_ways, settle
from bread_kernels.functions.head_loss import chunk_budget_bytes

VARIANTS = {"BAdam": dict(sgd_mode="disabled"), "BREAD-SGD": dict(sgd_mode="all")}
SIDES = ("fused", "engine", "reference", "reference-cut")


def liger_model(base):
    """The reference-cut model with Liger-Kernel's fused linear cross-entropy as its forward."""
    from liger_kernel.transformers.model.llama import lce_forward

    model = reference_ways(base, recompute=True)["best"]
    model.forward = types.MethodType(lce_forward, model)
    return model


def liger_by_default(device) -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def optimizer(model, variant, active):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpatched reference's slow-path warning
        return bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5),
                                            list(model.named_parameters()), switch_mode="fixed", start_block=active,
                                            verbose=0, **VARIANTS[variant])


def step_times(model, opt, ids):
    synchronize(ids.device)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    synchronize(ids.device)
    middle = time.perf_counter()
    loss.backward()
    synchronize(ids.device)
    end = time.perf_counter()
    opt.zero_grad()
    return middle - start, end - middle


def peak_bytes(model, opt, ids):
    peak = trace_allocations(lambda: model(input_ids=ids, labels=ids).loss.backward(), ids.device).peak_bytes
    opt.zero_grad()
    return peak


def measure(vocab, variant, args, device):
    base = build_model(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                       vocab=vocab, dtype=DTYPES[args.dtype], device=device).train()
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    refs = reference_ways(base, recompute=True)
    models = {"fused": bread_kernels.patch(copy.deepcopy(base), fused_loss=True).train(),
              "engine": bread_kernels.patch(copy.deepcopy(base), fused_loss=False).train(),
              "reference": refs["reference"], "reference-cut": refs["best"]}
    sides = SIDES + (("liger",) if args.liger else ())
    if args.liger:
        models["liger"] = liger_model(base)
    active = args.layers - 2 if args.layers >= 2 else 0
    opts = {side: optimizer(models[side], variant, active) for side in sides}
    with torch.no_grad():  # the fused losses run only with grad: compare them to the reference's (same weights)
        expected = models["reference-cut"](input_ids=ids, labels=ids).loss.item()
    for side in ("fused", "liger") if args.liger else ("fused",):
        got = models[side](input_ids=ids, labels=ids).loss.item()
        opts[side].zero_grad()
        if abs(got - expected) > (1e-4 if args.dtype == "fp32" else 1e-2) * abs(expected):
            raise SystemExit(f"head_loss_bench: the {side} side's loss {got} differs from the reference's {expected}")
    rows = {side: dict(vocab=vocab, variant=variant, side=side, active=active, forward_s=[], backward_s=[])
            for side in sides}
    for side in sides:  # settled ("auto" keeps a block more per step), then the warm-up measures the peak
        settle(models[side], opts[side], ids)
        rows[side]["peak_mib"] = peak_bytes(models[side], opts[side], ids) / 2**20
    for _ in range(args.repeats):  # the sides alternate, so drift of this shared machine hits them alike
        for side in sides:
            forward, backward = step_times(models[side], opts[side], ids)
            rows[side]["forward_s"].append(forward)
            rows[side]["backward_s"].append(backward)
    for row in rows.values():
        row["forward_ms"] = statistics.median(row["forward_s"]) * 1e3
        row["backward_ms"] = statistics.median(row["backward_s"]) * 1e3
        row["step_ms"] = statistics.median([f + b for f, b in zip(row["forward_s"], row["backward_s"])]) * 1e3
    for side in sides:
        for other in ("engine", "reference", "reference-cut") + (("liger",) if args.liger else ()):
            rows[side][f"peak_vs_{other}"] = rows[side]["peak_mib"] / rows[other]["peak_mib"]
            rows[side][f"step_vs_{other}"] = rows[side]["step_ms"] / rows[other]["step_ms"]
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the model's dtype (default fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=".",
                        help="directory for the results (default: the current one; the committed ones are in "
                             "bench/results)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                        help="add Liger-Kernel's FLCE as a side (default: on a GPU with liger-kernel installed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.liger is None:
        args.liger = liger_by_default(device)
    name = device_name(device)
    print(f"fused head+loss, Llama {args.layers}x{args.hidden} (inter {args.intermediate}), batch {args.batch}x"
          f"{args.seq}, {DTYPES[args.dtype]}, on {name}; torch {torch.__version__}, python {platform.python_version()}")
    print(f"{'vocab':>7} {'variant':<10} {'side':<14} {'fwd ms':>8} {'bwd ms':>8} {'step ms':>8} {'peak MiB':>9} "
          f"{'step/ref-cut':>12} {'peak/ref-cut':>12} {'step/engine':>11} {'peak/engine':>11}"
          + (f" {'step/liger':>10} {'peak/liger':>10}" if args.liger else ""))
    rows = []
    for vocab in args.vocab:
        for variant in args.variants:
            for row in measure(vocab, variant, args, device):
                rows.append(row)
                print(f"{vocab:>7} {variant:<10} {row['side']:<14} {row['forward_ms']:>8.0f} {row['backward_ms']:>8.0f} "
                      f"{row['step_ms']:>8.0f} {row['peak_mib']:>9.0f} {row['step_vs_reference-cut']:>12.2f} "
                      f"{row['peak_vs_reference-cut']:>12.2f} {row['step_vs_engine']:>11.2f} "
                      f"{row['peak_vs_engine']:>11.2f}"
                      + (f" {row['step_vs_liger']:>10.2f} {row['peak_vs_liger']:>10.2f}" if args.liger else ""),
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    dtype = str(DTYPES[args.dtype]).removeprefix("torch.")
    path = out / f"head_loss_{tag}_{dtype}.json"
    path.write_text(json.dumps(dict(device=name, dtype=dtype, torch=torch.__version__, args=vars(args),
                                    loss_chunk_bytes=chunk_budget_bytes(),
                                    rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
