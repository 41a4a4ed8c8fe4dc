"""One rank of the ZeRO-3 equivalence runs (launched by tests/integrations/test_zero3.py through torchrun).

For each case: every rank builds the same seeded tiny Llama, keeps a deep copy for the single-process reference,
patches the other, wraps it in ``ZeroBlockOptimizer`` + ``initialize`` (ZeRO-3, CPU accelerator, gloo) and trains
``steps`` optimizer steps on its own slice of each micro-batch.  The reference (plain autograd, one process,
``AccumulatingReference``) trains on the combined micro-batches (every rank's slice).  At the end each rank
compares its own shard ``ds_tensor[:valid]`` of every parameter with the matching flat slice of the reference, the
gathered copies of persistent parameters, the per-step mean loss, and records ``.grad`` left after each backward.
Results go to ``<out>.rank<r>.json``.  ``--fault`` makes rank 1 raise inside the backward of step 1.
"""

from __future__ import annotations

import argparse
import gc
import weakref
import copy
import datetime
import json
import os
import sys
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from tests.integrations.ranks import freeze_long_lived_objects  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, SEQ, MICRO = 61, 40, 50, 3, 9, 2

CASES = {
    # name: (sgd_mode, sgd_use_sign, gradient_accumulation_steps, persistence_threshold, switch_mode, start_block,
    #        base optimizer)
    "badam": ("disabled", False, 1, 0, "ascending", 0, "adamw"),
    "sgd_all": ("all", False, 1, 0, "ascending", 0, "adamw"),
    "sgd_partial_gas2": ("partial", False, 2, 100, "ascending", 1, "adamw"),
    "sign_all_gas2_persist": ("all", True, 2, 100, "descending", None, "adamw"),
    "sign_partial": ("partial", True, 1, 0, "descending", None, "adamw"),
    "sgd_all_gas2_base_sgd": ("all", False, 2, 0, "ascending", 0, "sgd"),
    # BREAD: peft LoRA adapters (r=4, no dropout) on every block linear, trained by DeepSpeed's AdamW; lora_mode in
    # LORA_MODES.  lora_all_sgd_all: the on-the-fly SGD of the base weights inside the LoRA layers, every adapter
    # keeps its Adam state across both switches.  lora_partial_gas2: descending, so at the switches the adapters
    # kept (blocks above the new one, with different step counts) sit next to fresh ones.  lora_all_badam: frozen
    # norms below the active block, so the lowest LoRA layers' inputs do not require grad (the input pre-hook).
    "lora_all_sgd_all": ("all", False, 1, 0, "ascending", 0, "adamw"),
    "lora_partial_gas2": ("partial", False, 2, 0, "descending", None, "adamw"),
    "lora_all_badam": ("disabled", False, 1, 0, "ascending", 0, "adamw"),
    # a Llama whose head is tied to its embedding (Llama-3.2, Qwen2.5's small models): the head's weight is gathered
    # by the embedding, so the fused loss runs and "auto" keeps the top block (measured through its saved tensors)
    "tied_sign_all": ("all", True, 1, 0, "descending", None, "adamw"),
    # Falcon (40B layout: FalconLinear, an nn.Linear subclass the fused linear serves; biases; parallel attention and
    # MLP with an in-place add into a fused output): its fused on-the-fly updates written to the shards
    "falcon_sgd_all": ("all", False, 1, 0, "ascending", 0, "adamw"),
    # Mamba: each mixer computes with its dt_proj's weight itself, so dt_proj is unfused and its on-the-fly sign
    # update takes the hook path, written to the shards DeepSpeed gathers as the mixer's external parameters (fails
    # with dt_proj fused: its update never runs); more Mamba and Jamba cases in EXTRA_CASES
    "mamba_sign_partial": ("partial", True, 1, 0, "descending", None, "adamw"),
    # bf16 (DeepSpeed's bf16 mode): a smoke run, checked loosely against the fp32 reference; norm weights (~1.0,
    # bf16 spacing 2^-8) must move although each sign step (5e-4) is below half a spacing: stochastic rounding
    "bf16_sign_all_gas2_persist": ("all", True, 2, 100, "descending", None, "adamw"),
}
#: BREAD's lora_mode of the LoRA cases (default "all")
LORA_MODES = {"lora_partial_gas2": "partial"}
# Not run by the tests: models whose trained block has biases (GPT-2: Conv1D, biases, wte tied to lm_head; add
# ZERO3_WORKER_UNTIE=1 to untie; a Llama with ZERO3_WORKER_MLP_BIAS=1).  They once seemed to differ from the
# reference by a few % of the movement with DeepSpeed alone (python/ds_bias_repro.py): that was DeepSpeed's default
# gradient clipping (1.0), which the larger gradients of biases exceed; with "gradient_clipping": 0 (ds_config) they
# match to ~1e-7 (ZERO3_WORKER_CLIP=1.0 brings the difference back).  Debug knobs: ZERO3_WORKER_NONCONTIG=1
# (contiguous_gradients off), ZERO3_WORKER_NO_RS=1 (reduce_scatter off), ZERO3_WORKER_MEL=0/1 (DeepSpeed's
# memory_efficient_linear), ZERO3_WORKER_STEPS (default 4), ZERO3_WORKER_EVERY (switch_block_every, default 2).
EXTRA_CASES = {
    "falcon_badam": ("disabled", False, 1, 0, "ascending", 0, "adamw"),
    "moe_badam_sgdbase": ("disabled", False, 1, 0, "descending", None, "sgd"),
    "deepseek_badam_sgdbase": ("disabled", False, 2, 100, "descending", None, "sgd"),
    "falcon_sign_partial": ("partial", True, 1, 0, "descending", None, "adamw"),
    "falcon_sgd_partial_gas2": ("partial", False, 2, 100, "ascending", 1, "sgd"),
    "gpt2_sgd_all": ("all", False, 1, 0, "descending", None, "adamw"),
    "gpt2_badam_sgdbase": ("disabled", False, 1, 0, "descending", None, "sgd"),
    "badam_sgdbase": ("disabled", False, 1, 0, "descending", None, "sgd"),
    "badam_sgdbase_persist": ("disabled", False, 1, 100, "descending", None, "sgd"),
    # Mamba: each mixer computes with its dt_proj's weight itself (dt_proj.weight @ time_step), so patch leaves
    # dt_proj (and x_proj, out_proj: read on mamba_ssm's CUDA path) unfused and their on-the-fly updates take the
    # hook path, written to the shards of parameters that DeepSpeed gathers as the mixer's external parameters
    # (mamba_sign_partial, in CASES, fails with dt_proj fused: its update never runs).  Jamba: attention and Mamba
    # layers in one layers list ("jamba": dense MLPs; "jambamoe": 4 experts, whose on-the-fly update ZeRO-3
    # refuses, so BAdam).  Built under zero.Init too: --trainer zero_init_mamba,zero_init_jamba
    "mamba_sgd_all": ("all", False, 1, 0, "ascending", 0, "adamw"),
    "mamba_sign_all_gas2_persist": ("all", True, 2, 100, "descending", None, "adamw"),
    "jamba_sgd_all": ("all", False, 1, 0, "ascending", 0, "adamw"),
    "jamba_sign_partial": ("partial", True, 1, 0, "descending", None, "adamw"),
    "jamba_sgd_all_gas2_persist": ("all", False, 2, 300, "descending", None, "adamw"),
    "jambamoe_badam_sgdbase": ("disabled", False, 1, 0, "descending", None, "sgd"),
}
OPTIMIZERS = {"adamw": (torch.optim.AdamW, dict(lr=1e-3, eps=1e-5, weight_decay=0.0)),
              "sgd": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9)),
              "sgd-plain": (torch.optim.SGD, dict(lr=5e-2))}
