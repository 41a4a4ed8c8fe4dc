"""A peft model's base model with the weights a run trained, written beside its adapters and read back.

peft's ``save_pretrained`` (the Hugging Face Trainer's ``save_model`` of a peft model) writes the adapters alone;
BREAD trains the base weights too (Adam in the active block, the on-the-fly updates elsewhere), so the trained model is
the adapters over ``<output_dir>/base_model``.  A record beside them (:data:`BASE_MODEL_RECORD`) says whether the run
trained the base weights and whether ``base_model`` holds them, so that a resume from the folder (the Trainer's
``resume_from_checkpoint``, ``load_best_model_at_end``: adapters only) either restores them
(:func:`load_trained_base_model`) or is refused.
:class:`~bread_kernels.integrations.transformers.BreadTrainerMixin` calls both sides.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from typing import Callable

import torch

from ..optim.block_optimizer import BlockOptimizer
from .bcd import optimizer_kind

__all__ = ["BASE_MODEL_FOLDER", "BASE_MODEL_RECORD", "is_peft_model", "trains_peft_base_weights",
           "base_model_names", "base_model_state_dict", "save_trained_base_model", "read_base_model_record",
           "holds_saved_base_model", "forget_saved_base_model", "checked_base_model_load", "load_trained_base_model"]


#: the folder of a saved peft model that holds its base model with the weights the run trained
BASE_MODEL_FOLDER = "base_model"
#: the file beside a saved peft model's adapters: ``{"trains_base_weights": bool, "base_model": bool}`` (whether the
#: run trained the base weights, whether :data:`BASE_MODEL_FOLDER` holds them)
BASE_MODEL_RECORD = "bread_base_model.json"


def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft model (its adapters over a base model it returns from ``get_base_model``)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def trains_peft_base_weights(model, optimizer) -> bool:
    """Whether ``model`` is a peft model whose base weights ``optimizer`` (the Trainer's, unwrapped) trains: a
    bread_kernels :class:`~bread_kernels.BlockOptimizer` or Microsoft BlockOptimizers' (the same arguments) does, by
    Adam in the active block unless ``lora_mode="adapter_only"`` and on the fly with ``sgd_mode``; badam's trains the
    adapters alone where it finds them (its ``lora_mode`` is the flag it sets then); any other optimizer trains what
    requires grad, which peft leaves off the base weights."""
    if not is_peft_model(model):
        return False
    kind = optimizer_kind(optimizer)
    if isinstance(optimizer, BlockOptimizer) or kind == "blockoptimizers":
        return getattr(optimizer, "lora_mode", "all") != "adapter_only" or optimizer.sgd_mode != "disabled"
    if kind == "badam":
        return not optimizer.lora_mode
    return False


def base_model_names(peft_names) -> dict[str, str]:
    """The base model's name (transformers') of each of a peft model's state-dict names that is a base weight: the
    adapters (``lora_*``, trainable tokens' deltas) and ``modules_to_save`` copies left out, peft's
    ``base_model.model.`` prefix and its ``base_layer.`` / ``original_module.`` / ``token_adapter.`` levels taken
    off."""
    prefix = "base_model.model."
    names = {}
    for peft_name in peft_names:
        if ".lora_" in peft_name or ".modules_to_save." in peft_name or ".trainable_tokens_" in peft_name:
            continue
        name = peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name
        for level in (".base_layer.", ".original_module.", ".token_adapter."):
            name = name.replace(level, ".")
        names[peft_name] = name
    return names


def base_model_state_dict(peft_state_dict: dict) -> dict:
    """The base model's weights under the transformers names (:func:`base_model_names`), from a peft model's state
    dict."""
    return {name: peft_state_dict[peft_name] for peft_name, name in base_model_names(peft_state_dict).items()}


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


def save_trained_base_model(trainer, output_dir: str, *, trains: bool, weights: bool) -> None:
    """Write the record (:data:`BASE_MODEL_RECORD`) of ``trainer.model`` (a peft model) into ``output_dir`` and, where
    the run trains the base weights and they are asked for, the base model with its current weights into
    ``<output_dir>/base_model`` before it: its state dict gathered as the Trainer's ``save_model`` gathers it (by
    every rank onto the first under ZeRO-3, which writes it), else written by the process that saves; in the model's
    own layout (transformers' ``save_original_format=False``: a MoE's fused experts as the model holds them), which
    ``from_pretrained`` and :func:`load_trained_base_model` read.

    Args:
        trainer: the Hugging Face Trainer whose model is saved (every rank calls this under ZeRO-3).
        output_dir: the folder ``save_model`` wrote the adapters into.
        trains: whether the run's optimizer trains the base weights (recorded; without it nothing else is written).
        weights: whether to write the base model (with ``trains``); the record says whether it was written.
    """
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    weights = weights and trains
    under_engine = trainer.is_deepspeed_enabled and trainer.model_wrapped is not trainer.model  # DeepSpeed's engine
    if weights:
        base = peft_model.get_base_model()
        state_dict = peft_model.state_dict()  # references (a ZeRO-3 model's: its empty shards)
        # every rank checks the names before any gathers: all refuse alike
        _check_base_names(base, set(base_model_names(state_dict).values()))
        if under_engine:
            from .deepspeed.internals import gathered_state_dict

            state_dict = gathered_state_dict(trainer.model_wrapped)  # None but on global rank 0
    if under_engine:
        writes = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    else:
        writes = trainer.args.should_save
    if not writes:
        return
    _remove_record(output_dir)  # a save into the same folder: no record vouches for base_model while it is rewritten
    if weights:
        layout = {"save_original_format": False} if "save_original_format" in inspect.signature(
            base.save_pretrained).parameters else {}  # transformers 4 writes the model's own names anyway
        base.save_pretrained(os.path.join(output_dir, BASE_MODEL_FOLDER), state_dict=base_model_state_dict(state_dict),
                             **layout)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, BASE_MODEL_RECORD), "w") as f:
        json.dump({"trains_base_weights": bool(trains), "base_model": weights}, f)


def _remove_record(folder: str) -> bool:
    """Remove the record in ``folder``, if any (before what it vouches for is rewritten); whether there was one."""
    try:
        os.remove(os.path.join(folder, BASE_MODEL_RECORD))
    except FileNotFoundError:
        return False
    return True


def forget_saved_base_model(folder: str) -> None:
    """A save into ``folder`` that knows nothing of the base weights (no optimizer yet): the record and the
    ``base_model`` it vouched for, left there by an earlier save, are removed, so that nothing restores them over
    the adapters written now.  A ``base_model`` without a record is not this library's: left alone."""
    if _remove_record(folder):
        shutil.rmtree(os.path.join(folder, BASE_MODEL_FOLDER), ignore_errors=True)


