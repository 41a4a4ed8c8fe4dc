"""The main benchmark: a whole-model BCD training step (forward + backward), each variant through the engine against
the reference done two ways, in one run, after checking that all of them compute the same step.

Model: a Llama from a config sized for the device — on a CPU 8 layers, hidden 512, intermediate 1376, 8 heads, vocab
4096, batch 4×256, fp32; on a GPU Llama-3-8B's layer dimensions (hidden 4096, intermediate 14336, 32 heads, 8 KV
heads, vocab 128256) with 4 layers, batch 1×2048, bf16 — or ``--model`` (a local Hugging Face checkpoint directory
or config JSON; no downloads).  Variants: BAdam, BREAD-SGD-partial, BREAD-SGD and their sign forms on the model, and
BREAD, BREAD-partial on the model wrapped by peft (LoRA of rank ``lora_rank`` on every linear of the blocks).

Engine: ``bread_kernels.patch`` (its defaults: the fused head+loss on a causal LM) + ``BlockOptimizer``.  The
reference, two ways (both plain autograd with post-accumulate-grad hooks for the on-the-fly updates — the same
``BlockOptimizer`` on an unpatched model is exactly that path — and peft's autograd for the LoRA variants), each
with the model's own head and loss (Liger-Kernel's fused loss, which a GPU user might add, runs only on a GPU):

* **as its users run it**: Hugging Face gradient checkpointing, which in transformers 5 makes the input embeddings
  require grad, so the backward runs through every layer;
* **configured as well as it can be**: the same, with ``model.disable_input_require_grads()`` after enabling
  checkpointing (what LLaMA-Factory does for BAdam), so autograd stops at the lowest trainable block by itself.

The headline ratio is against the faster of the two.  ``recompute=False`` compares ``patch(recompute=False)``
against the reference without checkpointing (then both ways are the same).

Before timing, one step of the engine and of the reference from the same state must give the same parameters
(:mod:`.verify`); a difference stops the run.  Reported per variant and position: the time of forward + backward
(median and 20/80 % quantiles of the repeats, the three sides alternating; the optimizer step is not timed: it is the
same Adam on the same block everywhere), the ratios to both references, the ratio of the matmul FLOPs the engine's
and the best reference's forward + backward ran (``torch.utils.flop_counter``: the time ratio the engine would reach
at the reference's GEMM efficiency), peak extra memory over forward + backward, and ``ideal_fraction``: the ideal
GEMM time (the forward's matmul FLOPs and those the variant's backward cannot avoid, at this device's measured GEMM
rate) over the engine's time — the distance to the physical limit.  The forward is in the timing because the fused
head+loss does the head's backward work (dh, and an Adam-trained head's dW) chunk by chunk inside the forward: its
backward alone would flatter the engine.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..backends import get_backend, lora_kernel_requested
from ..functions.head_loss import chunk_budget_bytes
from ..optim import BlockOptimizer
from ..peft_lora import Conv1D, peft_remapped_targets
from ..patch import patch, patched_state, unpatch
from ..plan import Role
from .linear import device_name, synchronize
from .memory import trace_allocations
from .profile import profile_step
from .verify import VerificationError, compare_parameters

__all__ = ["VARIANTS", "LORA_VARIANTS", "ALL_VARIANTS", "Row", "run", "load_model", "build_model", "default_setup",
           "VerificationError"]

VARIANTS = {
    "BAdam": dict(sgd_mode="disabled"),
    "BREAD-SGD-partial": dict(sgd_mode="partial"),
    "BREAD-SGD": dict(sgd_mode="all"),
    "BREAD-SGD-partial-sign": dict(sgd_mode="partial", sgd_use_sign=True),
    "BREAD-SGD-sign": dict(sgd_mode="all", sgd_use_sign=True),
    # on a peft LoRA model (r = lora_rank on every linear of the blocks); the reference way is peft's autograd
    "BREAD": dict(lora_mode="all"),
    "BREAD-partial": dict(lora_mode="partial"),
}
LORA_VARIANTS = ("BREAD", "BREAD-partial")
ALL_VARIANTS = tuple(VARIANTS)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-5

#: the embedded defaults by device type: model shape, batch, sequence length, dtype
CPU_SETUP = dict(shape=dict(layers=8, hidden=512, intermediate=1376, heads=8, kv_heads=None, vocab=4096), batch=4,
                 seq=256, dtype=torch.float32, repeats=2)
GPU_SETUP = dict(shape=dict(layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256), batch=1,
                 seq=2048, dtype=torch.bfloat16, repeats=5)


def default_setup(device) -> dict:
    return copy.deepcopy(GPU_SETUP if torch.device(device).type == "cuda" else CPU_SETUP)


def build_model(layers=8, hidden=512, intermediate=1376, heads=8, kv_heads=None, vocab=4096, dtype=torch.float32,
                seed=0, device="cpu", positions=4096):
    """A randomly initialised Llama of this size, built on ``device`` (a GPU initialises a billion parameters in
    seconds where a CPU takes a minute); the same values for a seed on every device only on the CPU.  ``positions``:
    its ``max_position_embeddings`` (the run makes it at least its sequence length)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=positions, tie_word_embeddings=False, attn_implementation="sdpa",
                         use_cache=False)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def load_model(spec: str, dtype: torch.dtype, seed: int = 0):
    """A causal LM from ``spec``: a local checkpoint directory (weights loaded), a directory with only a
    ``config.json``, or a config JSON file (random init from the config).  Never downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such file or directory (a local Hugging Face checkpoint "
                                "directory or a config JSON; nothing is downloaded)")
    if path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)  # a directory's config.json, or the file
    config.use_cache = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def lora_targets(model) -> list[str]:
    """The names (last component) of the linears (``nn.Linear``, GPT-2's ``Conv1D``) that ``patch`` fuses in the
    model's block stack: Llama's ``q_proj`` ... ``down_proj``, GPT-2's ``c_attn``, ``c_proj``, ``c_fc``; not a
    router, whose weight the fused functions do not serve."""
    state = patched_state(model)
    blocks = {id(m) for block in state.blocks for m in block.modules()}
    # less the names peft turns into LoRA on the expert parameters (target_parameters, which patch refuses) on an
    # MoE model type, also where a dense or shared-expert MLP has a linear of that name (DeepSeek-V3's down_proj)
    experts = peft_remapped_targets(model)
    return sorted({name.rsplit(".", 1)[-1] for name, module in state.fused_modules
                   if id(module) in blocks and module.weight.dim() == 2} - experts)


def with_lora(model, rank: int, targets=LORA_TARGETS):
    """``model`` wrapped by peft with rank-``rank`` LoRA on the linears named ``targets`` (peft's defaults
    otherwise)."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))


def _optimizer(model, variant, active, lr=LR, **extra):
    """``extra``: e.g. ``block_prefix_list``, the engine optimizer's for a reference side (None: inferred)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), list(model.named_parameters()),
                              switch_mode="fixed", start_block=active, verbose=0, **VARIANTS[variant], **extra)


def _enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def reference_ways(base, recompute: bool) -> dict:
    """The reference model(s): ``{"reference": as users run it, "best": configured as well as it can be}``
    (one model for both when there is no checkpointing, where the two ways are the same)."""
    naive = copy.deepcopy(base).train()
    if not recompute:
        return {"reference": naive, "best": naive}
    _enable_checkpointing(naive)
    best = copy.deepcopy(base).train()
    _enable_checkpointing(best)
    best.disable_input_require_grads()
    return {"reference": naive, "best": best}


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


def ideal_step_flops(engine, variant, active, tokens, seq, lora_rank=0) -> float:
    """Matmul FLOPs of a step's forward (every block, the adapters, attention, the head) and of what the variant's
    backward cannot avoid (linears, LoRA adapters and attention; no recompute), from the patched ``engine``'s
    blocks and head."""
    state = patched_state(engine)
    blocks, head = state.blocks, state.head
    n = len(blocks)
    sgd = VARIANTS[variant].get("sgd_mode", "disabled")
    lora_mode = VARIANTS[variant].get("lora_mode") if variant in LORA_VARIANTS else None
    lowest = 0 if sgd == "all" or lora_mode == "all" else active
    dense = [(m.in_features, m.out_features) for name, m in blocks[0].named_modules()
             if type(m) is torch.nn.Linear and "lora_" not in name]  # a LoRA layer's base layer, not its adapters
    dense += [tuple(m.weight.shape) for m in blocks[0].modules() if Conv1D is not None and isinstance(m, Conv1D)]
    per_layer = sum(2 * tokens * k * nn for k, nn in dense)
    # experts: each token through top_k of them, each a [k, n] product per 3-D weight [E, n, k]
    top_k = getattr(getattr(engine, "config", None), "num_experts_per_tok", 1) or 1
    per_layer += sum(2 * tokens * top_k * p.shape[1] * p.shape[2] for name, p in blocks[0].named_parameters()
                     if p.dim() == 3 and "lora_" not in name)
    # LoRA adapters: v = gB, dB, dA and the s·vA term of dX: four rank-r GEMMs per linear
    lora = sum(2 * tokens * lora_rank * (2 * nn + 2 * k) for k, nn in dense) if lora_mode else 0
    hidden = engine.config.hidden_size if hasattr(engine, "config") else dense[0][0]
    attention = 4 * tokens * seq * hidden  # scores and weighted values, forward FLOPs
    head_weight = head.weight if head is not None else None
    head_flops = 2 * tokens * head_weight.shape[0] * head_weight.shape[1] if head_weight is not None else 0
    lora_forward = lora // 2  # the adapters' forward: two of the four rank-r GEMMs
    flops = head_flops + n * (per_layer // 2 + attention + lora_forward)  # the forward
    flops += head_flops * (2 if sgd != "disabled" else 1)  # head: dX always, dW when it is updated
    for i in range(lowest, n):
        has_dw = i == active or (sgd == "all") or (sgd == "partial" and i > active)
        flops += per_layer * has_dw + 2 * attention + lora
        flops += (per_layer if i > lowest else 0)  # dX through the block, except at the lowest needed one
    return flops


def step_time(model, opt, ids) -> float:
    """Seconds of one forward + backward; the gradients are cleared after (untimed)."""
    synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    opt.zero_grad()
    return elapsed


def step_peak_bytes(model, opt, ids) -> int:
    """Peak extra memory of forward + backward."""
    peak = trace_allocations(lambda: model(input_ids=ids, labels=ids).loss.backward(), ids.device).peak_bytes
    opt.zero_grad()
    return peak


def _counting_flops(enabled: bool):
    """``torch.utils.flop_counter``'s mode with the formulas it lacks, or nothing.  Never around a measured pass:
    the mode keeps tensors alive, so a peak taken under it is not the run's peak."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


def extra_flop_formulas() -> dict:
    """FlopCounterMode formulas for the ops its registry lacks or miscounts: the in-place ``addmm_`` and the native
    backend's gated ``addmm_if_finite_`` (the CPU backends' fused SGD update), the CPU flash attention,
    and grouped-query attention in every attention kernel (torch < 2.13 asserts on key/value with fewer heads than
    the query; each key/value head serves ``h_q / h_kv`` query heads, so the count is that of the heads broadcast)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def broadcast(query, *others):
        return [(*o[:-3], query[-3], *o[-2:]) for o in others]

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(q, *broadcast(q, k, v))

    def backward(g, q, k, v, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(g, q, *broadcast(q, k, v))

    addmm = lambda self, a, b, *args, out_shape=None, **kwargs: 2 * a[0] * a[1] * b[1]  # noqa: E731
    formulas = {aten.addmm_: addmm}
    if hasattr(aten, "_grouped_mm"):  # transformers' MoE experts (its FLOPs uncounted: 3x the engine's per-expert mm)
        formulas[aten._grouped_mm] = _grouped_mm_flops
    if hasattr(torch.ops.bread_kernels, "addmm_if_finite_"):  # its gated SGD update W += α·gᵀx (g [M, N], x [M, K])
        formulas[torch.ops.bread_kernels.addmm_if_finite_] = \
            lambda self, g, x, *args, out_shape=None, **kwargs: 2 * g[0] * g[1] * x[1]
    for kernel in ("flash_attention", "efficient_attention", "cudnn_attention", "flash_attention_for_cpu"):
        if hasattr(aten, f"_scaled_dot_product_{kernel}"):
            formulas[getattr(aten, f"_scaled_dot_product_{kernel}")] = forward
        if hasattr(aten, f"_scaled_dot_product_{kernel}_backward"):
            formulas[getattr(aten, f"_scaled_dot_product_{kernel}_backward")] = backward
    return formulas


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm(a, b, offs)``: [M, K] rows split over the groups of [G, K, N] (the experts' forward and dX),
    [K, M] × [M, N] split along M into [G, K, N] (their dW): 2·M·K·N; [G, M, K] × [G, K, N]: 2·G·M·K·N."""
    rows = a[0] * a[1] if len(a) == 2 else a[0] * a[1] * a[2]
    return 2 * rows * b[-1]


def _runs_triton_gemms(variant, device) -> bool:
    """Whether the engine's backward does GEMMs in a Triton kernel, which the FLOP counter cannot see: the on-the-fly
    update on CUDA, and the LoRA adapter gradients when ``BREAD_LORA_KERNEL=triton``."""
    if device.type != "cuda":
        return False
    return (VARIANTS[variant].get("sgd_mode", "disabled") != "disabled"
            or (variant in LORA_VARIANTS and lora_kernel_requested()))


@dataclass
class Row:
    """One variant at one active-block position; times in ms, memory in MiB.  ``reference_*``: the reference as
    its users run it; ``best_reference_*``: configured as well as it can be; ``best_time_ratio`` is against the
    faster of the two (the headline)."""

    variant: str
    position: int
    engine_ms: float
    engine_q20_ms: float
    engine_q80_ms: float
    reference_ms: float
    best_reference_ms: float
    time_ratio: float
    best_time_ratio: float
    flop_ratio: float | None
    engine_peak_mib: float
    reference_peak_mib: float
    best_reference_peak_mib: float
    memory_ratio: float
    best_memory_ratio: float
    ideal_fraction: float  # the ideal step's GEMM time (``ideal_gflop`` at the run's GEMM rate) over engine_ms
    ideal_gflop: float
    verified: bool
    #: with ``profile``: per side ("engine", "reference", "best_reference") the profiled backward's GEMM calls and
    #: self time outside the GEMMs (see :mod:`bread_kernels.bench.profile`)
    profile: dict | None = None


def verify_step(engine, reference, variant, active, ids, lr) -> None:
    """One step of the patched ``engine`` and of ``reference`` (an unpatched copy of the same state, configured as
    well as it can be: the way users run it differs only in which tensors require grad, not in the step), rounding
    to nearest: the same parameters, or :class:`VerificationError` naming the worst tensor.  The models are left
    one step on (the timing that follows does not depend on the values)."""
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    results, grads, roles, blocks = {}, {}, None, None
    for name, model in (("engine", engine), ("reference", reference)):
        opt = _optimizer(model, variant, active, lr=lr, rounding="nearest", block_prefix_list=blocks)
        blocks = blocks or opt.block_prefix_list  # the engine's, found structurally: the reference trains the same
        sign_grads = {}  # the reference's gradients of its SIGN-updated parameters, before its hooks consume them
        handles = [p.register_hook(_keeping(sign_grads, n)) for n, p in model.named_parameters()
                   if name == "reference" and opt.roles.get(n) is Role.SIGN and p.requires_grad]
        try:  # however the step ends (a refusal included), the model keeps neither these hooks nor the optimizer's
            with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
                torch.manual_seed(0)  # the same dropout masks on both sides (GPT-2's config has dropout 0.1)
                loss = model(input_ids=ids, labels=ids).loss
                if name == "reference" and not bool(loss.isfinite()):
                    raise VerificationError(f"{variant} at block {active} vs the reference: the reference's loss is "
                                            f"{float(loss)} (a batch with no token to score, or weights that are not "
                                            "finite), so there is nothing to verify the engine's step against")
                loss.backward()
            roles = roles or dict(opt.roles)
            grads[name] = {n: None if p.grad is None else p.grad.detach().clone()
                           for n, p in model.named_parameters() if roles.get(n) is Role.ACTIVE}
            grads[name].update(sign_grads)
            for handle in handles:
                handle.remove()
            opt.step()
            opt.zero_grad()
            results[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        finally:
            for handle in handles:
                handle.remove()
            opt.close()
    compare_parameters(results["engine"], results["reference"], before, roles, lr,
                       f"{variant} at block {active} vs the reference", gradients=(grads["engine"], grads["reference"]),
                       low_precision=reference.get_input_embeddings().weight.dtype != torch.float32)


def _keeping(store: dict, name: str):
    """A tensor hook that keeps a copy of the gradient as ``store[name]`` (a leaf's hook sees the whole gradient
    before it is accumulated, so before the optimizer's post-accumulate-grad hook updates with it and drops it)."""
    def keep(grad):
        store[name] = grad.detach().clone()

    return keep


def step_flops(model, opt, ids) -> int:
    """The matmul FLOPs of one forward + backward (``torch.utils.flop_counter`` with :func:`extra_flop_formulas`; a
    Triton kernel's are invisible to it), the gradients cleared after.  Taken after the timed passes: a settled
    step, with as many blocks kept as the timed ones (``keep_top="auto"`` keeps one block in the first step after
    new plans and grows by one a step)."""
    get_backend(ids.device)  # the engine's backend, loaded before the FLOP formulas look for its ops
    with _counting_flops(True) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    opt.zero_grad()
    return counter.get_total_flops()


def settle(model, opt, ids) -> None:
    """Untimed forward + backward passes until the step is the one every later step repeats: one for an unpatched
    model; for a patched one, until ``keep_top="auto"`` keeps as many blocks as in the pass before (it grows by a
    block per step after new plans)."""
    step_time(model, opt, ids)
    state = patched_state(model)
    if state is None:
        return
    for _ in range(len(state.blocks)):
        kept = state.stream.kept
        step_time(model, opt, ids)
        if state.stream.kept == kept:
            return


def timed_alternately(sides, ids, repeats):
    """Forward + backward times (:func:`step_time`) of each (model, optimizer) side, measured alternately (so drift
    of the machine hits every side alike) after each side has settled (:func:`settle`) and one more untimed pass
    has measured its peak memory.  Returns (times per side, peaks)."""
    times, peaks = [[] for _ in sides], []
    for model, opt in sides:
        settle(model, opt, ids)
    for i in range(repeats + 1):
        for k, (model, opt) in enumerate(sides):
            if i == 0:
                peaks.append(step_peak_bytes(model, opt, ids))
            else:
                times[k].append(step_time(model, opt, ids))
    return times, peaks


def _quantiles(values):
    q = statistics.quantiles(values, n=5, method="inclusive") if len(values) >= 2 else [values[0]] * 4
    return q[0], q[-1]


def run(model=None, variants=ALL_VARIANTS, positions=None, batch=None, seq=None, dtype=None, repeats=None,
        recompute=True, lora_rank=8, device=None, out_dir=".", progress=True, print_fn=print, profile=False,
        keep_top="auto", **shape):
    """Run the model suite and write ``bench_model_<device>_<dtype>.json`` and ``.png`` into ``out_dir``.

    Args:
        model: None (the embedded default for the device, with ``shape`` overriding its fields: ``layers``,
            ``hidden``, ``intermediate``, ``heads``, ``kv_heads``, ``vocab``), or a local checkpoint / config path.
        variants: names from :data:`VARIANTS`.
        positions: active-block indices; None: the second and the second-to-last block, and on a GPU the middle
            one too (on a 2-core CPU the default run then ends within 10 minutes).
        batch, seq, dtype: None takes the device's default.
        repeats: timed forward + backward passes per side (after one warm-up); None: 2 on a CPU, 5 on a GPU.
        recompute: the engine recomputes blocks and the reference uses gradient checkpointing.
        keep_top: the engine's ``patch(keep_top=...)``: ``"auto"`` (the default), or how many top blocks keep
            their activations (0 recomputes every block): the memory-for-time trade, measured against the same
            references.
        lora_rank: rank of the LoRA variants' adapters.
        device: ``"cpu"``, ``"cuda"``; None: CUDA when available.
        out_dir: where the JSON and PNG go.
        progress: a tqdm bar on stderr.
        print_fn: receives the table's lines.
        profile: after timing, profile one forward + backward per side: GEMM calls and the self time outside the GEMMs
            (what compares on a CPU whose bf16 GEMMs are emulated).

    Returns the result dict that is written as JSON.  A case whose step differs from the reference's is not timed;
    the others are, their table and files written (the JSON lists the failed cases under ``failures``), and then
    :class:`VerificationError` names every failed case; where every case failed, nothing is written.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup = default_setup(device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    _refuse_twice("variant", variants)
    if positions is not None:
        _refuse_twice("position", positions)
    bad_shape = sorted(set(shape) - set(setup["shape"]))
    if bad_shape:
        raise TypeError(f"unknown model size argument {bad_shape[0]!r}; use {', '.join(setup['shape'])}")
    dtype = dtype or setup["dtype"]
    repeats = repeats or setup["repeats"]
    batch, seq = batch or setup["batch"], seq or setup["seq"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and peft's deprecation notes are not the benchmark's output
        plain = (load_model(model, dtype) if model is not None else
                 build_model(**{**setup["shape"], **shape}, dtype=dtype, device=device,
                             positions=max(4096, seq))).to(device)
        _check_positions(plain, seq)
        # refuses a model without a block stack, or a keep_top it cannot take, with the reason, before any timing
        state = patched_state(patch(plain, keep_top=keep_top))
        n_blocks, hook_update_numel = len(state.blocks), state.hook_update_numel  # the latter: BREAD_HOOK_UPDATE_NUMEL
        targets = lora_targets(plain)
        unpatch(plain)  # the copies below are patched (or not) on their own
        if positions is None:  # the second and the second-to-last block (and the middle one on a GPU)
            ends = {min(1, n_blocks - 1), max(0, n_blocks - 2)}
            positions = tuple(sorted(ends | ({n_blocks // 2} if device.type == "cuda" else set())))
        positions = tuple(positions)
        bad = [p for p in positions if not 0 <= p < n_blocks]
        if bad:
            raise ValueError(f"position {bad[0]} is not a block index of this model's {n_blocks} blocks")
        lora_base = (with_lora(copy.deepcopy(plain), lora_rank, targets) if set(variants) & set(LORA_VARIANTS)
                     else None)
        vocab = plain.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        # the machine's GEMM rate: the best of a measurement before each case (one taken in a slow spell of a shared
        # machine would put every row's ideal fraction past 100%)
        throughput = gemm_flops_per_second(dtype, device=device)
        verify_lr = 1e-2 if dtype == torch.float32 else 1e-1
        result = {"device": device_name(device), "device_type": device.type,
                  "dtype": str(dtype).removeprefix("torch."), "model": model or {**setup["shape"], **shape},
                  "batch": batch, "seq": seq, "recompute": recompute, "keep_top": keep_top,
                  "hook_update_numel": hook_update_numel, "lora_rank": lora_rank, "repeats": repeats,
                  "gemm_gflops": throughput / 1e9, "torch": torch.__version__, **_engine_settings(device),
                  "rows": []}
        bar = _progress(len(variants) * len(positions), progress)
        failures = result["failures"] = []
        from .report import print_table, write_outputs, write_partial

        written = None  # the partial JSON's path once a case is in it
        try:
            for variant in variants:
                base = lora_base if variant in LORA_VARIANTS else plain
                for active in positions:
                    bar.set_description(f"{variant} @ block {active}")
                    _free_the_last_case(device)
                    throughput = max(throughput, gemm_flops_per_second(dtype, device=device))
                    result["gemm_gflops"] = throughput / 1e9
                    for row in result["rows"]:
                        row["ideal_fraction"] = row["ideal_gflop"] * 1e9 / throughput / (row["engine_ms"] / 1e3)
                    try:
                        row = _measure(base, variant, active, ids, recompute, repeats, throughput,
                                       lora_rank if variant in LORA_VARIANTS else 0, verify_lr, profile, keep_top)
                    except VerificationError as exc:  # nothing timed for this case; the others still are
                        failures.append({"variant": variant, "position": active, "error": str(exc)})
                    else:
                        result["rows"].append(asdict(row))
                    if result["rows"]:
                        written = write_partial({**result, "summary": summarize(result["rows"], failures)},
                                                out_dir)
                    bar.update()
        except KeyboardInterrupt as stop:
            stop.partial_json = written  # what the CLI's message may name: None before the first case
            raise
        bar.close()
    result["summary"] = summarize(result["rows"], failures)

    if result["rows"]:
        print_table(result, print_fn)
        result["files"] = write_outputs(result, out_dir)
    if failures:
        raise VerificationError("; ".join(f["error"] for f in failures) + (
            f" ({len(result['rows'])} other cases verified and timed: {result['files']['json']})"
            if result["rows"] else ""))
    return result


def _engine_settings(device) -> dict:
    """What the environment sets that changes the engine's numbers: its backend (``BREAD_BACKEND``, else the
    device's default) and the fused loss's chunk budget (``BREAD_LOSS_CHUNK_BYTES``, else 256 MiB).  A bad value
    raises the library's ValueError before anything is measured."""
    return {"backend": get_backend(torch.device(device)).name, "loss_chunk_bytes": chunk_budget_bytes()}


def _refuse_twice(what: str, values) -> None:
    """A variant or position given twice was measured twice and weighed twice in the summary's mean."""
    values = list(values)
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ValueError(f"{what} {twice[0]!r} is given twice; give each once (each is measured once, and the "
                         "summary is the mean over them)")


def _check_positions(model, seq: int) -> None:
    """A sequence longer than the model's positions (``max_position_embeddings``, GPT-2's ``n_positions``) is
    refused, naming the limit: a learned position table (GPT-2) raised a bare IndexError in the first forward, and a
    rotary model would be timed on a context its configuration does not cover."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq > limit:
        raise ValueError(f"--seq {seq} is longer than the model's {limit} positions (its config's "
                         f"max_position_embeddings / n_positions); give --seq {limit} or less")


def _free_the_last_case(device: torch.device) -> None:
    """Collect the last case's models and optimizers now (their hooks and plans refer to each other, so a cycle
    collection frees them, which Python would run at a time of its own), so that each case is measured, and fits,
    without its predecessors' weights and optimizer state (a GPU model's are several GiB a case)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(base, variant, active, ids, recompute, repeats, throughput, lora_rank, verify_lr, profile=False,
             keep_top="auto") -> Row:
    engine = patch(copy.deepcopy(base), recompute=recompute, keep_top=keep_top).train()
    refs = reference_ways(base, recompute)
    count = not _runs_triton_gemms(variant, ids.device)
    verify_step(engine, refs["best"], variant, active, ids, verify_lr)
    if refs["reference"] is not refs["best"]:
        refs["reference"].load_state_dict(refs["best"].state_dict())  # the same state on every side
    engine_opt = _optimizer(engine, variant, active)
    # the engine's blocks (patch finds the stack structurally; an unpatched BERT's encoder.layer.N is not inferred)
    blocks = engine_opt.block_prefix_list
    sides = [(engine, engine_opt), (refs["reference"], _optimizer(refs["reference"], variant, active,
                                                                  block_prefix_list=blocks))]
    if refs["best"] is not refs["reference"]:
        sides.append((refs["best"], _optimizer(refs["best"], variant, active, block_prefix_list=blocks)))
    times, peaks = timed_alternately(sides, ids, repeats)
    profiles = None
    if profile:
        names = ("engine", "reference", "best_reference")
        profiles = {name: asdict(profile_step(m, o, ids)) for name, (m, o) in zip(names, sides)}
        if len(sides) == 2:
            profiles["best_reference"] = profiles["reference"]
    t = [statistics.median(x) for x in times]
    if len(sides) == 2:
        t.append(t[1])
        peaks.append(peaks[1])
    # against the best-configured reference, each on a settled step like the timed ones
    flop_ratio = step_flops(*sides[0], ids) / step_flops(*sides[-1], ids) if count else None
    tokens, seq = ids.numel(), ids.shape[1]
    ideal_flops = ideal_step_flops(engine, variant, active, tokens, seq, lora_rank)
    ideal = ideal_flops / throughput
    q20, q80 = _quantiles(times[0])
    mib = 2.0 ** 20
    return Row(variant=variant, position=active, engine_ms=t[0] * 1e3, engine_q20_ms=q20 * 1e3, engine_q80_ms=q80 * 1e3,
               reference_ms=t[1] * 1e3, best_reference_ms=t[2] * 1e3, time_ratio=t[0] / t[1],
               best_time_ratio=t[0] / min(t[1], t[2]), flop_ratio=flop_ratio, engine_peak_mib=peaks[0] / mib,
               reference_peak_mib=peaks[1] / mib, best_reference_peak_mib=peaks[2] / mib,
               memory_ratio=peaks[0] / peaks[1], best_memory_ratio=peaks[0] / (peaks[1] if t[1] <= t[2] else peaks[2]),
               ideal_fraction=ideal / t[0], ideal_gflop=ideal_flops / 1e9, verified=True, profile=profiles)


def summarize(rows: list[dict], failures: list[dict] = ()) -> dict:
    """Per variant, the mean over positions of the ratios and the times; ``verified`` only where no case of the
    variant failed its verification (``failures``: those cases, which have no row)."""
    failed = {f["variant"] for f in failures}
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {key: statistics.mean(r[key] for r in mine) for key in (
            "engine_ms", "reference_ms", "best_reference_ms", "time_ratio", "best_time_ratio", "engine_peak_mib",
            "reference_peak_mib", "best_reference_peak_mib", "memory_ratio", "best_memory_ratio", "ideal_fraction")}
        summary[variant]["verified"] = all(r["verified"] for r in mine) and variant not in failed
    return summary


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, leave=False, unit="case")
