"""Tiny seeded transformer models (random init, no downloads) and their data: the one model zoo of the tests.

Each builder returns the model in fp32 (or ``dtype``), train mode, eager attention so the maths is deterministic.
:func:`layout` writes down by hand what the *reference* needs to know about a model's structure (one name prefix
per layer, the input embedding's prefix), so the reference and the engine (which discovers the structure itself)
stay independent.  Sizes are small and deliberately odd (vocab 97, intermediate 88/72, sequence 13).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 97
BATCH, SEQ = 2, 13
PEFT_PREFIX = "base_model.model."  # what peft's get_peft_model puts in front of every parameter name


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(dtype).train()


def llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, dropout: float = 0.0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attention_dropout=dropout,
        bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.LlamaForCausalLM(config), dtype)


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, bos_token_id=1, eos_token_id=2,  # the defaults (50256) lie outside the tiny vocabulary
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.GPT2LMHeadModel(config), dtype)  # lm_head.weight is tied to transformer.wte.weight


def bert(seed: int = 0, dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=72,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    # cls.predictions.decoder.weight is tied to bert.embeddings.word_embeddings.weight; pad_token_id=0 makes
    # embedding row 0 a padding row (its gradient is always zero).
    return _finish(transformers.BertForMaskedLM(config), dtype)


def gemma2(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, dropout: float = 0.0,
           softcap: float | None = 0.2):
    """Gemma2: final-logit soft-capping ``c·tanh(z/c)`` (c = 0.2: this tiny model's logits are ~0.2, so the tanh
    bends them), attention soft-capping, sandwich norms, scaled embedding; embedding and head untied (as in llama)."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        final_logit_softcapping=softcap, attn_logit_softcapping=50.0, sliding_window=8, query_pre_attn_scalar=16,
        attention_dropout=dropout,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.Gemma2ForCausalLM(config), dtype)


def causal_lm(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """A tiny Llama-shaped causal LM of another family (``"mistral"``, ``"qwen2"``, ...) from its config class."""
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.AutoModelForCausalLM.from_config(config), dtype)



#: the mixture-of-experts families: E experts, top-k, every layer an MoE layer
EXPERTS, TOP_K = 8, 2
#: a batch shape with fewer (token, expert) slots than experts (1·3·TOP_K = 6 < 8): in every MoE layer at least two
#: experts receive no token
SHORT = (1, 3)


def _moe(config_cls, model_cls, seed, dtype, layers, experts_implementation, **extra):
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, num_experts_per_tok=TOP_K,
        bos_token_id=1, eos_token_id=2, **extra,
    )
    config._attn_implementation = "eager"
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    return _finish(model_cls(config), dtype)


def qwen3_moe(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, experts_implementation=None):
    """Qwen3-MoE: experts [8, 2·20, 32] / [8, 32, 20], top-2 renormalised (norm_topk_prob)."""
    return _moe(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, seed, dtype, layers,
                experts_implementation, num_experts=EXPERTS, moe_intermediate_size=20, intermediate_size=44,
                norm_topk_prob=True)


def mixtral(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, experts_implementation=None):
    """Mixtral: experts [8, 2·20, 32] / [8, 32, 20]; its routing weights stay fp32 in a bf16 model."""
    return _moe(transformers.MixtralConfig, transformers.MixtralForCausalLM, seed, dtype, layers,
                experts_implementation, num_local_experts=EXPERTS, intermediate_size=20)


def qwen2_moe(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, experts_implementation=None):
    """Qwen2-MoE: routed experts [8, 2·20, 32] / [8, 32, 20] plus a shared expert (an MLP of nn.Linears, 24
    wide) behind a sigmoid gate (``shared_expert_gate``, an nn.Linear [1, 32]); qkv biases."""
    return _moe(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, seed, dtype, layers,
                experts_implementation, num_experts=EXPERTS, moe_intermediate_size=20,
                shared_expert_intermediate_size=24, intermediate_size=44)


def ernie4_5_moe(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, experts_implementation=None):
    """Ernie 4.5 MoE: a dense first layer (an MLP 44 wide), then routed experts [8, 2·20, 32] / [8, 32, 20] plus a
    shared expert (20 wide); the router is a bare fp32 ``nn.Parameter`` [8, 32] (``F.linear`` in the router's
    forward, the hook path), and picks its top-2 from the softmax plus ``moe_statics.e_score_correction_bias``, a
    parameter with ``requires_grad=False`` that only the top-k's indices read (no gradient ever reaches it)."""
    return _moe(transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM, seed, dtype, layers,
                experts_implementation, moe_num_experts=EXPERTS, moe_k=TOP_K, moe_intermediate_size=20,
                moe_num_shared_experts=1, moe_layer_start_index=1, intermediate_size=44, pad_token_id=0)