# switch_block_every=2: a switch after the 2nd and after the 4th step (the trace completes at the 2nd forward)
STEPS = int(os.environ.get("ZERO3_WORKER_STEPS", 4))
SGD_LR, SCALING = 2e-2, 0.5


def build_model(family: str = "llama", seed: int = 0):
    """The case's model: a Llama (``tied``: its head tied to its embedding), peft LoRA on one, or GPT-2."""
    if family == "lora":
        from tests.model_zoo import with_lora

        return with_lora(build_model("llama", seed), r=4)
    if family == "moe":  # Qwen3-MoE, 8 experts top-2 as 3-D parameters (its vocabulary holds the worker's tokens)
        from tests.model_zoo import qwen3_moe

        model = qwen3_moe(seed, layers=LAYERS)
        model.train()
        return model
    if family == "deepseek":  # DeepSeek-V3: latent attention, a dense first layer, then MoE layers (zoo vocabulary)
        from tests.model_zoo import deepseek_v3

        return deepseek_v3(seed, layers=LAYERS)
    if family == "falcon":  # FalconLinear (an nn.Linear subclass) everywhere, biases, LayerNorms (zoo vocabulary)
        from tests.model_zoo import falcon

        return falcon(seed, layers=LAYERS)
    if family == "mamba":  # each mixer computes with dt_proj.weight itself: dt_proj unfused, on the hook path
        from tests.model_zoo import mamba

        return mamba(seed, layers=LAYERS)
    if family in ("jamba", "jambamoe"):  # attention and Mamba layers in one stack ("jamba": dense MLPs)
        from tests.model_zoo import jamba

        return jamba(seed, layers=LAYERS, experts=4 if family == "jambamoe" else 1)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32,
                                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=1, eos_token_id=2,
                                         tie_word_embeddings=os.environ.get("ZERO3_WORKER_UNTIE") is None)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
        model.train()
        return model
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=family == "tied", bos_token_id=1,
                                      eos_token_id=2, mlp_bias=bool(os.environ.get("ZERO3_WORKER_MLP_BIAS")))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    return model


