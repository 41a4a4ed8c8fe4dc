"""Tiny seeded transformer models (random init, no downloads) and their per-step data for the optimizer tests.

Each builder returns a :class:`TinyModel`: the model (fp32, train mode, eager attention so the math is
deterministic), plus what the *reference* needs to know about the model's structure, written down by hand here
rather than discovered, so the reference and the engine (which discovers the structure itself) stay independent.
Sizes are small and deliberately odd (vocab 97, intermediate 88/72, sequence 13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

VOCAB = 97
BATCH, SEQ = 2, 13


@dataclass
class TinyModel:
    model: torch.nn.Module
    family: str
    layer_prefixes: list[str]  # one name prefix per repeated layer of the block stack, bottom to top
    embedding_prefix: str  # the input embedding module's prefix


def _finish(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(dtype)
    model.train()  # dropout probabilities are all 0, so train mode is deterministic
    return model


def llama(seed: int = 0, dtype: torch.dtype = torch.float32, num_hidden_layers: int = 4) -> TinyModel:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _finish(transformers.LlamaForCausalLM(config), dtype)
    return TinyModel(model, "llama", [f"model.layers.{i}." for i in range(num_hidden_layers)], "model.embed_tokens.")


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        bos_token_id=1, eos_token_id=2,  # the defaults (50256) lie outside the tiny vocabulary
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _finish(transformers.GPT2LMHeadModel(config), dtype)  # lm_head.weight is tied to transformer.wte.weight
    return TinyModel(model, "gpt2", [f"transformer.h.{i}." for i in range(3)], "transformer.wte.")


def bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=72,
        hidden_dropout_prob=0, attention_probs_dropout_prob=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    # cls.predictions.decoder.weight is tied to bert.embeddings.word_embeddings.weight; pad_token_id=0 makes
    # embedding row 0 a padding row (its gradient is always zero).
    model = _finish(transformers.BertForMaskedLM(config), dtype)
    return TinyModel(model, "bert", [f"bert.encoder.layer.{i}." for i in range(3)], "bert.embeddings.word_embeddings.")


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def batches(n_steps: int, seed: int = 1234) -> list[torch.Tensor]:
    """One fixed [BATCH, SEQ] batch of token ids per step, different per step, from a private generator
    (so drawing data never touches the global torch RNG that the random switch order uses)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(n_steps)]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss (Llama, GPT-2) or MLM loss on every position (BERT): labels are the ids themselves."""
    return model(input_ids=ids, labels=ids).loss


PEFT_PREFIX = "base_model.model."  # what peft's get_peft_model puts in front of every parameter name


def with_lora(model: torch.nn.Module, r: int = 8, lora_dropout: float = 0.0, seed: int = 5, **config) -> torch.nn.Module:
    """``model`` wrapped by peft's ``get_peft_model`` with LoRA on every linear of the blocks (the head excluded);
    B is drawn at random instead of peft's zeros, so that the adapters change the forward and A gets a gradient
    from the first step."""
    import peft

    targets = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}
    family = next(k for k in targets if k in type(model).__name__.lower())
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