def dbrx(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """DBRX: its experts module (``ffn.experts``, a ``DbrxExperts``) keeps the E experts' matrices stacked into
    three 2-D parameters ``mlp.w1``, ``mlp.v1``, ``mlp.w2`` [8·20, 32] — not the 3-D layout the fused experts
    compute —, routed top-2 by an ``nn.Linear`` router; fused ``Wqkv`` clipped at ``clip_qkv``.  (transformers
    5.25's DBRX needs ``rope_theta`` in the attention config and a ``clip_qkv``.)"""
    config = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=layers, max_seq_len=64, vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=20, moe_num_experts=EXPERTS, moe_top_k=TOP_K),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.DbrxForCausalLM(config), dtype)


def falcon(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 3):
    """Falcon (40B/180B's layout): every linear a ``FalconLinear`` (an ``nn.Linear`` subclass whose forward is
    ``x @ Wᵀ + b``), fused ``query_key_value`` with 2 KV groups, attention and MLP in parallel — the MLP's output is
    added into in place (``mlp_output += attention_output``) —, LayerNorms, biases."""
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, bias=True, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.FalconForCausalLM(config), dtype)


def deepseek_v3(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """DeepSeek-V3: multi-head latent attention (q_a_proj, kv_a_proj_with_mqa, ...), a dense first layer, then MoE
    layers with routed experts [8, 2·20, 32] / [8, 32, 20] and a shared expert whose down_proj is an nn.Linear."""
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=20,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.DeepseekV3ForCausalLM(config), dtype)


def mamba(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 3):
    """Mamba: no attention; each mixer computes with ``dt_proj.weight`` itself (``dt_proj.weight @ time_step``, its
    bias read in the scan) and hands ``x_proj``'s and ``out_proj``'s weights to mamba_ssm's fused kernel where it is
    installed (CUDA), so those linears' own forwards do not run there."""
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, state_size=8,
                                      expand=2, conv_kernel=4, time_step_rank=4, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _finish(transformers.MambaForCausalLM(config), dtype)


def nemotron_h(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Nemotron-H: a hybrid stack of a Mamba-2 layer, an MoE layer (4 experts top-2 and a shared expert), an
    attention layer and an MLP layer (``layers_block_type``); its ``use_cache`` cache keeps a ``DummyLayer``, which
    holds no keys and values and has no ``get_seq_length``, for each MoE and MLP layer."""
    config = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=20, moe_shared_expert_intermediate_size=24, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.NemotronHForCausalLM(config), dtype)


def hrm_text(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, low_cycles_with_grad: int = 1):
    """HRM-Text: two stacks of ``layers`` decoder layers, ``model.L_module`` and ``model.H_module``, each run several
    times in one forward — 2 high-level cycles, each 2 passes of the L stack (in each cycle the first
    ``2 - low_cycles_with_grad`` under ``torch.no_grad()``) then one of the H stack —, every pass writing its own
    layers of the cache (``layer_idx + cycle_offset``: 12 layers for 2 layers a stack); ``use_cache`` on by default,
    gated attention, a scaled embedding."""
    config = transformers.AutoConfig.for_model(
        "hrm_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, head_dim=8, H_cycles=2, L_cycles=2, L_bp_cycles=[low_cycles_with_grad] * 2,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.AutoModelForCausalLM.from_config(config), dtype)


def jamba(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 4, experts: int = 4):
    """Jamba: one ``model.layers`` of two classes — attention layers (0, 2) and Mamba layers (1, 3) —, the Mamba
    layers' MLPs mixtures of ``experts`` experts top-2 (``experts=1``: dense MLPs everywhere)."""
    config = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.JambaForCausalLM(config), dtype)


#: Mllama's image token, and its images: 1 image of 2 tiles of 16×16 pixels per sequence
IMAGE_TOKEN, IMAGE_SHAPE = 5, (1, 2, 3, 16, 16)