def holds_saved_base_model(folder: str, record: dict | None) -> bool:
    """Whether ``folder``, whose record (:func:`read_base_model_record`) is ``record``, holds a base model to restore:
    ``base_model`` with a record that says it was saved, or without a record (written before there were records)."""
    return os.path.isdir(os.path.join(folder, BASE_MODEL_FOLDER)) and (record is None or record["base_model"])


def read_base_model_record(folder: str) -> dict | None:
    """The record :func:`save_trained_base_model` wrote into ``folder`` (``{"trains_base_weights": bool,
    "base_model": bool}``), or None where there is none (a folder saved without it)."""
    path = os.path.join(folder, BASE_MODEL_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if not (isinstance(record, dict) and all(isinstance(record.get(key), bool)
                                             for key in ("trains_base_weights", "base_model"))):
        raise ValueError(f"{path}: not a bread_kernels base-model record (two booleans, \"trains_base_weights\" and "
                         f"\"base_model\"): {record!r}; restore it, or delete the file to resume the adapters alone")
    return record


def _safetensors_files(folder: str) -> list[str]:
    """The safetensors files of the model saved in ``folder`` (its shards, by the index, or the one file)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors (or its index) there; the base model is written by "
                            "BreadTrainerMixin's save_model (save_pretrained in safetensors)")


def checked_base_model_load(peft_model, folder: str) -> Callable[[], None]:
    """Check that the base model saved in ``<folder>/base_model`` (:func:`save_trained_base_model`) fits
    ``peft_model``'s base weights, every name and shape, and return the function that copies it into them (the
    adapters are left as they are): a saved model that does not fit is refused here, with the model unchanged.  A
    weight the file leaves out is accepted only where it is tied to one it holds (GPT-2's head, which
    ``save_pretrained`` writes once).

    Args:
        peft_model: the peft model to restore (its base layers' weights are overwritten in place by the copy).
        folder: a folder :func:`save_trained_base_model` wrote (a Trainer checkpoint), holding ``base_model``.
    """
    from safetensors import safe_open

    folder = os.path.join(folder, BASE_MODEL_FOLDER)
    files = _safetensors_files(folder)
    state_dict = peft_model.state_dict()  # detached references to the model's own tensors
    targets = {name: state_dict[peft_name] for peft_name, name in base_model_names(state_dict).items()}
    saved = {}  # name -> shape
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                saved[key] = tuple(f.get_slice(key).get_shape())
    held = {targets[name].data_ptr() for name in saved if name in targets}
    missing = sorted(name for name, t in targets.items() if name not in saved and t.data_ptr() not in held)
    unexpected = sorted(set(saved) - set(targets))
    wrong = sorted(name for name, shape in saved.items() if name in targets and tuple(targets[name].shape) != shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{folder}: the saved base model does not fit this peft model's base weights (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}); nothing was loaded. "
                         "Resume with the model the checkpoint was saved from; a base model written in another layout "
                         "(a MoE's experts one by one, as save_pretrained writes them by default) loads with "
                         "from_pretrained, not here")

    def copy() -> None:
        with torch.no_grad():
            for path in files:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        targets[key].copy_(f.get_tensor(key))

    return copy


def load_trained_base_model(peft_model, folder: str) -> None:
    """Copy the base model saved in ``<folder>/base_model`` into ``peft_model``'s base weights, checked first
    (:func:`checked_base_model_load`, whose arguments these are)."""
    checked_base_model_load(peft_model, folder)()