def micro_batches(step: int, gas: int, world: int) -> list[torch.Tensor]:
    """The combined [world·MICRO, SEQ] micro-batches of one step; rank r trains on rows r·MICRO:(r+1)·MICRO."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, VOCAB, (world * MICRO, SEQ), generator=gen) for _ in range(gas)]


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def ds_config(gas: int, persistence: int, bf16: bool = False) -> dict:
    return {
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        # DeepSpeed clips the gradient norm to 1.0 unless told otherwise (0.19: GRADIENT_CLIPPING_DEFAULT = 1.0); the
        # reference does not clip (ZERO3_WORKER_CLIP=1.0 shows DeepSpeed's default)
        "gradient_clipping": float(os.environ.get("ZERO3_WORKER_CLIP", 0.0)),
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence,
                              "reduce_bucket_size": 20000, "stage3_prefetch_bucket_size": 20000,
                              "contiguous_gradients": os.environ.get("ZERO3_WORKER_NONCONTIG") is None,
                              "reduce_scatter": os.environ.get("ZERO3_WORKER_NO_RS") is None,
                              **({"memory_efficient_linear": os.environ["ZERO3_WORKER_MEL"] == "1"}
                                 if "ZERO3_WORKER_MEL" in os.environ else {})},
        "steps_per_print": 10 ** 9,
    }


def probe_module(model, family: str, prefix: str):
    """A module of the first block whose hooks and DeepSpeed internals a case checks."""
    if family == "gpt2":
        return model.transformer.h[0].attn.c_attn
    if family == "falcon":
        return model.transformer.h[0].ln_mlp
    if family == "mamba":
        return model.backbone.layers[0].norm
    if family in ("jamba", "jambamoe"):
        return model.model.layers[0].input_layernorm
    return dict(model.named_modules())[prefix + "model.layers.0.post_attention_layernorm"]


def run_case(name: str, rank: int, world: int, fault: bool) -> dict:
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds
    from bread_kernels.integrations.deepspeed.internals import forward_module_stack
    from bread_kernels.integrations.sharded_update import comm_stats
    from tests.integrations.reference_accum import AccumulatingReference
    from tests.optim.reference_bcd import block_prefixes

    sgd_mode, sign, gas, persistence, switch_mode, start, base = {**CASES, **EXTRA_CASES}[name]
    if os.environ.get("ZERO3_WORKER_NO_REFRESH"):  # shows that the persistent-parameter check can fail
        bkds.ZeroShards.mark_updated = lambda self, param: None
    family = next((f for f in ("gpt2", "lora", "tied", "falcon", "moe", "deepseek", "mamba", "jambamoe", "jamba")
                   if name.startswith(f)), "llama")
    prefix = "base_model.model." if family == "lora" else ""
    original = build_model(family)
    ref_model = copy.deepcopy(original)
    optimizer_cls, adam = OPTIMIZERS[base]
    names = [n for n, _ in original.named_parameters()]
    if family == "gpt2":
        blocks = block_prefixes(names, [f"transformer.h.{i}." for i in range(LAYERS)], "transformer.wte.")
    elif family == "falcon":
        blocks = block_prefixes(names, [f"transformer.h.{i}." for i in range(LAYERS)], "transformer.word_embeddings.")
    elif family == "mamba":
        blocks = block_prefixes(names, [f"backbone.layers.{i}." for i in range(LAYERS)], "backbone.embeddings.")
    else:
        blocks = block_prefixes(names, [f"{prefix}model.layers.{i}." for i in range(LAYERS)],
                                f"{prefix}model.embed_tokens.")
    bcd = dict(switch_block_every=int(os.environ.get("ZERO3_WORKER_EVERY", 2)), switch_mode=switch_mode,
               start_block=start, sgd_mode=sgd_mode,
               sgd_use_sign=sign, sgd_lr_scaling=SCALING)
    if family == "lora":
        bcd["lora_mode"] = LORA_MODES.get(name, "all")
    reference = AccumulatingReference(ref_model, blocks, loss_fn=loss_of, optimizer_cls=optimizer_cls,
                                      optimizer_kwargs=dict(adam), **bcd)
    # the on-the-fly lr is the scheduled lr (the base lr here) times the scaling, as in the reference
    ref_losses = [reference.step_accumulated(micro_batches(t, gas, world)) for t in range(STEPS)]
    ref_params = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    model = original if os.environ.get("ZERO3_WORKER_NO_PATCH") else patch(original)
    opt = bkds.ZeroBlockOptimizer(optimizer_cls(model.parameters(), **adam), list(model.named_parameters()),
                                  verbose=0, **bcd)
    engine = bkds.initialize(model, opt, config=ds_config(gas, persistence, bf16=name.startswith("bf16")))
    comm_stats.reset()
    losses, grads_left, problems, stack_depths = [], [], [], []
    history = {n: set() for n in names}
    for t in range(STEPS):
        for n, role in opt.roles.items():
            history[n].add(role.name)
        step_loss = 0.0
        for i, ids in enumerate(micro_batches(t, gas, world)):
            mine = ids[rank * MICRO:(rank + 1) * MICRO]
            loss = engine(input_ids=mine, labels=mine).loss
            if fault and rank == 1 and t == 1:
                def boom(grad):
                    raise RuntimeError("injected fault: rank 1 fails inside the backward")
                loss.register_hook(boom)
            engine.backward(loss)
            grads_left += [f"step {t}: {n}" for n, p in model.named_parameters() if p.grad is not None]
            step_loss += loss.item() / gas
            engine.step()
            stack_depths.append(len(forward_module_stack()))
        mean = torch.tensor([step_loss])
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if t == 1:
            first = probe_module(model, family, prefix)
            problems = bkds.internals_problems(engine.engine, first)

    probe = probe_module(model, family, prefix)
    hook_names = [getattr(h, "__name__", "") for hooks in (probe._forward_pre_hooks, probe._forward_hooks)
                  for h in hooks.values()]
    from bread_kernels.patch import fused_fraction

    result = {"case": name, "fused": fused_fraction(model)["fraction_of_linear_and_expert"], "hook_names": sorted(hook_names), "losses": losses, "ref_losses": ref_losses, "grads_left": grads_left[:5],
              "switches": engine.switches, "internals_problems": problems, "module_stack_depths": stack_depths,
              "comm": dict(comm_stats.calls), "params": {}}
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    initial = dict(build_model(family).named_parameters())
    for pname, p in model.named_parameters():
        layout = bkds.shard_layout(p)
        ref = ref_params[pname].reshape(-1)[layout.start:layout.start + layout.valid]
        mine = p.ds_tensor[:layout.valid].detach().float()
        start = initial[pname].detach().reshape(-1)[layout.start:layout.start + layout.valid].to(p.ds_tensor.dtype)
        entry = {"diff": (mine - ref).abs().max().item() if layout.valid else 0.0,
                 "shard_moved": (mine - start.float()).abs().max().item() if layout.valid else 0.0,
                 "scale": ref.abs().max().item() if layout.valid else 0.0,
                 "moved": (ref_params[pname] - initial[pname]).abs().max().item(),
                 "valid": layout.valid, "roles": sorted(history[pname])}
        if p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE:
            entry["persist_diff"] = (p.data.detach().float() - ref_params[pname]).abs().max().item()
            full = p.data.detach().reshape(-1)[layout.start:layout.start + layout.valid]
            entry["persist_vs_shard"] = (full.float() - mine).abs().max().item()
        result["params"][pname] = entry
    # the ZeRO-3 path's objects are freed once the user drops them (hooks and plans hold them weakly), and so is the
    # model once destroy() has taken it out of DeepSpeed's globals (else its parameters keep the process groups alive
    # into interpreter shutdown, where a gloo worker thread can abort the process)
    refs = {"ZeroBlockOptimizer": weakref.ref(opt), "ZeroShards": weakref.ref(opt.update_target),
            "ZeroBlockEngine": weakref.ref(engine), "model": weakref.ref(model)}
    engine.destroy()
    # the last loss's graph keeps its Functions' plans until dropped; a parameter or module of the model keeps it
    del engine, opt, loss, model, original, p, probe, first
    gc.collect()
    result["alive_after_del"] = sorted(k for k, ref in refs.items() if ref() is not None)
    return result


#: exact resume: name -> (family, sgd_mode, sign, gas, persistence, switch_mode, bf16).  Each trains RESUME_STEPS
#: steps uninterrupted, and again saved after SAVE_AFTER steps (mid-block), loaded into a fresh engine built with
#: another start block, and trained on.  badam_random: the random order and the Adam state of the block under way;
#: sgd_all_persist: the norms a hook updates (saved with the frozen parameters), persistent parameters;
#: resume_lora_gas2: the adapters kept across switches in groups of their own (one per step count);
#: bf16_sign_all: DeepSpeed's bf16 mode and the stochastic rounding's draw counter; moe_badam: a Qwen3-MoE's 3-D
#: expert weights (BAdam: on-the-fly expert updates are refused under ZeRO-3)
RESUME_CASES = {
    "badam_random": ("llama", "disabled", False, 1, 0, "random", False),
    "sgd_all_persist": ("llama", "all", False, 1, 100, "descending", False),
    "resume_lora_gas2": ("lora", "disabled", False, 2, 0, "descending", False),
    "bf16_sign_all": ("llama", "all", True, 1, 0, "ascending", True),
    "moe_badam": ("moe", "disabled", False, 1, 0, "descending", False),
}
RESUME_STEPS, SAVE_AFTER = 6, 3


def run_resume(name: str, rank: int, world: int, save_dir: str) -> dict:
    """One resume case: the shards, per-step losses and active blocks of the resumed run against the uninterrupted
    one's (every rank its own shard)."""
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds

    family, sgd_mode, sign, gas, persistence, switch_mode, bf16 = RESUME_CASES[name]
    prefix = "base_model.model." if family == "lora" else ""
    blocks = [[f"{prefix}model.layers.{i}."] for i in range(LAYERS)]

    def build(start_block):
        model = patch(build_model(family))
        opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5),
                                      list(model.named_parameters()), block_prefix_list=blocks, verbose=0,
                                      switch_block_every=2, switch_mode=switch_mode, start_block=start_block,
                                      sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING,
                                      **({"lora_mode": "partial"} if family == "lora" else {}))
        torch.manual_seed(7)  # the random order's permutations
        return model, opt, bkds.initialize(model, opt, config=ds_config(gas, persistence, bf16=bf16))

    def train(engine, opt, steps):
        losses, active = [], []
        for t in steps:
            active.append(opt.order.current)
            step_loss = 0.0
            for ids in micro_batches(t, gas, world):
                mine = ids[rank * MICRO:(rank + 1) * MICRO]
                loss = engine(input_ids=mine, labels=mine).loss
                engine.backward(loss)
                step_loss += loss.item() / gas
                engine.step()
            losses.append(step_loss)
        return losses, active

    def shards(model):
        return {n: p.ds_tensor[:bkds.shard_layout(p).valid].detach().float().clone()
                for n, p in model.named_parameters()}

    def persistent(model):  # the gathered copies that persistent parameters keep between steps
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return {n: p.data.detach().float().clone() for n, p in model.named_parameters()
                if p.ds_persist and p.ds_status == ZeroParamStatus.AVAILABLE}

    model, opt, engine = build(None)
    initial = shards(model)
    whole_losses, whole_active = train(engine, opt, range(RESUME_STEPS))
    whole, whole_persist = shards(model), persistent(model)
    whole_draws = opt.update.draws
    engine.destroy()

    model, opt, engine = build(None)
    first_losses, first_active = train(engine, opt, range(SAVE_AFTER))
    engine.save_checkpoint(save_dir)
    saved_block = opt.order.current
    engine.destroy()

    other = next(i for i in range(LAYERS) if i != saved_block)
    model, opt, engine = build(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the schedule must be found
        load_path, _ = engine.load_checkpoint(save_dir)
    resumed_at = (opt.order.current, opt.global_step, opt.block_step)
    rest_losses, rest_active = train(engine, opt, range(SAVE_AFTER, RESUME_STEPS))
    resumed, resumed_persist = shards(model), persistent(model)
    result = {"case": name, "load_path": load_path, "saved_block": saved_block, "start_built": other,
              "resumed_at": list(resumed_at), "whole_active": whole_active, "active": first_active + rest_active,
              "whole_losses": whole_losses, "losses": first_losses + rest_losses,
              "draws": [whole_draws, opt.update.draws], "switches_after_load": engine.switches,
              "diff": {n: (whole[n] - resumed[n]).abs().max().item() if whole[n].numel() else 0.0 for n in whole},
              "moved": {n: (whole[n] - initial[n]).abs().max().item() if whole[n].numel() else 0.0 for n in whole},
              "persistent": [sorted(whole_persist), sorted(resumed_persist)],
              "persist_diff": {n: (whole_persist[n] - resumed_persist[n]).abs().max().item()
                               for n in whole_persist if n in resumed_persist}}
    engine.destroy()
    return result


#: a weights-only load: the ZeroBlockEngine.load_checkpoint arguments of each way, by name
WEIGHTS_ONLY_LOADS = {"load_module_only": dict(load_module_only=True),
                      "no_optimizer_states": dict(load_optimizer_states=False)}


def run_weights_only(rank: int, world: int, save_dir: str) -> dict:
    """BREAD-SGD sign trained SAVE_AFTER steps (mid-block) and saved by ZeroBlockEngine.save_checkpoint, then loaded
    weights only (WEIGHTS_ONLY_LOADS) into a fresh engine built to start at the saved run's active block: this
    rank's shard of every parameter against the saved run's (the names that differ), and the parameters the
    saved run's active block moved (so that the comparison covers them)."""
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds

    def build(start_block):
        model = patch(build_model("llama"))
        opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5),
                                      list(model.named_parameters()), verbose=0, switch_block_every=2,
                                      switch_mode="descending", start_block=start_block, sgd_mode="all",
                                      sgd_use_sign=True, sgd_lr_scaling=SCALING)
        return model, opt, bkds.initialize(model, opt, config=ds_config(1, 0))

    def shards(model):
        return {n: p.ds_tensor.detach().clone() for n, p in model.named_parameters()}

    model, opt, engine = build(None)
    initial = shards(model)
    for t in range(SAVE_AFTER):
        ids = micro_batches(t, 1, world)[0][rank * MICRO:(rank + 1) * MICRO]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(save_dir)
    saved, saved_block = shards(model), opt.order.current
    active = [n for n, role in opt.roles.items() if role.name == "ACTIVE"]
    engine.destroy()
    result = {"case": "weights_only", "active_moved": [n for n in active if not torch.equal(saved[n], initial[n])],
              "active": active}
    for how, arguments in WEIGHTS_ONLY_LOADS.items():
        model, opt, engine = build(saved_block)
        engine.load_checkpoint(save_dir, **arguments)
        loaded = shards(model)
        result[how] = [n for n in saved if not torch.equal(loaded[n], saved[n])]
        engine.destroy()
    return result