def mllama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Mllama: a vision tower of two homogeneous stacks (2 local and 2 global encoder layers) beside a language
    model whose one ``layers`` list holds self-attention layers (0, 2) and cross-attention layers (1, 3) reading
    the projected image features."""
    vision = transformers.MllamaVisionConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_global_layers=2, attention_heads=4,
        image_size=16, patch_size=8, max_num_tiles=2, intermediate_layers_indices=[0], vision_output_dim=64,
        supported_aspect_ratios=[[1, 1], [1, 2]])
    text = transformers.MllamaTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[1, 3], tie_word_embeddings=False, rope_scaling=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.MllamaForConditionalGeneration(config), dtype)


def mllama_inputs(step: int, images: bool = True) -> dict:
    """Mllama's inputs of step ``step`` (no labels): tokens and, with ``images``, the image token first and random
    pixels (aspect ratio 1×2: both tiles), from a private generator; without, tokens only."""
    gen = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(IMAGE_TOKEN + 1, VOCAB, (BATCH, SEQ), generator=gen)
    if not images:
        return dict(input_ids=ids)
    ids[:, 0] = IMAGE_TOKEN
    pixels = torch.randn((BATCH, *IMAGE_SHAPE), generator=gen)
    return dict(input_ids=ids, pixel_values=pixels, aspect_ratio_ids=torch.full((BATCH, 1), 2),
                aspect_ratio_mask=torch.ones(BATCH, 1, 2, dtype=torch.long),
                cross_attention_mask=torch.ones(BATCH, SEQ, 1, 2, dtype=torch.long))


def mllama_loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    """Mllama's loss on :func:`mllama_inputs` of step ``step``, the image token unscored."""
    inputs = mllama_inputs(step)
    return model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)).loss


#: Qwen2-VL's image tokens: the image token and the vision-start token that precedes each image
QWEN2_VL_IMAGE, QWEN2_VL_VISION_START = 90, 91
#: the Qwen-VL families' rotary parameters of the language model: multimodal, sections [2, 3, 3] of head_dim 16
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])


def _vlm_text(**extra) -> dict:
    """The language model of the zoo's vision-language models: 2 layers, 64 wide, heads of 16."""
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def _vlm(config, model_cls, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(model_cls(config), dtype)


def qwen2_vl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Qwen2-VL: a vision tower whose layers are ``model.visual.blocks`` (a name the reference's patterns miss: 2
    blocks, 32 wide, 4×4-pixel patches of 2 frames, merged 2×2 into one token by ``model.visual.merger``) beside a
    language model of 2 layers whose rotary embedding is multimodal (3-D position ids, mrope sections [2, 3, 3])."""
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                           spatial_merge_size=2, mlp_ratio=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters=_MROPE),
        image_token_id=QWEN2_VL_IMAGE, video_token_id=QWEN2_VL_IMAGE + 2, vision_start_token_id=QWEN2_VL_VISION_START)
    return _vlm(config, transformers.Qwen2VLForConditionalGeneration, seed, dtype)


def qwen2_5_vl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Qwen2.5-VL: :func:`qwen2_vl`'s shapes, its vision tower of windowed attention (layer 1 full) and gated MLPs."""
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, out_hidden_size=64, num_heads=2,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                           fullatt_block_indexes=[1]),
        text_config=_vlm_text(rope_parameters=_MROPE),
        image_token_id=QWEN2_VL_IMAGE, video_token_id=QWEN2_VL_IMAGE + 2, vision_start_token_id=QWEN2_VL_VISION_START)
    return _vlm(config, transformers.Qwen2_5_VLForConditionalGeneration, seed, dtype)


def qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Qwen3-VL: :func:`qwen2_vl`'s shapes, interleaved multimodal rotary sections, and the vision layer 0's features
    added into the language model's first layer (deepstack)."""
    config = transformers.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, out_hidden_size=64, num_heads=2,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        text_config=_vlm_text(rope_parameters=dict(_MROPE, mrope_interleaved=True)),
        image_token_id=QWEN2_VL_IMAGE, video_token_id=QWEN2_VL_IMAGE + 2, vision_start_token_id=QWEN2_VL_VISION_START)
    return _vlm(config, transformers.Qwen3VLForConditionalGeneration, seed, dtype)


def glm4v(seed: int = 0, dtype: torch.dtype = torch.float32):
    """GLM-4.1V: :func:`qwen2_vl`'s patches and tokens, a vision tower with interpolated 2-D position embeddings,
    and a language model rotating half of each head (mrope sections [1, 1, 2] of 8 rotated dimensions)."""
    config = transformers.Glm4vConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, out_hidden_size=64, num_heads=2,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, image_size=16),
        text_config=_vlm_text(rope_parameters=dict(_MROPE, mrope_section=[1, 1, 2], partial_rotary_factor=0.5)),
        image_token_id=QWEN2_VL_IMAGE, video_token_id=QWEN2_VL_IMAGE + 2, image_start_token_id=QWEN2_VL_VISION_START,
        image_end_token_id=QWEN2_VL_IMAGE + 3, video_start_token_id=QWEN2_VL_IMAGE + 4,
        video_end_token_id=QWEN2_VL_IMAGE + 5)
    return _vlm(config, transformers.Glm4vForConditionalGeneration, seed, dtype)


