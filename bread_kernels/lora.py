"""BREAD's low-rank correction on peft LoRA models: the paper's initialisation, and merging after training.

BREAD trains the adapters of every inactive layer while the active block's base weights are trained too, so a
trained model is the *merged* model: ``PeftModel.save_pretrained`` alone would save the adapters and lose the
trained base weights.  Save with ``bread_kernels.merge_and_unload(model).save_pretrained(path)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .patch import unpatch
from .peft_lora import lora_layers

__all__ = ["init_bread_lora_", "merge_and_unload"]


@torch.no_grad()
def init_bread_lora_(model: nn.Module, adapter: str = "default") -> nn.Module:
    """The BREAD paper's initialisation of every LoRA adapter: ``A = 0``, ``B`` Kaiming-uniform (``a=√5``, what
    ``nn.Linear`` uses), the transpose of peft's default (A Kaiming-uniform, B = 0).  Either way ``B·A = 0`` at the
    start; with A = 0 the first steps move A (``dA = s·(gB)ᵀx`` is non-zero, ``dB = s·gᵀ(xAᵀ)`` is zero).
    peft's own initialisation is kept unless this is called.  Returns ``model``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("init_bread_lora_: the model has no peft LoRA layer; wrap it with peft.get_peft_model first")
    found = False
    for _, layer in layers:
        if adapter not in layer.lora_A:
            continue
        found = True
        layer.lora_A[adapter].weight.zero_()
        nn.init.kaiming_uniform_(layer.lora_B[adapter].weight, a=math.sqrt(5))
    if not found:
        raise ValueError(f"init_bread_lora_: no LoRA layer has an adapter named {adapter!r}")
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Unpatch a trained peft model and merge its adapters into the (trained) base weights; returns the plain
    transformers model, ready for ``save_pretrained``.  Its outputs equal the trained model's."""
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge_and_unload: {type(model).__name__} is not a peft model (no merge_and_unload())")
    return unpatch(model).merge_and_unload()
