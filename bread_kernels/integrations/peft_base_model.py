"""A peft model's base model with the weights a run trained, written beside its adapters.

peft's ``save_pretrained`` (the Hugging Face Trainer's ``save_model`` of a peft model) writes the adapters alone;
BREAD trains the base weights too (Adam in the active block, the on-the-fly updates elsewhere), so the trained model is
the adapters over ``<output_dir>/base_model``.  :class:`~bread_kernels.integrations.transformers.BreadTrainerMixin`
calls :func:`save_trained_base_model`.
"""

from __future__ import annotations

import os

import torch

from ..optim.block_optimizer import BlockOptimizer

__all__ = ["BASE_MODEL_FOLDER", "trains_peft_base_weights", "base_model_state_dict", "save_trained_base_model"]


#: the folder of a saved peft model that holds its base model with the weights the run trained
BASE_MODEL_FOLDER = "base_model"


def trains_peft_base_weights(model, optimizer) -> bool:
    """Whether ``model`` is a peft model whose base weights ``optimizer`` (the Trainer's, unwrapped) trains: a
    bread_kernels :class:`~bread_kernels.BlockOptimizer` does, by Adam in the active block unless
    ``lora_mode="adapter_only"`` and on the fly with ``sgd_mode`` (badam's trains the adapters alone)."""
    if not callable(getattr(model, "get_base_model", None)) or not hasattr(model, "peft_config"):
        return False
    return isinstance(optimizer, BlockOptimizer) and (optimizer.lora_mode != "adapter_only"
                                                      or optimizer.sgd_mode != "disabled")


def base_model_state_dict(peft_state_dict: dict) -> dict:
    """The base model's weights under the transformers names, from a peft model's state dict: the adapters
    (``lora_*``, trainable tokens' deltas) and ``modules_to_save`` copies left out, peft's ``base_model.model.``
    prefix and its ``base_layer.`` / ``original_module.`` / ``token_adapter.`` levels taken off."""
    prefix = "base_model.model."
    base = {}
    for name, value in peft_state_dict.items():
        if ".lora_" in name or ".modules_to_save." in name or ".trainable_tokens_" in name:
            continue
        name = name[len(prefix):] if name.startswith(prefix) else name
        for level in (".base_layer.", ".original_module.", ".token_adapter."):
            name = name.replace(level, ".")
        base[name] = value
    return base


def _check_base_names(base, names: set) -> None:
    """Refuse a mapping that does not give the base model's own names (a peft layout ``base_model_state_dict`` does
    not know), before anything is written: the names of the base model's class built on the meta device."""
    with torch.device("meta"):
        expected = set(type(base)(base.config).state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise NotImplementedError(f"BreadTrainerMixin: the base weights of this peft model do not map onto "
                                  f"{type(base).__name__}'s names (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}): a peft layout the base-model save does not know; nothing was "
                                  "written to base_model. Set save_base_model = \"never\" on your Trainer class and "
                                  "save the trained weights yourself")


def save_trained_base_model(trainer, output_dir: str) -> None:
    """Write the base model of ``trainer.model`` (a peft model) with its current weights into
    ``<output_dir>/base_model``: its state dict gathered as the Trainer's ``save_model`` gathers it (by every rank
    onto the first under ZeRO-3, which writes it), else written by the process that saves."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    base = peft_model.get_base_model()
    state_dict = peft_model.state_dict()  # references (a ZeRO-3 model's: its empty shards)
    # every rank checks the names before any gathers: all refuse alike
    _check_base_names(base, set(base_model_state_dict(dict.fromkeys(state_dict))))
    if trainer.is_deepspeed_enabled and trainer.model_wrapped is not trainer.model:  # a DeepSpeed engine around it
        from .deepspeed.internals import gathered_state_dict

        state_dict = gathered_state_dict(trainer.model_wrapped)  # None but on global rank 0
        writes = state_dict is not None
    else:
        writes = trainer.args.should_save
    if writes:
        base.save_pretrained(os.path.join(output_dir, BASE_MODEL_FOLDER), state_dict=base_model_state_dict(state_dict))