def qwen2_vl_inputs(step: int, images: bool = True) -> dict:
    """The Qwen-VL families' inputs of step ``step`` (no labels), built as their processor builds them: per sequence
    one image of 1×4×4 patches (``image_grid_thw``), its 4 merged tokens after a vision-start token, marked in
    ``mm_token_type_ids`` (the 3-D rotary positions come from them), random pixels; without ``images``, text
    tokens only."""
    gen = torch.Generator().manual_seed(3000 + step)
    ids = torch.randint(3, QWEN2_VL_IMAGE, (BATCH, SEQ), generator=gen)
    if not images:
        return dict(input_ids=ids)
    ids[:, 2], ids[:, 3:7] = QWEN2_VL_VISION_START, QWEN2_VL_IMAGE
    patch_dim = 3 * 2 * 4 * 4  # channels · temporal patch · patch²
    image_tokens = torch.zeros_like(ids)
    image_tokens[:, 3:7] = 1
    return dict(input_ids=ids, pixel_values=torch.randn(BATCH * 16, patch_dim, generator=gen),
                image_grid_thw=torch.tensor([[1, 4, 4]] * BATCH), mm_token_type_ids=image_tokens)


def qwen2_vl_loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    """A Qwen-VL model's loss on :func:`qwen2_vl_inputs` of step ``step``, the image tokens unscored."""
    inputs = qwen2_vl_inputs(step)
    return model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["input_ids"] >= QWEN2_VL_IMAGE, -100)).loss


#: the image token of the Llava-style models below, and the tokens one 16×16-pixel image becomes in each
VLM_IMAGE = 90
_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=2, image_size=16, patch_size=8)  # 2×2 patches: 4 image tokens (CLS dropped)
_SIGLIP = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16)


def llava(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Llava: a CLIP vision tower (4 tokens per image) and a projector beside a Llama language model."""
    config = transformers.LlavaConfig(vision_config=_CLIP, text_config=dict(model_type="llama", **_vlm_text()),
                                      image_token_index=VLM_IMAGE, image_seq_length=4, vision_feature_layer=-1)
    return _vlm(config, transformers.LlavaForConditionalGeneration, seed, dtype)


def llava_next(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Llava-NeXT: :func:`llava` with any-resolution images: one 16×16 grid, so 2 crops (the base image and one
    tile) of 4 tokens, the tile's 2 rows each closed by a newline token (10 image tokens)."""
    config = transformers.LlavaNextConfig(vision_config=_CLIP, text_config=dict(model_type="llama", **_vlm_text()),
                                          image_token_index=VLM_IMAGE, image_grid_pinpoints=[[16, 16]],
                                          vision_feature_layer=-1)
    return _vlm(config, transformers.LlavaNextForConditionalGeneration, seed, dtype)


def mistral3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Mistral3: a Pixtral vision tower (4×4-pixel patches merged 2×2: 4 tokens per image) beside a Mistral."""
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, head_dim=16)
    config = transformers.Mistral3Config(vision_config=vision, text_config=dict(model_type="mistral", **_vlm_text()),
                                         image_token_index=VLM_IMAGE, spatial_merge_size=2, vision_feature_layer=-1)
    return _vlm(config, transformers.Mistral3ForConditionalGeneration, seed, dtype)


def gemma3(seed: int = 0, dtype: torch.dtype = torch.float32, softcap: float | None = None):
    """Gemma3: a SigLIP vision tower (4×4-pixel patches pooled to 4 tokens per image) beside a Gemma3 language
    model; ``softcap``: a final-logit soft-capping in its text config (Gemma3's forward applies none)."""
    config = transformers.Gemma3Config(
        vision_config=dict(_SIGLIP, patch_size=4),
        text_config=_vlm_text(sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=softcap),
        image_token_index=VLM_IMAGE, mm_tokens_per_image=4, boi_token_index=91, eoi_token_index=92)
    return _vlm(config, transformers.Gemma3ForConditionalGeneration, seed, dtype)


def paligemma(seed: int = 0, dtype: torch.dtype = torch.float32, softcap: float | None = 0.2):
    """PaliGemma 2: a SigLIP vision tower (8×8-pixel patches: 4 tokens per image) beside a Gemma2 language model
    whose final-logit soft-capping (c = 0.2, as :func:`gemma2`) the forward reads from the text config."""
    config = transformers.PaliGemmaConfig(
        vision_config=dict(_SIGLIP, patch_size=8, projection_dim=64),
        text_config=dict(model_type="gemma2", final_logit_softcapping=softcap, sliding_window=8,
                         query_pre_attn_scalar=16, **_vlm_text()),
        image_token_index=VLM_IMAGE, projection_dim=64)
    return _vlm(config, transformers.PaliGemmaForConditionalGeneration, seed, dtype)


def llava_onevision(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Llava-OneVision: :func:`llava_next`'s any-resolution images (10 tokens) from a SigLIP tower beside a Qwen2."""
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(_SIGLIP, model_type="siglip_vision_model", patch_size=8),
        text_config=dict(model_type="qwen2", **_vlm_text()), image_token_index=VLM_IMAGE,
        video_token_index=VLM_IMAGE + 1, image_grid_pinpoints=[[16, 16]], vision_feature_layer=-1)
    return _vlm(config, transformers.LlavaOnevisionForConditionalGeneration, seed, dtype)


def idefics3(seed: int = 0, dtype: torch.dtype = torch.float32, config_cls=None, model_cls=None):
    """Idefics3: its vision transformer (4×4-pixel patches, 4×4 of them pixel-shuffled by 2 into 4 tokens per image)
    beside a Llama; ``config_cls``/``model_cls``: SmolVLM's, which are built alike."""
    config = (config_cls or transformers.Idefics3Config)(
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **_vlm_text()), image_token_id=VLM_IMAGE, scale_factor=2)
    return _vlm(config, model_cls or transformers.Idefics3ForConditionalGeneration, seed, dtype)


def smolvlm(seed: int = 0, dtype: torch.dtype = torch.float32):
    """SmolVLM: :func:`idefics3`'s shapes in SmolVLM's classes."""
    return idefics3(seed, dtype, transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration)


def internvl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """InternVL: its vision transformer (4×4-pixel patches, pixel-shuffled at ratio 0.5 into 4 tokens per image)
    beside a Qwen2."""
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[16, 16], patch_size=[4, 4]),
        text_config=dict(model_type="qwen2", **_vlm_text()), image_token_id=VLM_IMAGE, image_seq_length=4,
        downsample_ratio=0.5, tie_word_embeddings=False)
    return _vlm(config, transformers.InternVLForConditionalGeneration, seed, dtype)