#: the Hugging Face Trainer with deepspeed= and BreadCallback: name -> (family, sgd_mode, sign, gas, switch_mode,
#: start_block, lora_mode).  trainer_lora_partial also saves after every step through the Trainer (a peft model,
#: for which the Trainer asks DeepSpeed to leave the frozen parameters out): checkpoint-SAVE_AFTER resumes in the
#: loop, checkpoint-TRAINER_RESUME_FROM (mid-block, a switch and lr steps after it) through the Trainer; so does
#: trainer_sgd_all_gas2 (accumulation 2: accelerate sets DeepSpeed's boundary itself) and trainer_bf16_sign (the
#: stochastic rounding's draw counter) through the Trainer.
TRAINER_CASES = {
    "trainer_sgd_all_gas2": ("llama", "all", False, 2, "ascending", 0, None),
    "trainer_lora_partial": ("lora", "partial", False, 1, "descending", None, "partial"),
    "trainer_bf16_sign": ("llama", "all", True, 1, "descending", None, None),  # bf16=True, DeepSpeed's bf16 mode
}
TRAINER_RESUME_FROM = 1


def run_trainer(name: str, rank: int, world: int, save_dir: str) -> dict:
    """One Trainer case: ``Trainer(deepspeed=...)`` whose ``create_optimizer`` returns a ZeroBlockOptimizer, with
    BreadCallback and a cosine lr schedule, against the integration's own loop (``initialize``, the same schedule)
    on the micro-batches the Trainer gave this rank; then the Trainer's checkpoint of step SAVE_AFTER (where
    saved) loaded into a fresh engine of ``initialize`` and trained to the end, against the Trainer's end."""
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds
    from bread_kernels.integrations.transformers import BreadCallback

    family, sgd_mode, sign, gas, switch_mode, start, lora_mode = TRAINER_CASES[name]
    prefix = "base_model.model." if family == "lora" else ""
    blocks = [[f"{prefix}model.layers.{i}."] for i in range(LAYERS)]
    saves = family == "lora"
    bf16 = "bf16" in name
    resumes = saves or gas > 1 or bf16  # through the Trainer
    config = ds_config(gas, 0, bf16=bf16)

    def block_optimizer(model):
        return bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.0),
                                       list(model.named_parameters()), block_prefix_list=blocks, verbose=0,
                                       switch_block_every=2, switch_mode=switch_mode, start_block=start,
                                       sgd_mode=sgd_mode, sgd_use_sign=sign, sgd_lr_scaling=SCALING,
                                       **({"lora_mode": lora_mode} if lora_mode else {}))

    def shards(model):
        return {n: p.ds_tensor[:bkds.shard_layout(p).valid].detach().float().clone()
                for n, p in model.named_parameters()}

    seen, made = [], []

    class BlockTrainer(transformers.Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = block_optimizer(self.model)
                made.append(self.optimizer)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(inputs["input_ids"].clone())
            out = model(input_ids=inputs["input_ids"], labels=inputs["input_ids"])
            return (out.loss, out) if return_outputs else out.loss

    rows = [{"input_ids": ids} for t in range(STEPS) for batch in micro_batches(t, gas, world) for ids in batch]
    def make_args(output_dir=save_dir, **ds_extra):  # one per Trainer: accelerate takes its DeepSpeed plugin once
        return transformers.TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=MICRO, gradient_accumulation_steps=gas, max_steps=STEPS,
            learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
            logging_strategy="no", save_strategy="steps" if resumes else "no", save_steps=1,
            report_to="none", remove_unused_columns=False, deepspeed={**config, **ds_extra}, seed=3, bf16=bf16,
            use_cpu=bf16,
            gradient_checkpointing=gas > 1)
    model = patch(build_model(family))
    trainer = BlockTrainer(model=model, args=make_args(), train_dataset=rows, callbacks=[BreadCallback()])
    trainer.model_accepts_loss_kwargs = False  # the loss is the mean per micro-batch, divided by gas: as the loop's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    trained = shards(model)
    opt, = made
    result = {"case": name, "micro_batches": len(seen), "trainer_active_end": opt.order.current,
              "trainer_global_step": opt.global_step, "base_lr_end": [g["lr"] for g in opt.base_optimizer.param_groups],
              "warnings": sorted({str(w.message)[:90] for w in caught if "bread_kernels" in str(w.message)}),
              "saved_model_warning": [str(w.message) for w in caught if "out of the saved model" in str(w.message)]}

    def loop(opt, engine, steps, scheduler=None):
        scheduler = scheduler or transformers.get_cosine_schedule_with_warmup(opt, 0, STEPS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the scheduler stepped before the optimizer, to reach `steps[0]`
            for _ in range(steps[0]):
                scheduler.step()
        active = []
        for t in steps:
            active.append(opt.order.current)
            for ids in seen[t * gas:(t + 1) * gas]:
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
            scheduler.step()
        return active

    if saves:  # what the Trainer's save_model of a peft model gathers (through the routed method)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gathered = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        result["save_model_warnings"] = sorted({str(w.message)[:100] for w in caught
                                                if "bread_kernels" in str(w.message)})
        if rank == 0:
            adapters = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
            result["save_model_adapters"] = [len(adapters), sum(n in gathered for n in adapters)]
    ref_model = patch(build_model(family))
    ref_opt = block_optimizer(ref_model)
    engine = bkds.initialize(ref_model, ref_opt, config=config)
    first_scaler = engine.optimizer.loss_scaler
    engine.optimizer.override_loss_scale(1.0)  # a scale the user set (1.0: fp32 and bf16 train as without it)
    result["loop_active"] = loop(ref_opt, engine, range(STEPS))
    result["loss_scaler_carried"] = engine.optimizer.loss_scaler is first_scaler and engine.switches > 0 and \
        engine.optimizer.custom_loss_scaler and engine.optimizer.external_loss_scale == 1.0
    reference = shards(ref_model)
    result["diff"] = {n: (trained[n] - reference[n]).abs().max().item() if trained[n].numel() else 0.0
                      for n in trained}
    result["moved"] = {n: (reference[n] - shards_of_initial).abs().max().item() if reference[n].numel() else 0.0
                       for n, shards_of_initial in _initial_shards(family, ref_model, shards).items()}
    engine.destroy()
    if saves:
        resumed_model = patch(build_model(family))
        resumed_opt = block_optimizer(resumed_model)
        engine = bkds.initialize(resumed_model, resumed_opt, config=config)
        scheduler = transformers.get_cosine_schedule_with_warmup(resumed_opt, 0, STEPS)  # its base lr, then the load
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the schedule must be found
            engine.load_checkpoint(os.path.join(save_dir, f"checkpoint-{SAVE_AFTER}"))
        result["resumed_at"] = [resumed_opt.order.current, resumed_opt.global_step, resumed_opt.block_step]
        loop(resumed_opt, engine, range(SAVE_AFTER, STEPS), scheduler)
        resumed = shards(resumed_model)
        result["resume_diff"] = {n: (trained[n] - resumed[n]).abs().max().item() if trained[n].numel() else 0.0
                                 for n in trained}
        engine.destroy()
    if resumes:
        result.update(_trainer_resume(BlockTrainer, family, rows, make_args, save_dir, seen, gas, trained, shards))
    from bread_kernels.integrations.deepspeed.internals import engine_of_module
    from bread_kernels.integrations.transformers import unwrap_optimizer

    result["unwrapped"] = type(unwrap_optimizer(trainer.optimizer)).__name__
    trainer.model_wrapped.destroy()  # the integration's destroy, routed
    result["routed_after_destroy"] = sorted(set(trainer.model_wrapped.__dict__) & {"save_checkpoint", "destroy"})
    result["engine_after_destroy"] = engine_of_module(model) is not None
    if saves:
        result["refused"] = _trainer_refusals(BlockTrainer, family, rows, make_args, save_dir, block_optimizer)
    return result


