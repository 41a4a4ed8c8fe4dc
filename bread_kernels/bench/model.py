"""Benchmark of whole-model BCD steps: each variant through the engine against the same variant done the reference
way, in one run.

Model: a Llama from a config (default 8 layers, hidden 512, intermediate 1376, 8 heads, vocab 4096; batch 4×256),
random init.  Variants: BAdam, BREAD-SGD-partial, BREAD-SGD, BREAD-SGD-sign, with the active block at several
layers.  Engine: ``bread_kernels.patch`` + ``BlockOptimizer``.  Reference way, as its users run it: the unpatched
model with Hugging Face gradient checkpointing (which makes the input embeddings require grad, so the backward runs
through every layer), plain autograd, and post-accumulate-grad hooks for the on-the-fly updates (the same
``BlockOptimizer`` on an unpatched model is exactly that path).  ``--no-recompute`` compares ``patch(recompute=
False)`` against the reference without checkpointing.

Reported per variant and position: backward time (median of the repeats, engine and reference alternating; the
forward is not timed), peak extra
memory over forward+backward, their ratios to the reference, and the backward time as a multiple of the ideal
GEMM time: the matmul FLOPs the variant must do in its backward (dX below the top for every block above the
lowest needed one, dW for the blocks whose weights get one) divided by this machine's measured GEMM throughput.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

from ..optim import BlockOptimizer
from ..patch import patch
from .linear import device_name
from .memory import trace_allocations

VARIANTS = {
    "BAdam": dict(sgd_mode="disabled"),
    "BREAD-SGD-partial": dict(sgd_mode="partial"),
    "BREAD-SGD": dict(sgd_mode="all"),
    "BREAD-SGD-sign": dict(sgd_mode="all", sgd_use_sign=True),
}


def build_model(layers=8, hidden=512, intermediate=1376, heads=8, vocab=4096, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(config).to(dtype)


def _optimizer(model, variant, active, lr=1e-5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), list(model.named_parameters()),
                              switch_mode="fixed", start_block=active, verbose=0, **VARIANTS[variant])


def gemm_flops_per_second(dtype, n=1024, repeats=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def ideal_backward_flops(model, variant, active, tokens, seq) -> float:
    """Matmul FLOPs the variant's backward cannot avoid (linears and attention; no recompute)."""
    layers = model.model.layers
    n = len(layers)
    sgd = VARIANTS[variant]["sgd_mode"]
    lowest = 0 if sgd == "all" else active
    hidden = model.config.hidden_size
    per_layer = sum(2 * tokens * m.in_features * m.out_features for m in layers[0].modules()
                    if isinstance(m, torch.nn.Linear))
    attention = 4 * tokens * seq * hidden  # scores and weighted values, forward FLOPs
    head = 2 * tokens * model.lm_head.in_features * model.lm_head.out_features
    flops = head * (2 if sgd != "disabled" else 1)  # head: dX always, dW when it is updated
    for i in range(lowest, n):
        has_dw = i == active or (sgd == "all") or (sgd == "partial" and i > active)
        flops += per_layer * has_dw + 2 * attention
        flops += (per_layer if i > lowest else 0)  # dX through the block, except at the lowest needed one
    return flops


def _backward_time(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    start = time.perf_counter()
    loss.backward()
    elapsed = time.perf_counter() - start
    opt.zero_grad()
    return elapsed


def _peak(model, opt, ids) -> int:
    peak = trace_allocations(lambda: model(input_ids=ids, labels=ids).loss.backward()).peak_bytes
    opt.zero_grad()
    return peak


def _measure_pair(engine, reference, ids, repeats):
    """Median backward times of both, measured alternately (so drift of the machine hits both alike), after one
    warm-up each; then each one's peak memory over forward + backward."""
    times = ([], [])
    for i in range(repeats + 1):
        for side, (model, opt) in enumerate((engine, reference)):
            elapsed = _backward_time(model, opt, ids)
            if i:
                times[side].append(elapsed)
    return (statistics.median(times[0]), statistics.median(times[1]), _peak(*engine, ids), _peak(*reference, ids))


def run(positions=(1, 4, 6), variants=tuple(VARIANTS), batch=4, seq=256, dtype=torch.float32, repeats=3,
        recompute=True, print_fn=print, **model_kwargs):
    base = build_model(dtype=dtype, **model_kwargs)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    throughput = gemm_flops_per_second(dtype)
    print_fn(f"BCD backward, Llama {len(base.model.layers)}x{base.config.hidden_size} (inter "
             f"{base.config.intermediate_size}, vocab {base.config.vocab_size}), batch {batch}x{seq}, {dtype}, "
             f"recompute={recompute}, on {device_name()}; GEMM {throughput / 1e9:.0f} GFLOP/s")
    print_fn(f"{'variant':<20}{'active':>7}{'engine ms':>11}{'ref ms':>9}{'time ratio':>12}{'engine MiB':>12}"
             f"{'ref MiB':>9}{'mem ratio':>11}{'x ideal':>9}")
    summary = {}
    for variant in variants:
        ratios = []
        for active in positions:
            engine = patch(copy.deepcopy(base), recompute=recompute).train()
            reference = copy.deepcopy(base).train()
            if recompute:
                if hasattr(reference, "activation_checkpointing_enable"):  # the name since transformers 5.x
                    reference.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            t_engine, t_ref, m_engine, m_ref = _measure_pair((engine, _optimizer(engine, variant, active)),
                                                             (reference, _optimizer(reference, variant, active)),
                                                             ids, repeats)
            ideal = ideal_backward_flops(base, variant, active, batch * seq, seq) / throughput
            ratios.append((t_engine / t_ref, m_engine / m_ref, m_engine))
            print_fn(f"{variant:<20}{active:>7}{t_engine * 1e3:>11.0f}{t_ref * 1e3:>9.0f}{t_engine / t_ref:>12.3f}"
                     f"{m_engine / 2**20:>12.1f}{m_ref / 2**20:>9.1f}{m_engine / m_ref:>11.3f}{t_engine / ideal:>9.2f}")
            del engine, reference
        summary[variant] = (statistics.mean(r[0] for r in ratios), statistics.mean(r[1] for r in ratios),
                            statistics.mean(r[2] for r in ratios))
    print_fn("mean over positions: " + "; ".join(f"{v}: time {t:.3f}x, memory {m:.3f}x" for v, (t, m, _) in
                                                 summary.items()))
    if "BAdam" in summary:
        badam_mem = summary["BAdam"][2]
        print_fn("peak memory vs BAdam's (engine): " + ", ".join(
            f"{v} {s[2] / badam_mem:.3f}" for v, s in summary.items() if v != "BAdam"))
    return summary