def aya_vision(seed: int = 0, dtype: torch.dtype = torch.float32, logit_scale: float = 0.3):
    """AyaVision: a SigLIP tower (4×4-pixel patches, pixel-shuffled by 2 into 4 tokens per image) beside a Cohere2
    whose forward multiplies the logits by the text config's ``logit_scale`` (0.3: not a power of two, so the
    fused loss's ``(s·h)·Wᵀ`` rounds apart from ``s·(h·Wᵀ)``); the head tied to the input embedding (its default)."""
    config = transformers.AyaVisionConfig(
        vision_config=dict(_SIGLIP, model_type="siglip_vision_model", patch_size=4),
        text_config=dict(model_type="cohere2", sliding_window=8, **_vlm_text(logit_scale=logit_scale)),
        image_token_index=VLM_IMAGE, downsample_factor=2, tie_word_embeddings=True)
    return _vlm(config, transformers.AyaVisionForConditionalGeneration, seed, dtype)


def vipllava(seed: int = 0, dtype: torch.dtype = torch.float32):
    """VipLlava: :func:`llava` with the features of the CLIP tower's last two layers concatenated and normed."""
    config = transformers.VipLlavaConfig(vision_config=_CLIP, text_config=dict(model_type="llama", **_vlm_text()),
                                         image_token_index=VLM_IMAGE, image_seq_length=4, vision_feature_layer=[-2, -1])
    return _vlm(config, transformers.VipLlavaForConditionalGeneration, seed, dtype)