def _trainer_resume(trainer_class, family, rows, make_args, save_dir, seen, gas, trained, shards) -> dict:
    """The Trainer's own ``train(resume_from_checkpoint=<checkpoint-TRAINER_RESUME_FROM>)`` with BreadTrainerMixin
    among its bases (and no BreadCallback given: the mixin adds one), on a fresh model: the micro-batches it trains
    on and the shards it ends with, against the uninterrupted Trainer run's; for a peft model, the base model its
    save_model writes, reloaded with the trained adapters, against the trained model's logits."""
    from bread_kernels import patch
    from bread_kernels.integrations.transformers import BreadCallback, BreadTrainerMixin

    class ResumingTrainer(BreadTrainerMixin, trainer_class):
        pass

    model = patch(build_model(family))
    trainer = ResumingTrainer(model=model, args=make_args(save_dir + "_resumed"), train_dataset=rows)
    trainer.model_accepts_loss_kwargs = False
    first = len(seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=os.path.join(save_dir, f"checkpoint-{TRAINER_RESUME_FROM}"))
    resumed = shards(model)
    expected = seen[TRAINER_RESUME_FROM * gas:STEPS * gas]
    result = {
        "trainer_resume_callbacks": sum(isinstance(c, BreadCallback) for c in trainer.callback_handler.callbacks),
        "trainer_resume_batches": [len(seen) - first, len(expected),
                                   all(torch.equal(a, b) for a, b in zip(seen[first:], expected))],
        "trainer_resume_diff": {n: (trained[n] - resumed[n]).abs().max().item() if trained[n].numel() else 0.0
                                for n in trained},
        "trainer_resume_warnings": sorted({str(w.message)[:90] for w in caught
                                           if "bread_kernels" in str(w.message)})}
    if family == "lora":  # the mixin's save_model also writes the base model it trained (peft: the adapters alone)
        from bread_kernels.integrations.deepspeed.internals import gathered_state_dict
        from tests.model_zoo import with_lora

        final = os.path.join(save_dir + "_resumed", "final")
        trainer.save_model(final)  # every rank: the gathers are collectives
        full = gathered_state_dict(trainer.model_wrapped)
        ids = torch.arange(SEQ).remainder(VOCAB).unsqueeze(0)
        with torch.no_grad():
            trained_logits = trainer.model_wrapped(input_ids=ids).logits  # every rank: the forward gathers
        if dist.get_rank() == 0:
            # the base model as written (not from_pretrained: while the Trainer's DeepSpeed config lives it builds
            # under zero.Init, collectively), the adapters from the gathered model (on this CPU accelerate sees one
            # process per rank, so every rank writes the Trainer's adapter file: rank 1 its empty shards)
            from safetensors.torch import load_file

            adapters = {n: v for n, v in full.items() if "lora_" in n}
            base = build_model("llama")
            result["base_model_keys"] = base.load_state_dict(
                load_file(os.path.join(final, "base_model", "model.safetensors")), strict=False)._asdict()
            loaded, on_initial = with_lora(base, r=4), with_lora(build_model("llama"), r=4)  # the initial base
            for m in (loaded, on_initial):
                assert not m.load_state_dict(adapters, strict=False).unexpected_keys
                m.eval()
            with torch.no_grad():
                reloaded, initial = (m(input_ids=ids).logits for m in (loaded, on_initial))
            result["base_model_saved"] = [
                (reloaded - trained_logits).abs().max().item(), (initial - trained_logits).abs().max().item(),
                os.path.isdir(os.path.join(save_dir + "_resumed", f"checkpoint-{STEPS}", "base_model"))]
    trainer.model_wrapped.destroy()
    return result


