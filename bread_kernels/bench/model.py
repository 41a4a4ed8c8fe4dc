"""Benchmark of whole-model BCD steps: each variant through the engine against the same variant done the reference
way, in one run.

Model: a Llama from a config (default 8 layers, hidden 512, intermediate 1376, 8 heads, vocab 4096; batch 4×256),
random init.  Variants: BAdam, BREAD-SGD-partial, BREAD-SGD, BREAD-SGD-sign (the default set), and BREAD,
BREAD-partial on the same model wrapped by peft (LoRA of rank ``lora_rank`` on every linear of the blocks; the
reference way is then peft's own autograd), with the active block at several layers.  Engine: ``bread_kernels.patch`` + ``BlockOptimizer``.  Reference way, as its users run it: the unpatched
model with Hugging Face gradient checkpointing (which makes the input embeddings require grad, so the backward runs
through every layer), plain autograd, and post-accumulate-grad hooks for the on-the-fly updates (the same
``BlockOptimizer`` on an unpatched model is exactly that path).  ``--no-recompute`` compares ``patch(recompute=
False)`` against the reference without checkpointing.

Reported per variant and position: backward time (median of the repeats, engine and reference alternating; the
forward is not timed), the ratio of the matmul FLOPs the two backwards actually ran (counted by
``torch.utils.flop_counter``: the time ratio the engine would reach at the reference's GEMM efficiency), peak extra
memory over forward+backward, their ratios to the reference, and the backward time as a multiple of the ideal
GEMM time: the matmul FLOPs the variant must do in its backward (dX below the top for every block above the
lowest needed one, dW for the blocks whose weights get one) divided by this machine's measured GEMM throughput.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings

import torch

from ..optim import BlockOptimizer
from ..patch import patch
from .linear import device_name, synchronize
from .memory import trace_allocations

VARIANTS = {
    "BAdam": dict(sgd_mode="disabled"),
    "BREAD-SGD-partial": dict(sgd_mode="partial"),
    "BREAD-SGD": dict(sgd_mode="all"),
    "BREAD-SGD-sign": dict(sgd_mode="all", sgd_use_sign=True),
    # on a peft LoRA model (r = --lora-rank on every linear of the blocks); the reference way is peft's autograd
    "BREAD": dict(lora_mode="all"),
    "BREAD-partial": dict(lora_mode="partial"),
}
LORA_VARIANTS = ("BREAD", "BREAD-partial")
DEFAULT_VARIANTS = ("BAdam", "BREAD-SGD-partial", "BREAD-SGD", "BREAD-SGD-sign")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(layers=8, hidden=512, intermediate=1376, heads=8, vocab=4096, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(config).to(dtype)


def with_lora(model, rank: int):
    """``model`` wrapped by peft with rank-``rank`` LoRA on every linear of the blocks (peft's defaults otherwise)."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))


def _optimizer(model, variant, active, lr=1e-5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), list(model.named_parameters()),
                              switch_mode="fixed", start_block=active, verbose=0, **VARIANTS[variant])


def gemm_flops_per_second(dtype, n=1024, repeats=5, device="cpu") -> float:
    device = torch.device(device)
    if device.type == "cuda":
        n, repeats = 4096, 20
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def ideal_backward_flops(model, variant, active, tokens, seq, lora_rank=0) -> float:
    """Matmul FLOPs the variant's backward cannot avoid (linears, LoRA adapters and attention; no recompute).
    ``model`` is the plain (not peft-wrapped) model."""
    layers = model.model.layers
    n = len(layers)
    sgd = VARIANTS[variant].get("sgd_mode", "disabled")
    lora_mode = VARIANTS[variant].get("lora_mode") if variant in LORA_VARIANTS else None
    lowest = 0 if sgd == "all" or lora_mode == "all" else active
    hidden = model.config.hidden_size
    linears = [m for m in layers[0].modules() if type(m) is torch.nn.Linear]
    per_layer = sum(2 * tokens * m.in_features * m.out_features for m in linears)
    # LoRA adapters: v = gB, dB, dA and the s·vA term of dX: four rank-r GEMMs per linear
    lora = sum(2 * tokens * lora_rank * (2 * m.out_features + 2 * m.in_features) for m in linears) if lora_mode else 0
    attention = 4 * tokens * seq * hidden  # scores and weighted values, forward FLOPs
    head = 2 * tokens * model.lm_head.in_features * model.lm_head.out_features
    flops = head * (2 if sgd != "disabled" else 1)  # head: dX always, dW when it is updated
    for i in range(lowest, n):
        has_dw = i == active or (sgd == "all") or (sgd == "partial" and i > active)
        flops += per_layer * has_dw + 2 * attention + lora
        flops += (per_layer if i > lowest else 0)  # dX through the block, except at the lowest needed one
    return flops