def llava_next_video(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Llava-NeXT-Video: :func:`llava_next`'s images (10 tokens) in the video model's classes."""
    config = transformers.LlavaNextVideoConfig(
        vision_config=_CLIP, text_config=dict(model_type="llama", **_vlm_text()), image_token_index=VLM_IMAGE,
        video_token_index=VLM_IMAGE + 1, image_grid_pinpoints=[[16, 16]], vision_feature_layer=-1)
    return _vlm(config, transformers.LlavaNextVideoForConditionalGeneration, seed, dtype)


def idefics2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Idefics2: :func:`idefics3`'s vision transformer, its 16 patches resampled by a one-layer perceiver into 4
    latent tokens per image, beside a Mistral."""
    config = transformers.Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        perceiver_config=dict(hidden_size=64, rms_norm_eps=1e-6, resampler_n_latents=4, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
        text_config=dict(model_type="mistral", **_vlm_text()), image_token_id=VLM_IMAGE)
    config.perceiver_config._attn_implementation = "eager"
    return _vlm(config, transformers.Idefics2ForConditionalGeneration, seed, dtype)


def cohere2_vision(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Cohere2-Vision: :func:`aya_vision`'s shapes (head tied), whose forward (transformers 5.25) applies no logit
    scale, though its Cohere2 text config carries one (0.3 here, so the parity sees that neither applies it)."""
    config = transformers.Cohere2VisionConfig(
        vision_config=dict(_SIGLIP, model_type="siglip_vision_model", patch_size=4),
        text_config=dict(model_type="cohere2", sliding_window=8, **_vlm_text(logit_scale=0.3)),
        image_token_id=VLM_IMAGE, downsample_factor=2, alignment_intermediate_size=48, tie_word_embeddings=True)
    return _vlm(config, transformers.Cohere2VisionForConditionalGeneration, seed, dtype)


def llava_style_inputs(model: torch.nn.Module, step: int, images: bool = True) -> dict:
    """The inputs of step ``step`` (no labels) of a :func:`llava`, :func:`llava_next`, :func:`mistral3`,
    :func:`gemma3`, :func:`paligemma`, :func:`llava_onevision`, :func:`idefics3`, :func:`smolvlm`, :func:`internvl`,
    :func:`aya_vision`, :func:`vipllava`, :func:`llava_next_video`, :func:`idefics2` or :func:`cohere2_vision` model:
    per sequence one image's tokens (:data:`VLM_IMAGE`; PaliGemma's first, the others' at position 3) and its random
    pixels, in each model's layout (the Idefics': [B, images, C, H, W]); without ``images``, text tokens only
    (PaliGemma's ``token_type_ids`` mark a prefix of 6, Gemma3's the image tokens)."""
    name = type(model).__name__
    any_resolution = name.startswith(("LlavaNext", "LlavaOnevision"))  # 2 crops: the base image and one tile
    tokens = 10 if any_resolution else 4
    gen = torch.Generator().manual_seed(4000 + step)
    ids = torch.randint(3, VLM_IMAGE - 2, (BATCH, SEQ + tokens - 4), generator=gen)
    start = 0 if name.startswith("PaliGemma") else 3
    if images:
        ids[:, start:start + tokens] = VLM_IMAGE
    inputs = dict(input_ids=ids)
    if name.startswith("PaliGemma"):
        inputs["token_type_ids"] = (torch.arange(ids.shape[1]) >= 6).long().expand_as(ids)
    if name.startswith("Gemma3"):
        inputs["token_type_ids"] = (ids == VLM_IMAGE).long()
    if images:
        crops = (2,) if any_resolution else (1,) if name.startswith(("Idefics", "SmolVLM")) else ()
        inputs["pixel_values"] = torch.randn(BATCH, *crops, 3, 16, 16, generator=gen)
        if any_resolution or name.startswith("Mistral3"):
            inputs["image_sizes"] = torch.tensor([[16, 16]] * BATCH)
    return inputs


def vlm_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels of a vision-language batch: the ids, with the image tokens (:data:`QWEN2_VL_IMAGE`, :data:`VLM_IMAGE`
    and above; Mllama's :data:`IMAGE_TOKEN`), every id divisible by 7 and each sequence's first two positions
    ignored (-100)."""
    labels = ids.masked_fill((ids >= VLM_IMAGE) | (ids == IMAGE_TOKEN) | (ids % 7 == 0), -100)
    labels[:, :2] = -100
    return labels


def qwen2_vl_masked_loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """:func:`masked_loss_of` for a Qwen-VL model: the inputs of :func:`qwen2_vl_inputs` (seeded by the batch
    ``ids``' sum, so one per step), :func:`vlm_labels`, ``num_items_in_batch`` the scored tokens plus 3."""
    inputs = qwen2_vl_inputs(int(ids.sum()))
    labels = vlm_labels(inputs["input_ids"])
    scored = int((labels[:, 1:] != -100).sum())
    return model(**inputs, labels=labels, num_items_in_batch=torch.tensor(scored + 3)).loss


def llava_style_masked_loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """:func:`qwen2_vl_masked_loss_of` for a model of :func:`llava_style_inputs` (its inputs seeded by the batch
    ``ids``' sum)."""
    inputs = llava_style_inputs(model, int(ids.sum()))
    labels = vlm_labels(inputs["input_ids"])
    scored = int((labels[:, 1:] != -100).sum())
    return model(**inputs, labels=labels, num_items_in_batch=torch.tensor(scored + 3)).loss


def vit_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``VisionEncoderDecoderModel`` (image captioning: a ViT encoder of 2 layers over 16×16-pixel images, a GPT-2
    ``GPT2LMHeadModel`` decoder of 3 layers cross-attending to it).  Its forward calls the decoder without labels
    and computes the loss from the decoder's logits itself."""
    encoder = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                                     image_size=16, patch_size=8)
    decoder = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64,
                                      add_cross_attention=True, is_decoder=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    for c in (config, config.encoder, config.decoder):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(transformers.VisionEncoderDecoderModel(config), dtype)


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert, "gemma2": gemma2}
#: more families, each for the tests of what sets it apart (not parametrized over with BUILDERS)
FAMILY_BUILDERS = {"falcon": falcon, "mamba": mamba, "dbrx": dbrx, "qwen2_vl": qwen2_vl, "aya_vision": aya_vision,
                   "ernie4_5_moe": ernie4_5_moe, "nemotron_h": nemotron_h, "hrm_text": hrm_text}