def _trainer_refusals(trainer_class, family, rows, make_args, save_dir, block_optimizer) -> dict:
    """What the Trainer with deepspeed= and BreadCallback raises (and whether any weight moved) when it resumes from
    a checkpoint without BreadTrainerMixin, when its optimizer is a plain BlockOptimizer, when it trains a second
    time (with the mixin: also resuming from a checkpoint), and when the mixin connects the engine under a DeepSpeed
    config the integration refuses (where ``model_wrapped`` is then)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from bread_kernels import BlockOptimizer, patch
    from bread_kernels.integrations.transformers import BreadCallback, BreadTrainerMixin

    refused = {}
    for what in ("resume", "block_optimizer", "second_train", "second_train_resume", "mixin_refused_config"):
        model = patch(build_model(family))
        mixin = what in ("second_train_resume", "mixin_refused_config")
        bases = (BreadTrainerMixin, trainer_class) if mixin else (trainer_class,)

        class Refused(*bases):
            def create_optimizer(self, model=None):
                if self.optimizer is None:
                    self.optimizer = BlockOptimizer(
                        torch.optim.AdamW(self.model.parameters(), lr=1e-3), list(self.model.named_parameters()),
                        verbose=0) if what == "block_optimizer" else block_optimizer(self.model)
                return self.optimizer

        args = make_args(managed_gradient_accumulation=False) if what == "mixin_refused_config" else make_args()
        trainer = Refused(model=model, args=args, train_dataset=rows, callbacks=[BreadCallback()])
        if what.startswith("second_train"):
            trainer.args.max_steps = 1
            trainer.train()
        with GatheredParameters(list(model.parameters())):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            trainer.train(resume_from_checkpoint=os.path.join(save_dir, f"checkpoint-{SAVE_AFTER}")
                          if what.endswith("resume") else None)
            refused[what] = None
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            refused[what] = f"{type(exc).__name__}: {exc}"
        with GatheredParameters(list(model.parameters())):
            refused[what + "_moved"] = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        refused[what + "_wrapped"] = type(trainer.model_wrapped).__name__
        if trainer.model_wrapped is not model:
            trainer.model_wrapped.destroy()
    return refused


def run_zero_init(rank: int, world: int, family: str = "llama") -> dict:
    """A model built partitioned (under ``deepspeed.zero.Init``, as ``from_pretrained`` builds one under the Trainer's
    ``deepspeed=``), patched (the block stack found from its empty tensors), given a ZeroBlockOptimizer, then loaded
    with the weights of a model built whole (the guard against the Trainer's resume lets this load through: no
    engine holds the optimizer yet), trained by ``initialize``'s engine: its shards against the model built whole,
    trained the same way.  ``family`` "falcon": FalconLinear layers (an nn.Linear subclass, probed at patch), which
    must be fused from their empty tensors as from whole ones; "moe": a Qwen3-MoE whose 3-D expert weights must be
    found and fused from their empty tensors (BAdam; a ZeroBlockOptimizer with sgd_mode="all" on it, built first,
    must refuse their on-the-fly update as it does on the model built whole)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds
    from bread_kernels.patch import fused_fraction

    config = ds_config(1, 0)
    blocks, fused = {}, {}
    sgd_mode = "disabled" if family == "moe" else "all"

    def train(model):
        opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5),
                                      list(model.named_parameters()), verbose=0, switch_block_every=2,
                                      sgd_mode=sgd_mode, sgd_lr_scaling=SCALING)
        blocks[len(blocks)] = opt.block_prefix_list
        fused[len(fused)] = fused_fraction(model)["fraction_of_linear_and_expert"]
        return opt

    def loop(model, opt):
        engine = bkds.initialize(model, opt, config=config)
        for t in range(STEPS):
            ids = micro_batches(t, 1, world)[0][rank * MICRO:(rank + 1) * MICRO]
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        shards = {n: p.ds_tensor[:bkds.shard_layout(p).valid].detach().clone() for n, p in model.named_parameters()}
        engine.destroy()
        return shards

    whole = patch(build_model(family))
    opt = train(whole)
    initial = {n: p.detach().reshape(-1).clone() for n, p in whole.named_parameters()}
    expected = loop(whole, opt)
    from transformers.initialization import no_init_weights

    # as from_pretrained/from_config build under ZeRO-3: no initialisers (Mamba's copy_ into an empty tensor fails)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=config):
        model = build_model(family, seed=1)
    result = {"case": "zero_init" if family == "llama" else f"zero_init_{family}",
              "built_empty": sum(p.numel() for p in model.parameters()) == 0}
    model = patch(model)
    if family == "moe":
        try:
            bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                                    verbose=0, sgd_mode="all").close()
            result["on_the_fly_experts"] = None
        except NotImplementedError as exc:
            result["on_the_fly_experts"] = str(exc)
    opt = train(model)
    with GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.load_state_dict(build_model(family).state_dict())
    trained = loop(model, opt)
    result["same_blocks"] = blocks[0] == blocks[1]
    result["fused"] = [fused[0], fused[1]]
    result["diff"] = {n: (trained[n] - expected[n]).abs().max().item() if trained[n].numel() else 0.0
                      for n in trained}
    result["moved"] = sum(not torch.equal(expected[n], initial[n][bkds.shard_layout(p).start:][:expected[n].numel()])
                          for n, p in whole.named_parameters())
    return result