def _backward_time(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    synchronize(ids.device)
    start = time.perf_counter()
    loss.backward()
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    opt.zero_grad()
    return elapsed


def _peak(model, opt, ids) -> int:
    peak = trace_allocations(lambda: model(input_ids=ids, labels=ids).loss.backward(), ids.device).peak_bytes
    opt.zero_grad()
    return peak


def extra_flop_formulas() -> dict:
    """FlopCounterMode formulas for the ops its registry lacks: the in-place ``addmm_`` (the CPU backends' fused SGD
    update, the LoRA epilogues) and the CPU flash attention (torch's own formulas for the CUDA kernel)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return {
        aten.addmm_: lambda self, a, b, *args, out_shape=None, **kwargs: 2 * a[0] * a[1] * b[1],
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }


def _runs_triton_gemms(variant, device) -> bool:
    """Whether the engine's backward does GEMMs in a Triton kernel, which the FLOP counter cannot see: the on-the-fly
    update on CUDA, and the LoRA adapter gradients when ``BREAD_LORA_KERNEL=triton``."""
    if device.type != "cuda":
        return False
    return (VARIANTS[variant].get("sgd_mode", "disabled") != "disabled"
            or (variant in LORA_VARIANTS and os.environ.get("BREAD_LORA_KERNEL", "").lower() == "triton"))


def backward_flops(model, opt, ids) -> int:
    """Matmul FLOPs of one backward, counted by ``torch.utils.flop_counter`` (a Triton kernel's are invisible)."""
    from torch.utils.flop_counter import FlopCounterMode

    loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        loss.backward()
    opt.zero_grad()
    return counter.get_total_flops()


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


def run(positions=(1, 4, 6), variants=DEFAULT_VARIANTS, batch=4, seq=256, dtype=torch.float32, repeats=3,
        recompute=True, print_fn=print, lora_rank=8, device="cpu", **model_kwargs):
    plain = build_model(dtype=dtype, **model_kwargs).to(device)
    lora_base = with_lora(copy.deepcopy(plain), lora_rank) if set(variants) & set(LORA_VARIANTS) else None
    base = plain
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    throughput = gemm_flops_per_second(dtype, device=device)
    print_fn(f"BCD backward, Llama {len(base.model.layers)}x{base.config.hidden_size} (inter "
             f"{base.config.intermediate_size}, vocab {base.config.vocab_size}), batch {batch}x{seq}, {dtype}, "
             f"recompute={recompute}, on {device_name(device)}; GEMM {throughput / 1e9:.0f} GFLOP/s")
    print_fn(f"{'variant':<20}{'active':>7}{'engine ms':>11}{'ref ms':>9}{'time ratio':>12}{'FLOP ratio':>12}"
             f"{'engine MiB':>12}{'ref MiB':>9}{'mem ratio':>11}{'x ideal':>9}")
    summary = {}
    for variant in variants:
        ratios = []
        base = lora_base if variant in LORA_VARIANTS else plain
        for active in positions:
            engine = patch(copy.deepcopy(base), recompute=recompute).train()
            reference = copy.deepcopy(base).train()
            if recompute:
                if hasattr(reference, "activation_checkpointing_enable"):  # the name since transformers 5.x
                    reference.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            engine_side = (engine, _optimizer(engine, variant, active))
            reference_side = (reference, _optimizer(reference, variant, active))
            t_engine, t_ref, m_engine, m_ref = _measure_pair(engine_side, reference_side, ids, repeats)
            flop_ratio = (f"{backward_flops(*engine_side, ids) / backward_flops(*reference_side, ids):>12.3f}"
                          if not _runs_triton_gemms(variant, ids.device) else f"{'-':>12}")
            ideal = ideal_backward_flops(plain, variant, active, batch * seq, seq,
                                         lora_rank if variant in LORA_VARIANTS else 0) / throughput
            ratios.append((t_engine / t_ref, m_engine / m_ref, m_engine))
            print_fn(f"{variant:<20}{active:>7}{t_engine * 1e3:>11.0f}{t_ref * 1e3:>9.0f}{t_engine / t_ref:>12.3f}"
                     f"{flop_ratio}{m_engine / 2**20:>12.1f}{m_ref / 2**20:>9.1f}{m_engine / m_ref:>11.3f}"
                     f"{t_engine / ideal:>9.2f}")
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