#: models whose largest block stack holds transformers layers of several classes
MIXED_STACK_BUILDERS = {"jamba": jamba, "mllama": mllama}
MOE_BUILDERS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "qwen2_moe": qwen2_moe}


def layout(model: torch.nn.Module) -> tuple[list[str], str]:
    """(one name prefix per repeated layer, bottom to top; the input embedding's prefix) of a zoo model."""
    name = type(model).__name__
    if name in ("LlamaForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                "Ernie4_5_MoeForCausalLM"):
        return [f"model.layers.{i}." for i in range(model.config.num_hidden_layers)], "model.embed_tokens."
    if name == "Gemma2ForCausalLM":
        return [f"model.layers.{i}." for i in range(model.config.num_hidden_layers)], "model.embed_tokens."
    if name in ("Qwen2VLForConditionalGeneration", "AyaVisionForConditionalGeneration"):
        return ([f"model.language_model.layers.{i}." for i in range(model.config.text_config.num_hidden_layers)],
                "model.language_model.embed_tokens.")
    if name == "NemotronHForCausalLM":
        return [f"model.layers.{i}." for i in range(model.config.num_hidden_layers)], "model.embeddings."
    if name == "HrmTextForCausalLM":  # the L stack's parameters come first
        per_stack = model.config.num_layers_per_stack
        return ([f"model.{stack}.layers.{i}." for stack in ("L_module", "H_module") for i in range(per_stack)],
                "model.embed_tokens.")
    if name == "MambaForCausalLM":
        return [f"backbone.layers.{i}." for i in range(model.config.num_hidden_layers)], "backbone.embeddings."
    if name == "DbrxForCausalLM":
        return [f"transformer.blocks.{i}." for i in range(model.config.n_layers)], "transformer.wte."
    if name == "FalconForCausalLM":
        return [f"transformer.h.{i}." for i in range(model.config.num_hidden_layers)], "transformer.word_embeddings."
    if name == "GPT2LMHeadModel":
        return [f"transformer.h.{i}." for i in range(model.config.n_layer)], "transformer.wte."
    if name == "BertForMaskedLM":
        return ([f"bert.encoder.layer.{i}." for i in range(model.config.num_hidden_layers)],
                "bert.embeddings.word_embeddings.")
    raise ValueError(f"layout: {name} is not a zoo model")


def batch(step: int, shape=(BATCH, SEQ)) -> torch.Tensor:
    """The token ids of one step, from a private generator seeded by the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, shape, generator=gen)


def batches(n_steps: int, seed: int = 1234) -> list[torch.Tensor]:
    """One fixed [BATCH, SEQ] batch of token ids per step, different per step, from a private generator
    (so drawing data never touches the global torch RNG that the random switch order uses)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(n_steps)]


def batches_with_short(n_steps: int, short_steps=(), seed: int = 1234) -> list[torch.Tensor]:
    """:func:`batches`, except that the steps in ``short_steps`` get a :data:`SHORT` batch (some expert of every
    MoE layer receives no token)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, SHORT if step in short_steps else (BATCH, SEQ), generator=gen)
            for step in range(n_steps)]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss (Llama, GPT-2, MoE) or MLM loss on every position (BERT): labels are the ids themselves."""
    return model(input_ids=ids, labels=ids).loss