def _initial_shards(family, model, shards):
    """Each parameter's initial shard on this rank, laid out as ``model``'s (the same seeded build)."""
    from bread_kernels.integrations import deepspeed as bkds

    initial = dict(build_model(family).named_parameters())
    out = {}
    for n, p in model.named_parameters():
        layout = bkds.shard_layout(p)
        out[n] = initial[n].detach().reshape(-1)[layout.start:layout.start + layout.valid].float()
    return out


def run_plain_initialize(rank: int, world: int) -> dict:
    """``deepspeed.initialize`` (not the integration's) around a patched model whose optimizer is a
    ZeroBlockOptimizer, given the block optimizer or its base optimizer (also after an engine of the integration's
    was destroyed): the first forward with grad raises, before the model runs; what each raised, and whether
    anything moved."""
    import deepspeed

    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds

    result = {"case": "plain_deepspeed_initialize"}
    for given in ("block_optimizer", "base_optimizer", "block_optimizer_after_destroy"):
        model = patch(build_model("llama"))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                                      verbose=0, switch_block_every=1, sgd_mode="all")
        config = {**ds_config(1, 0), "zero_allow_untested_optimizer": True}
        if given == "block_optimizer_after_destroy":  # the integration's engine first, destroyed
            bkds.initialize(model, opt, config=ds_config(1, 0)).destroy()
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=opt.base_optimizer if given == "base_optimizer" else opt)
        ids = micro_batches(0, 1, world)[0][rank * MICRO:(rank + 1) * MICRO]
        try:
            engine(input_ids=ids, labels=ids)
            result[given] = None
        except RuntimeError as exc:
            result[given] = str(exc)
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(model.parameters())):
            result[given + "_moved"] = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        engine.destroy()
        opt.close()
    return result


def custom_loss(model, ids):
    """A custom loss from the decoder and the head called apart: ``model.model(...)``, then ``model.lm_head``."""
    return _shifted_cross_entropy(model.lm_head(model.model(input_ids=ids).last_hidden_state), ids)


