"""Tiny Hugging Face models built from configs (random init, no downloads), shared by the engine tests."""

import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

VOCAB = 97


def llama(seed=0, dropout=0.0, layers=4, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=dropout, tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype)


def gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="eager")
    return GPT2LMHeadModel(config)


def bert(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=72, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="eager")
    return BertForMaskedLM(config)


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def batch(step: int, shape=(2, 13)):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, shape, generator=gen)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss
