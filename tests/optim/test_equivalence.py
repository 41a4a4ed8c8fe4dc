"""The engine (``bread_kernels.patch`` + ``BlockOptimizer``) against the plain-autograd reference of BCD.

Each test deep-copies one tiny seeded model twice, trains copy A with :class:`~tests.optim.reference_bcd.ReferenceBCD`
and copy B with the engine on the same batches, and after every step compares every parameter (fp32: rtol 1e-5,
atol 1e-6), the losses, and which parameters hold a ``.grad`` after the backward.  At the end the engine's model
is unpatched: its ``state_dict`` must have the original keys and the trained values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

import bread_kernels

from tests import model_zoo as models
from .reference_bcd import ADAM, FROZEN, SGD, SIGN, ReferenceBCD, block_prefixes

RTOL, ATOL = 1e-5, 1e-6
LR = 1e-2
SCALING = 0.5
STEPS = 7  # with switch_block_every=2: switches after steps 2, 4 and 6
# Adam's eps.  An element whose gradient is ~0 has an ill-conditioned Adam update: d(update)/dg = lr·eps/(|g|+eps)²
# at a block's first step, so a rounding difference δ in a near-zero gradient moves the update by up to
# lr·δ/(4·eps).  fp32 gradients computed in a different order (recompute, chunked dW) differ by δ ~ 1e-11 here,
# which with torch's default eps=1e-8 gives ~2.5e-6 > ATOL on a handful of elements though nothing is wrong.
# eps=1e-5 bounds that effect by ~1e-8 while gradients of typical size (1e-4 .. 1e-1) are still normalised.
ADAM_EPS = 1e-8
SIGN_FLIPS = 1e-3  # see mismatch()
ADAM_FP32_OUTLIERS = 1e-3  # see mismatch()

# sgd variants: (sgd_mode, sgd_use_sign)
BADAM = ("disabled", False)
SGD_ALL = ("all", False)
SGD_PARTIAL = ("partial", False)
SIGN_ALL = ("all", True)
SIGN_PARTIAL = ("partial", True)
VARIANTS = [BADAM, SGD_ALL, SGD_PARTIAL, SIGN_ALL, SIGN_PARTIAL]
VARIANT_IDS = ["badam", "sgd-all", "sgd-partial", "sign-all", "sign-partial"]

SWITCHES = {  # name: (switch_mode, start_block, steps)
    "descending": ("descending", None, STEPS),
    "ascending": ("ascending", None, STEPS),
    "random": ("random", None, 11),  # 6 blocks drawn from 4: the order is redrawn once
    "fixed1": ("fixed", 1, STEPS),
}


@dataclass
class Case:
    family: str = "llama"
    steps: int = STEPS
    lr: float = LR
    weight_decay: float = 0.0
    optimizer_cls: type = torch.optim.AdamW
    optimizer_extra: dict = field(default_factory=lambda: dict(eps=ADAM_EPS))  # more base-optimizer settings
    lr_lambda: object = None  # LambdaLR multiplier stepping the BlockOptimizer, or None
    include_embedding: bool = False
    include_lm_head: bool = False
    n_layer_per_block: int = 1
    seed: int = 0  # seeds the global torch RNG before each optimizer is built (random switch order)
    bcd: dict = field(default_factory=dict)  # the BlockOptimizer arguments shared with the reference
    dtype: torch.dtype = torch.float32
    engine: dict = field(default_factory=dict)  # BlockOptimizer-only keyword arguments (rounding=...)
    rtol: float = RTOL
    atol: float = ATOL
    adam_outliers: float = 0.0  # low precision only: see mismatch()
    lora: dict | None = None  # peft LoraConfig arguments: train a peft LoRA model (BREAD) instead of the plain one
    # bread_kernels.patch keyword arguments: the model's own head and loss unless a case asks for the fused loss (the
    # cases compare the blocks' engine with the reference; the fused loss's other summation order has its own cases)
    patch: dict = field(default_factory=lambda: dict(fused_loss=False))
    loss_fn: object = models.loss_of  # (model, ids) -> loss, for the reference and the engine alike
    short_steps: tuple = ()  # steps whose batch is model_zoo.SHORT (MoE: some expert of every layer gets no token)
    build: dict = field(default_factory=dict)  # more arguments of the zoo builder (experts_implementation=...)


def mismatch(case: "Case", ref, eng, before, role) -> torch.Tensor:
    """The elements of ``eng`` outside the case's tolerance around ``ref`` (a bool mask).

    fp32: ``isclose(rtol, atol)``; an Adam element whose gradient is near zero (``|g|`` about Adam's ``eps``, ~1e-3
    of the typical one) turns its normalised step by ``lr·eps/(|g|+eps)²`` times the rounding of g, which the engine
    sums in another order (measured on a CPU with AVX-512 GEMM kernels: one element of 1,024-10,240 per parameter
    1.4e-6 off, its g 1.3e-5 against a typical 3e-2), so up to ``ADAM_FP32_OUTLIERS`` of an Adam parameter's elements
    may differ by up to ``0.01·lr`` per step.  Low precision: the error of one rounding is relative to the *operands*
    of the update (``before`` and the result), not to a result that cancelled to near zero, so the bound is ``rtol``
    times the larger of them; and an Adam element whose gradient is ~0 may see the bf16 rounding of g turn its
    normalised step, so up to ``adam_outliers`` of an Adam parameter's elements may differ by up to ``0.25·lr`` per
    step.

    SIGN: an element whose summed gradient is ~0 takes its sign from rounding (the engine sums dW in another
    order: chunks, recomputed activations, the fused loss), so up to ``SIGN_FLIPS`` of a SIGN parameter's elements
    may differ by one flip, ``2·lr·s``, or half of one (``sign(0) = 0``)."""
    ref, eng, before = ref.double(), eng.double(), before.double()
    diff = (ref - eng).abs()
    if case.dtype == torch.float32:
        bad = diff > case.atol + case.rtol * ref.abs()
        if role == ADAM and bad.float().mean() <= ADAM_FP32_OUTLIERS:
            bad &= diff > 0.01 * case.lr
        if role == SIGN and bad.float().mean() <= SIGN_FLIPS:
            flip = 2 * case.lr * case.bcd.get("sgd_lr_scaling", 1.0)
            bad &= diff > flip + case.atol + case.rtol * ref.abs()
        return bad
    bad = diff > case.atol + case.rtol * torch.maximum(ref.abs(), before.abs())
    if role == ADAM and bad.float().mean() <= case.adam_outliers:
        bad &= diff > 0.25 * case.lr * case.steps
    return bad


def _describe(name, step, role, ref, eng, before, bad) -> str:
    ref, eng, before = ref.double(), eng.double(), before.double()
    diff = (ref - eng).abs()
    idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.any() else ()
    where = (f"; first at {idx}: reference {ref[idx].item():.8g}, engine {eng[idx].item():.8g}, "
             f"before the step {before[idx].item():.8g}") if idx else ""
    return (f"parameter {name!r} differs after step {step} (its role in that step: {role}): max |diff| "
            f"{diff.max().item():.3g}, {int(bad.sum())}/{bad.numel()} elements outside the tolerance; "
            f"reference moved it by up to {(ref - before).abs().max().item():.3g}, engine by up to "
            f"{(eng - before).abs().max().item():.3g}{where}")


def run_case(case: Case) -> None:
    original = {**models.BUILDERS, **models.MOE_BUILDERS, **models.FAMILY_BUILDERS}[case.family](dtype=case.dtype,
                                                                                               **case.build)
    layer_prefixes, embedding_prefix = models.layout(original)
    if case.lora is not None:
        original = models.with_lora(original, **case.lora)
        layer_prefixes = [models.PEFT_PREFIX + p for p in layer_prefixes]
        embedding_prefix = models.PEFT_PREFIX + embedding_prefix
    model_a, model_b = copy.deepcopy(original), copy.deepcopy(original)
    data = models.batches_with_short(case.steps, case.short_steps)
    opt_kwargs = dict(lr=case.lr, weight_decay=case.weight_decay, **case.optimizer_extra)

    # A: the reference
    names = [n for n, _ in original.named_parameters()]
    blocks = block_prefixes(names, layer_prefixes, embedding_prefix, case.include_embedding,
                            case.include_lm_head, case.n_layer_per_block)
    torch.manual_seed(case.seed)
    ref = ReferenceBCD(model_a, blocks, loss_fn=case.loss_fn, optimizer_cls=case.optimizer_cls,
                       optimizer_kwargs=opt_kwargs, lr_lambda=case.lr_lambda, **case.bcd)
    ref_rng = torch.get_rng_state()  # the reference draws from its own RNG stream from here on
    params_a = dict(model_a.named_parameters())

    # B: the engine, used the way the README shows
    params_b = dict(model_b.named_parameters())  # original names -> the Parameter objects being trained
    model_b = bread_kernels.patch(model_b, **case.patch)
    base = case.optimizer_cls(model_b.parameters(), **opt_kwargs)
    torch.manual_seed(case.seed)
    opt = bread_kernels.BlockOptimizer(base, list(model_b.named_parameters()), include_embedding=case.include_embedding,
                                       include_lm_head=case.include_lm_head, n_layer_per_block=case.n_layer_per_block,
                                       verbose=0, **case.bcd, **case.engine)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, case.lr_lambda) if case.lr_lambda is not None else None

    engine_rng = torch.get_rng_state()  # and the engine from its own, seeded alike

    for step, ids in enumerate(data):
        # lock-step: the reference takes each step from the engine's current weights (see the module docstring)
        with torch.no_grad():
            for name, p in params_a.items():
                p.copy_(params_b[name])
        before = {n: p.detach().clone() for n, p in params_a.items()}
        torch.set_rng_state(ref_rng)
        loss_a = ref.step(ids)  # random switch order: a redraw consumes the global RNG
        ref_rng = torch.get_rng_state()
        torch.set_rng_state(engine_rng)
        roles = ref.roles  # what the reference did to each parameter in this step

        loss_b = case.loss_fn(model_b, ids)
        loss_b.backward()
        # .grad bookkeeping after the backward: only the base optimizer's parameters may hold one
        for name, p in params_b.items():
            if roles[name] in (SGD, SIGN, FROZEN):
                assert p.grad is None, (f"step {step}: {name!r} (role {roles[name]}) holds a .grad after the "
                                        "backward; on-the-fly-updated and frozen parameters must not keep one")
            elif name in ref.reached:  # a parameter used only under no_grad (a router's statistics) gets none
                assert p.grad is not None, f"step {step}: active parameter {name!r} has no .grad after the backward"
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        engine_rng = torch.get_rng_state()

        assert torch.isclose(torch.tensor(loss_b.item()), torch.tensor(loss_a), rtol=case.rtol, atol=case.atol), (
            f"step {step}: loss differs (reference {loss_a:.8g}, engine {loss_b.item():.8g}); the parameters "
            "matched after the previous step, so the forward itself differs")
        failures = []
        for name, p in params_b.items():
            bad = mismatch(case, params_a[name].detach(), p.detach(), before[name], roles[name])
            if bad.any():
                failures.append(_describe(name, step, roles[name], params_a[name], p, before[name], bad))
        assert not failures, (f"{len(failures)} parameter(s) differ after step {step} (active block "
                              f"{ref.block_history[-1]} of {ref.n_blocks}: {blocks[ref.block_history[-1]]}):\n  "
                              + "\n  ".join(failures))

    # unpatch: the original module tree and keys, the trained values untouched
    trained = {k: v.clone() for k, v in model_b.state_dict().items()}
    model_b = bread_kernels.unpatch(model_b)
    keys_o, keys_b = list(original.state_dict()), list(model_b.state_dict())
    assert keys_b == keys_o, f"state_dict keys changed by patch/unpatch: {set(keys_b) ^ set(keys_o)} (or their order)"
    for key, value in model_b.state_dict().items():
        assert torch.equal(value, trained[key]), f"unpatch changed state_dict[{key!r}]"
    for n, p in model_b.named_parameters():
        assert n in params_b and p is params_b[n], f"after unpatch, named_parameters() has a different {n!r}"


# ----------------------------------------------------------------------------------------------------------------
# Llama: every switch mode × every variant


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_llama_switch_modes_and_variants(switch, variant):
    mode, start, steps = SWITCHES[switch]
    sgd_mode, sign = variant
    run_case(Case("llama", steps=steps, bcd=dict(switch_block_every=2, switch_mode=mode, start_block=start,
                                                 sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


# GPT-2 (Conv1D weights, tied wte/lm_head) and BERT (encoder, tied decoder, MLM head, padding row)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gpt2_bert_descending(family, variant):
    sgd_mode, sign = variant
    run_case(Case(family, bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode=sgd_mode,
                                   sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gpt2_bert_ascending(family, variant):
    sgd_mode, sign = variant
    run_case(Case(family, bcd=dict(switch_block_every=2, switch_mode="ascending", sgd_mode=sgd_mode,
                                   sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


# ----------------------------------------------------------------------------------------------------------------
# hyper-parameters and options (Llama)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_falcon_linear_subclass_fused(variant):
    """Falcon: every linear a FalconLinear (an nn.Linear subclass patch fuses), the MLP's output added into in place
    (``mlp_output += attention_output``), parallel attention and MLP, LayerNorms with biases."""
    sgd_mode, sign = variant
    run_case(Case("falcon", steps=5, bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode=sgd_mode,
                                              sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
def test_mamba_linears_whose_weight_the_mixer_computes_with_take_their_updates(variant):
    """Mamba's mixer computes ``dt_proj.weight @ time_step`` itself (and reads ``dt_proj.bias`` in its scan): the
    linear's own forward never runs, so a fused dt_proj's on-the-fly update never ran either — its weight was left
    requiring no grad and never moved.  Every linear, however small, is fused here (``hook_update_numel=0``; a
    real Mamba's dt_proj, 4096 × 128 in the 1.4B model, is fused by default)."""
    sgd_mode, sign = variant
    run_case(Case("mamba", steps=4, patch=dict(fused_loss=False, hook_update_numel=0),
                  bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
def test_hybrid_cache_with_layers_that_hold_no_keys(variant):
    """Nemotron-H makes its own cache in a training forward (``use_cache``), whose MoE and MLP layers are
    transformers' ``DummyLayer`` (no keys and values, no ``get_seq_length``): reading how many tokens such a layer
    holds, to refuse a prefix cache, raised ``AttributeError: 'DummyLayer' object has no attribute
    'get_seq_length'`` at the first forward.  It holds none; the model trains as the reference."""
    sgd_mode, sign = variant
    run_case(Case("nemotron_h", steps=3, patch=dict(fused_loss=False, hook_update_numel=0),
                  bcd=dict(switch_block_every=1, switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("low_cycles_with_grad", [1, 2], ids=["first-low-cycle-no-grad", "every-cycle-with-grad"])
@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
def test_a_stack_run_several_times_into_one_cache_trains_with_its_default_cache(variant, low_cycles_with_grad):
    """HRM runs each of its two layer stacks several times in one forward, each pass writing its own layers of the
    cache the model makes for itself (``use_cache`` is on by default).  A later pass's block found its layer index
    written by an earlier pass of this same forward (its first low-level cycle, under ``torch.no_grad()``), took it
    for a prefix the user passed and refused the first training forward ("a KV cache holding 13 tokens reached
    block 0 ... Patch with recompute=False"); with every cycle under grad, the first block of a later pass found the
    holes the recomputed blocks of an earlier pass left and refused it as a cache filled by an earlier forward.  A
    cache counts by what it held when the forward started: the model trains as the reference (its two stacks are
    four blocks of BlockOptimizer's, the streamed L stack's and the H stack's, trained through hooks)."""
    sgd_mode, sign = variant
    run_case(Case("hrm_text", steps=4, build=dict(low_cycles_with_grad=low_cycles_with_grad),
                  patch=dict(fused_loss=False, hook_update_numel=0),
                  bcd=dict(switch_block_every=1, switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
def test_weight_decay_groups(variant):
    """weight_decay=0.01 applies to weights only, not to biases or norm weights; non-default betas/eps."""
    sgd_mode, sign = variant
    run_case(Case("llama", weight_decay=0.01, optimizer_extra=dict(betas=(0.8, 0.95), eps=1e-4),
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


def test_weight_decay_groups_gpt2_plain_adam():
    """Adam (L2 decay in the gradient) with biases and LayerNorm weights in the no-decay group."""
    run_case(Case("gpt2", weight_decay=0.05, optimizer_cls=torch.optim.Adam,
                  bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("warmup", [2, 3])
@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
def test_warmup_after_switch_with_lambda_scheduler(variant, warmup):
    """LambdaLR(1/(1+s)) steps the BlockOptimizer; the base optimizer's lr is warmed up after each switch once
    global_step >= W, while the on-the-fly updates use the scheduled lr without the warm-up factor."""
    sgd_mode, sign = variant
    run_case(Case("llama", lr_lambda=lambda s: 1 / (1 + s),
                  bcd=dict(switch_block_every=2, lr_warmup_step_afterswitch=warmup, sgd_mode=sgd_mode,
                           sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_PARTIAL, SIGN_ALL], ids=["badam", "sgd-partial", "sign-all"])
def test_include_embedding(variant):
    """The embedding block is block 0 (trained first in ascending order; with partial, everything above it gets
    the correction)."""
    sgd_mode, sign = variant
    run_case(Case("llama", include_embedding=True, bcd=dict(switch_block_every=2, switch_mode="ascending",
                                                            sgd_mode=sgd_mode, sgd_use_sign=sign,
                                                            sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
def test_include_lm_head(variant):
    """The last block holds every parameter in no other block: here the embedding, the final norm and lm_head."""
    sgd_mode, sign = variant
    run_case(Case("llama", include_lm_head=True, bcd=dict(switch_block_every=2, switch_mode="descending",
                                                          sgd_mode=sgd_mode, sgd_use_sign=sign,
                                                          sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_include_embedding_and_lm_head(family):
    """Both: embedding block first, (final norm, head) block last; GPT-2's head block is wpe + ln_f (wte, tied to
    lm_head, is the embedding block)."""
    run_case(Case(family, include_embedding=True, include_lm_head=True,
                  bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode="partial",
                           sgd_lr_scaling=SCALING)))


def test_active_modules():
    """An always-active prefix is trained by the base optimizer in every block (its state reset at switches)."""
    run_case(Case("llama", bcd=dict(switch_block_every=2, active_modules=["model.norm."], sgd_mode="all",
                                    sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_PARTIAL], ids=["badam", "sgd-partial"])
def test_two_layers_per_block(variant):
    """n_layer_per_block=2 on 4 layers: blocks (0, 1) and (2, 3)."""
    sgd_mode, sign = variant
    run_case(Case("llama", n_layer_per_block=2, bcd=dict(switch_block_every=2, switch_mode="ascending",
                                                         sgd_mode=sgd_mode, sgd_use_sign=sign,
                                                         sgd_lr_scaling=SCALING)))


def test_switch_every_step_descending_sgd_all():
    """switch_block_every=1: the optimizer state is empty at every step and the cut moves every step."""
    run_case(Case("llama", steps=6, bcd=dict(switch_block_every=1, sgd_mode="all", sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
def test_every_backend(backend, variant):
    """The same equivalence through each forced backend (BREAD_BACKEND=triton|native|torch).  Triton's RMSNorm and
    SwiGLU kernels sum a row's squares in another order than torch's mean (and, under the interpreter, take numpy's
    exp): their gradients differ by fp32 rounding, which Adam's first step amplifies by up to lr/eps, so that backend
    runs with the fused loss's Adam eps (FUSED_EPS, below); that eps makes the case less sensitive to the backend's
    other kernels too (the update, the finiteness flag, the rotary embedding), whose own tests compare them with
    torch's ops bit for bit (tests/kernels/).  3 steps: a switch after the second (the interpreter is slow)."""
    sgd_mode, sign = variant
    run_case(Case("llama", steps=3, optimizer_extra=dict(FUSED_EPS if backend == "triton" else dict(eps=ADAM_EPS)),
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


# ----------------------------------------------------------------------------------------------------------------
# the fused head+loss (patch(model, fused_loss=True)): the head's Role inside the loss, the logits in chunks
# Adam eps 1e-3, as for the LoRA cases (see ADAM_EPS): the fused loss sums the softmax and dh = g·W in another
# order than autograd, so every gradient below the head differs by fp32 rounding relative to its largest terms
# (~5e-7 of the largest element, i.e. δ ~ 1e-9 here instead of ~1e-11), and Adam's first step multiplies δ by up to
# lr/eps: 1e3 at eps=1e-5 (2e-6 > ATOL on an element whose gradient is ~1e-6), 10 at eps=1e-3.
FUSED_EPS = dict(eps=1e-3)


FUSED_CASES = [("llama", BADAM), ("llama", SGD_ALL), ("llama", SIGN_ALL), ("gpt2", SGD_ALL), ("gemma2", SIGN_ALL)]


# GPT-2 with sign is left out: its attention's key bias has a gradient that is exactly zero in exact arithmetic
# (softmax ignores a shift shared by all keys), so its SIGN update is the sign of rounding noise, which the fused
# loss's other summation order flips.
@pytest.mark.parametrize("family, variant", FUSED_CASES, ids=[f"{f}-{VARIANT_IDS[VARIANTS.index(v)]}"
                                                              for f, v in FUSED_CASES])
def test_fused_loss(family, variant, monkeypatch):
    """The loss from the fused head+loss, with ignored labels and num_items_in_batch, in blocks of 5 tokens and
    tiles of 3 vocabulary rows (97), 3 steps (a switch after 2): the head frozen (BAdam), updated on the fly inside
    the loss's backward (BREAD-SGD; GPT-2's tied head through the shared weight's hook, as in the reference),
    soft-capped (Gemma2)."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    sgd_mode, sign = variant
    run_case(Case(family, steps=3, patch=dict(fused_loss=True), loss_fn=models.masked_loss_of,
                  optimizer_extra=FUSED_EPS,
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


def test_fused_loss_vision_language_model(monkeypatch):
    """Qwen2-VL (a vision tower beside the streamed language model): the fused loss on the images' batch, ignored
    labels and num_items_in_batch, BREAD-SGD ``"all"`` — the head, the vision tower and the inactive layers updated
    on the fly — as the unpatched model trained by the reference."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    run_case(Case("qwen2_vl", steps=3, patch=dict(fused_loss=True), loss_fn=models.qwen2_vl_masked_loss_of,
                  optimizer_extra=FUSED_EPS,
                  bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))


def test_fused_loss_logit_scaled_tied_head(monkeypatch):
    """AyaVision (its logits scaled by the text config's logit_scale, its head tied to the input embedding, a
    vision tower beside the language model): the fused loss of the scaled hidden states under BREAD-SGD ``"all"``
    — the tied weight's update from its hook, as in the reference — as the unpatched model trained by the
    reference."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    run_case(Case("aya_vision", steps=3, patch=dict(fused_loss=True), loss_fn=models.llava_style_masked_loss_of,
                  optimizer_extra=FUSED_EPS,
                  bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_PARTIAL], ids=["badam", "sgd-partial"])
def test_fused_loss_active_head(variant, monkeypatch):
    """include_lm_head: the head block is trained by Adam with the dW the fused loss returns to autograd."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    sgd_mode, sign = variant
    run_case(Case("llama", steps=3, include_lm_head=True, patch=dict(fused_loss=True), loss_fn=models.masked_loss_of,
                  optimizer_extra=FUSED_EPS, bcd=dict(switch_block_every=2, switch_mode="descending",
                                                      sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


def test_fused_loss_bread_lora(monkeypatch):
    """BREAD (peft LoRA, lora_mode="all") with BREAD-SGD on the inactive base weights and the head."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(5 * models.VOCAB * 4))
    run_case(Case("llama", steps=3, lora=dict(r=4), patch=dict(fused_loss=True), loss_fn=models.masked_loss_of,
                  optimizer_extra=FUSED_EPS, bcd=dict(switch_block_every=2, lora_mode="all", sgd_mode="all",
                                                      sgd_lr_scaling=SCALING)))


# ----------------------------------------------------------------------------------------------------------------
# bf16: the reference's own rounding (nearest), fp32 masters for the active block


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL, SIGN_PARTIAL], ids=["badam", "sgd-all", "sign-partial"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_nearest_rounding(family, variant):
    """bf16 weights, ``rounding="nearest"``: the reference (bf16 autograd, fp32 master copies for the active block,
    on-the-fly ``p -= step·g`` in fp32 rounded once to bf16) and the engine (dW accumulated in fp32, not rounded to
    bf16 before the update) differ by the bf16 rounding of g and the summation order.  Stated tolerance: one bf16
    ulp of the update's operands (rtol 2⁻⁷ of max(|w before|, |w after|), atol 1e-6) per element, checked after
    every step (lock-step, so SGD/sign start each step equal; the Adam block's fp32 masters run free across its
    steps), with at most 1% of an Adam parameter's elements allowed up to 0.25·lr per step (gradients ~0 whose
    normalised Adam step the bf16 rounding of g can turn).  lr 1e-2 makes every sign step ~40 ulps, Adam steps
    ~80 ulps, so a missing or doubled update fails."""
    sgd_mode, sign = variant
    run_case(Case(family, dtype=torch.bfloat16, steps=5, lr=1e-2, engine=dict(rounding="nearest"),
                  rtol=2 ** -7, atol=1e-6, adam_outliers=0.01,
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


# ----------------------------------------------------------------------------------------------------------------
# Mixture of experts (Qwen3-MoE, Mixtral, Qwen2-MoE with a shared expert, Ernie 4.5 MoE): the 3-D expert weights
# through the fused experts function.  Steps 1 and 4 have a SHORT batch (6 token-expert slots for 8 experts), so in
# every layer some expert receives no token: under SGD/SIGN it must stay untouched, under Adam it gets autograd's zero
# gradient.


MOE_SHORT_STEPS = (1, 4)
#: the reference runs transformers' eager experts (the definition, which the fused experts compute op for op); its
#: grouped_mm / batched_mm implementations are checked separately below
EAGER = dict(experts_implementation="eager")


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_descending(family, variant):
    sgd_mode, sign = variant
    run_case(Case(family, short_steps=MOE_SHORT_STEPS, build=EAGER,
                  bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL, SIGN_PARTIAL], ids=["badam", "sgd-all", "sign-partial"])
def test_moe_shared_expert_qwen2(variant):
    """Qwen2-MoE: routed experts fused, the shared expert and its gate through the fused linear.  The sigmoid gate
    of the shared expert makes some of its gradients ~1e-8 ~ Adam's default eps, where rounding-level differences
    (the engine recomputes and fuses, the reference does not) turn into ~1e-6 of the normalised step: eps=1e-5 (see
    ADAM_EPS)."""
    sgd_mode, sign = variant
    run_case(Case("qwen2_moe", short_steps=MOE_SHORT_STEPS, build=EAGER, optimizer_extra=dict(eps=1e-5),
                  bcd=dict(switch_block_every=2, switch_mode="ascending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL, SIGN_PARTIAL], ids=["badam", "sgd-all", "sign-partial"])
def test_moe_ernie4_5_dense_layer_and_router_statistics(variant):
    """Ernie 4.5 MoE: a dense first layer under the MoE ones, a shared expert, and a router parameter no gradient
    reaches (``e_score_correction_bias``, read by the top-k's indices alone), which as a block's parameter the
    reference hands its base optimizer without a gradient, and which no on-the-fly update may move."""
    sgd_mode, sign = variant
    run_case(Case("ernie4_5_moe", short_steps=MOE_SHORT_STEPS, build=EAGER, optimizer_extra=dict(eps=1e-5),
                  bcd=dict(switch_block_every=2, switch_mode="descending", sgd_mode=sgd_mode, sgd_use_sign=sign,
                           sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [BADAM, SGD_ALL], ids=["badam", "sgd-all"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_moe_other_experts_implementations(implementation, variant):
    """A reference running transformers' grouped_mm or batched_mm experts (blocked differently: its gradients differ
    from the eager ones by ~1e-6 relative, in plain autograd alone).  The base optimizer is plain SGD, linear in the
    gradient: Adam's normalised step and sign would turn rounding-level differences of near-zero gradients into
    O(lr) ones, which says nothing about the engine."""
    sgd_mode, sign = variant
    run_case(Case("mixtral", steps=5, short_steps=(1,), build=dict(experts_implementation=implementation),
                  optimizer_cls=torch.optim.SGD, optimizer_extra={},
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
def test_moe_dbrx_experts_of_stacked_2d_weights(variant):
    """DBRX: its experts' 2-D stacked weights (w1, v1, w2 [E·F, H]) are not the fused experts' layout and take the
    hook path (patch warns); an expert without a token in the SHORT step is left untouched there too."""
    sgd_mode, sign = variant
    with pytest.warns(RuntimeWarning, match="DbrxExperts"):
        run_case(Case("dbrx", steps=4, short_steps=(1,), optimizer_extra=dict(eps=1e-5),
                      bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
def test_moe_bread_lora_on_the_attention(variant):
    """BREAD on an MoE model: peft LoRA on the attention (trained every step), the expert weights as base weights
    taking the on-the-fly update (LoRA on the expert parameters themselves is refused by patch).  Qwen2-MoE: with
    the top-k weights renormalised (Qwen3-MoE, Mixtral) the router's gradient towards the unselected experts is
    zero analytically and rounding noise numerically, so its sign follows the noise, and the fused LoRA forward
    (equal to peft's to rounding, not bit for bit) changes that noise."""
    sgd_mode, sign = variant
    run_case(Case("qwen2_moe", steps=5, short_steps=(1,), build=EAGER, lora=dict(r=4), optimizer_extra=dict(eps=1e-5),
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING,
                           lora_mode="all")))


# ----------------------------------------------------------------------------------------------------------------
# A block's small linears under an on-the-fly role: autograd's dW and the driver's hook (patch's hook_update_numel)


#: the tiny Llama's attention weights (q/o 64×64, k/v 32×64) take the hook path, its MLP weights (88×64) stay fused
HOOK_ATTENTION = dict(fused_loss=False, hook_update_numel=64 * 64)


@pytest.mark.parametrize("variant", [SGD_ALL, SGD_PARTIAL, SIGN_ALL], ids=["sgd-all", "sgd-partial", "sign-all"])
def test_small_linears_updated_by_hooks(variant):
    """Hooked and fused weights side by side in each block, every block switch, the same tolerance as the fused
    cases: the update's rule, step size and skip flag are the fused path's, on autograd's dW."""
    sgd_mode, sign = variant
    run_case(Case("llama", patch=HOOK_ATTENTION, bcd=dict(switch_block_every=2, switch_mode="descending",
                                                         sgd_mode=sgd_mode, sgd_use_sign=sign,
                                                         sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_small_linears_updated_by_hooks_in_kept_blocks(family):
    """The fused loss (``keep_top="auto"`` then keeps the top blocks' activations, whose hooked layers save their
    inputs themselves), and GPT-2's ``Conv1D`` layers with biases beside its tied head and embedding; every block
    linear hooked."""
    run_case(Case(family, steps=3, patch=dict(fused_loss=True, hook_update_numel=1 << 20),
                  loss_fn=models.masked_loss_of, optimizer_extra=FUSED_EPS,
                  bcd=dict(switch_block_every=2, sgd_mode="all", sgd_lr_scaling=SCALING)))


@pytest.mark.parametrize("variant", [SGD_ALL, SIGN_PARTIAL], ids=["sgd-all", "sign-partial"])
def test_bf16_small_linears_updated_by_hooks(variant):
    """bf16, every block linear on the hook path: the update takes autograd's bf16 dW, as the reference's hook does
    (the tolerance of :func:`test_bf16_nearest_rounding`)."""
    sgd_mode, sign = variant
    run_case(Case("llama", dtype=torch.bfloat16, steps=5, lr=1e-2, engine=dict(rounding="nearest"),
                  rtol=2 ** -7, atol=1e-6, adam_outliers=0.01, patch=dict(fused_loss=False, hook_update_numel=1 << 20),
                  bcd=dict(switch_block_every=2, sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING)))