def _shifted_cross_entropy(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


#: custom losses: name -> (sgd_mode, sign, gas, persistence, switch_mode); with accumulation a forward below the
#: engine is refused and the loss is computed from the logits of engine(...) instead
CUSTOM_LOSS_CASES = {
    "custom_loss_sign_all": ("all", True, 1, 100, "descending"),
    "custom_loss_sgd_all_gas2": ("all", False, 2, 0, "ascending"),
}


def run_custom_loss(name: str, rank: int, world: int) -> dict:
    """A custom loss (:func:`custom_loss`) under ZeRO-3 against the single-process plain-autograd reference trained
    with the same loss: without accumulation from ``engine.module.model(...)`` and ``engine.module.lm_head``; with
    accumulation that forward is refused before it runs (what it raised, and whether any shard moved), and the
    loss is computed from the logits of ``engine(input_ids=...)``.  Every rank compares its shards."""
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds
    from tests.integrations.reference_accum import AccumulatingReference
    from tests.optim.reference_bcd import block_prefixes

    sgd_mode, sign, gas, persistence, switch_mode = CUSTOM_LOSS_CASES[name]
    original = build_model("llama")
    ref_model = copy.deepcopy(original)
    names = [n for n, _ in original.named_parameters()]
    bcd = dict(switch_block_every=2, switch_mode=switch_mode, sgd_mode=sgd_mode, sgd_use_sign=sign,
               sgd_lr_scaling=SCALING)
    optimizer_cls, adam = OPTIMIZERS["adamw"]
    reference = AccumulatingReference(ref_model, block_prefixes(names, [f"model.layers.{i}." for i in range(LAYERS)],
                                                                "model.embed_tokens."),
                                      loss_fn=custom_loss, optimizer_cls=optimizer_cls, optimizer_kwargs=dict(adam),
                                      **bcd)
    ref_losses = [reference.step_accumulated(micro_batches(t, gas, world)) for t in range(STEPS)]
    model = patch(original)
    opt = bkds.ZeroBlockOptimizer(optimizer_cls(model.parameters(), **adam), list(model.named_parameters()),
                                  verbose=0, **bcd)
    engine = bkds.initialize(model, opt, config=ds_config(gas, persistence))
    result = {"case": name, "refused": None}
    if gas > 1:
        before = {n: p.ds_tensor.detach().clone() for n, p in model.named_parameters()}
        ids = micro_batches(0, gas, world)[0][rank * MICRO:(rank + 1) * MICRO]
        try:
            engine.backward(custom_loss(engine.module, ids))
        except RuntimeError as exc:
            result["refused"] = str(exc)
        result["moved_by_refused"] = [n for n, p in model.named_parameters() if not torch.equal(p.ds_tensor, before[n])]

    def loss(ids):
        if gas == 1:
            return custom_loss(engine.module, ids)
        return _shifted_cross_entropy(engine(input_ids=ids).logits, ids)

    losses = []
    for t in range(STEPS):
        step_loss = 0.0
        for ids in micro_batches(t, gas, world):
            value = loss(ids[rank * MICRO:(rank + 1) * MICRO])
            engine.backward(value)
            step_loss += value.item() / gas
            engine.step()
        mean = torch.tensor([step_loss])
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    result.update(losses=losses, ref_losses=ref_losses, switches=engine.switches, diff={}, scale={})
    for n, p in model.named_parameters():
        layout = bkds.shard_layout(p)
        ref = reference.model.get_parameter(n).detach().reshape(-1)[layout.start:layout.start + layout.valid]
        mine = p.ds_tensor[:layout.valid].detach().float()
        result["diff"][n] = (mine - ref).abs().max().item() if layout.valid else 0.0
        result["scale"][n] = ref.abs().max().item() if layout.valid else 0.0
    engine.destroy()
    return result


def run_ranks_apart(rank: int, world: int) -> dict:
    """Ranks whose random block orders differ: a generator seeded apart on each rank before the ZeroBlockOptimizer
    draws its first order ("at_start"), or after it, so that the order drawn once the first runs out differs
    ("at_a_switch").  Each rank's shard updates and DeepSpeed's optimizer pair its gradients with the other
    ranks' of the same weights, so each forward after the roles change is checked (one all-reduce of a
    fingerprint of the roles); and ranks training alike whose ``BREAD_ZERO_CHUNK_BYTES`` differ ("chunks_apart":
    their reduce-scatters would split a weight apart). What the refused forward raised on each rank, the blocks
    trained before it, and whether any shard moved in it."""
    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds
    from bread_kernels.integrations.sharded_update import CHUNK_ENV

    result, chunk_bytes = {"case": "ranks_apart"}, os.environ.get(CHUNK_ENV)
    for when in ("at_start", "at_a_switch", "chunks_apart"):
        model = patch(build_model("llama"))
        torch.manual_seed(100 + (rank if when == "at_start" else 0))  # after build_model, which seeds its own
        if when == "chunks_apart":  # the same blocks, but the collectives' chunks split apart
            os.environ[CHUNK_ENV] = str(4096 << rank)
        opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                                      verbose=0, switch_block_every=1, switch_mode="random", sgd_mode="all")
        engine = bkds.initialize(model, opt, config=ds_config(1, 0))
        if when == "at_a_switch":
            torch.manual_seed(100 + rank)  # seeded apart after the first order was drawn (a per-rank data seed)
        trained, refused, moved = [], None, None
        for t in range(2 * LAYERS):
            ids = micro_batches(t, 1, world)[0][rank * MICRO:(rank + 1) * MICRO]
            before = {n: p.ds_tensor.detach().clone() for n, p in model.named_parameters()}
            try:
                loss = engine(input_ids=ids, labels=ids).loss
            except RuntimeError as exc:
                refused = str(exc)
                moved = [n for n, p in model.named_parameters() if not torch.equal(p.ds_tensor, before[n])]
                break
            trained.append(opt.order.current)
            engine.backward(loss)
            engine.step()
        result[when] = {"refused": refused, "moved": moved, "trained": trained}
        engine.destroy()
        if chunk_bytes is None:
            os.environ.pop(CHUNK_ENV, None)
        else:
            os.environ[CHUNK_ENV] = chunk_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=None, help="CASES to run (all of them when no group below is given)")
    parser.add_argument("--resume", default=None, help="resume cases (RESUME_CASES)")
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--plain-initialize", action="store_true", help="run_plain_initialize")
    parser.add_argument("--custom-loss", default=None, help="custom-loss cases (CUSTOM_LOSS_CASES)")
    parser.add_argument("--weights-only", action="store_true", help="run_weights_only (needs --save-dir)")
    parser.add_argument("--trainer", default=None, help="Trainer cases (TRAINER_CASES, and zero_init: run_zero_init)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault", action="store_true")
    parser.add_argument("--ranks-apart", action="store_true", help="run_ranks_apart")
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    freeze_long_lived_objects()
    results = []
    groups = args.resume or args.plain_initialize or args.trainer or args.custom_loss or args.weights_only or \
        args.ranks_apart
    cases = args.cases.split(",") if args.cases else [] if groups else list(CASES)
    try:  # the groups one after the other in one process: each launch pays ~10 s of imports and start-up
        for name in cases:
            results.append(run_case(name, rank, world, args.fault))
        for name in args.resume.split(",") if args.resume else ():
            results.append(run_resume(name, rank, world, os.path.join(args.save_dir, name)))
        if args.plain_initialize:
            results.append(run_plain_initialize(rank, world))
        for name in args.custom_loss.split(",") if args.custom_loss else ():
            results.append(run_custom_loss(name, rank, world))
        if args.weights_only:
            results.append(run_weights_only(rank, world, os.path.join(args.save_dir, "weights_only")))
        if args.ranks_apart:
            results.append(run_ranks_apart(rank, world))
        for name in args.trainer.split(",") if args.trainer else ():
            results.append(run_zero_init(rank, world, name[len("zero_init_"):] or "llama")
                           if name.startswith("zero_init") else
                           run_trainer(name, rank, world, os.path.join(args.save_dir, name)))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        with open(f"{args.out}.rank{rank}.json", "w") as f:
            json.dump(results, f)
    dist.barrier()
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups


if __name__ == "__main__":
    main()