def assert_sgd_all_trains_as_the_reference(reference: torch.nn.Module, model: torch.nn.Module, optimizer=None,
                                            steps: int = 3, blocks: tuple[list[str], str] | None = None) -> None:
    """``steps`` steps of BREAD-SGD (``sgd_mode="all"``, an SGD base at lr 0.1, a block switch every 2 steps) of
    ``model`` — by ``optimizer``, or by a ``BlockOptimizer`` built here — against the plain-autograd ``ReferenceBCD``
    over ``reference`` (of ``model``'s weights, and its parameter names: peft's prefix where it wraps a model), then
    every parameter compared; ``optimizer`` is closed after.  ``blocks``: (layer prefixes, embedding prefix) of a
    model :func:`layout` does not know."""
    import bread_kernels
    from tests.optim.reference_bcd import ReferenceBCD, block_prefixes

    names = [n for n, _ in reference.named_parameters()]
    wrapped = names[0].startswith(PEFT_PREFIX)
    layers, embedding = blocks or layout(reference.base_model.model if wrapped else reference)
    if wrapped:
        layers, embedding = [PEFT_PREFIX + p for p in layers], PEFT_PREFIX + embedding
    expected = ReferenceBCD(reference, block_prefixes(names, layers, embedding), loss_fn=loss_of,
                            optimizer_cls=torch.optim.SGD, optimizer_kwargs=dict(lr=0.1), sgd_mode="all",
                            switch_block_every=2)
    if optimizer is None:
        optimizer = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                 list(model.named_parameters()), sgd_mode="all",
                                                 switch_block_every=2, verbose=0)
    for ids in batches(steps):
        expected.step(ids)
        loss_of(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_parameters(reference, model)
    optimizer.close()


def masked_loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss with some labels ignored (-100: the first two positions of every sequence and every id
    divisible by 7) and Trainer's gradient-accumulation normalisation (``num_items_in_batch``: the count of scored
    tokens of this batch plus 3, as if the accumulated micro-batches held more)."""
    labels = ids.masked_fill(ids % 7 == 0, -100)
    labels[:, :2] = -100
    scored = int((labels[:, 1:] != -100).sum())
    return model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(scored + 3)).loss


def with_lora(model: torch.nn.Module, r: int = 8, lora_dropout: float = 0.0, seed: int = 5, **config) -> torch.nn.Module:
    """``model`` wrapped by peft's ``get_peft_model`` with LoRA on every linear of the blocks (the head excluded);
    B is drawn at random instead of peft's zeros, so that the adapters change the forward and A gets a gradient
    from the first step."""
    import peft

    targets = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"],
               "moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}  # the attention: the experts are 3-D parameters
    name = type(model).__name__.lower()
    family = "moe" if "moe" in name or "mixtral" in name else next(k for k in targets if k in name)
    torch.manual_seed(seed)
    lora_config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, target_modules=targets[family],
                                  fan_in_fan_out=family == "gpt2", **config)
    wrapped = peft.get_peft_model(model, lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return wrapped


def assert_same_parameters(reference: torch.nn.Module, trained: torch.nn.Module, rtol: float = 1e-5,
                           atol: float = 1e-6) -> None:
    """Every parameter of ``trained`` within ``rtol``/``atol`` of ``reference``'s (the same names, in order)."""
    for (name, a), (_, b) in zip(reference.named_parameters(), trained.named_parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_close_by_norm(reference: torch.nn.Module, trained: torch.nn.Module, tol: float) -> None:
    """Every parameter of ``trained`` within ``tol`` of ``reference``'s, relative to the reference's norm."""
    for (name, a), (_, b) in zip(reference.named_parameters(), trained.named_parameters()):
        error = (a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-12)
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol}"


def moved_parameters(original: torch.nn.Module, trained: torch.nn.Module) -> list[str]:
    """The names of the parameters that training changed."""
    return [n for (n, a), (_, b) in zip(original.named_parameters(), trained.named_parameters())
            if not torch.equal(a, b)]


class Int8Linear(torch.nn.Linear):
    """A hand-built look-alike of a quantized linear (bitsandbytes' ``Linear8bitLt``, HQQ's, GPTQ's) as the engine
    sees one: an ``nn.Linear`` subclass whose ``weight`` is an int8 ``nn.Parameter`` (no grad) with a per-row scale
    beside it, and a forward that dequantizes, ``y = x·(s·W_q)ᵀ + b``.  ``weight_dtype=torch.float8_e4m3fn`` gives
    transformers' fp8 linears instead (``FbgemmFp8Linear``: the fp8 weight and its scale both parameters)."""

    def __init__(self, linear: torch.nn.Linear, weight_dtype: torch.dtype = torch.int8):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        w = linear.weight.detach()
        integer = not weight_dtype.is_floating_point
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / (127 if integer else 1)
        stored = (w / scale).round() if integer else w / scale
        self.weight = torch.nn.Parameter(stored.to(weight_dtype), requires_grad=False)
        if integer:
            self.register_buffer("weight_scale", scale)
        else:
            self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), self.bias)


def quantize_blocks(model: torch.nn.Module, weight_dtype: torch.dtype = torch.int8) -> torch.nn.Module:
    """``model`` (a zoo Llama) with every linear of its blocks replaced by an :class:`Int8Linear`, in place."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, Int8Linear(child, weight_dtype))
    return model
