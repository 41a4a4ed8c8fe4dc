"""peft LoRA layers as ZeRO-3 leaf modules, so one forward gathers a layer's base weight and adapters together."""

from __future__ import annotations

import torch

from ...peft_lora import lora_layer_classes

__all__ = ["mark_lora_leaves", "unmark_lora_leaves"]

INPUT_HOOK_ATTR = "_bread_input_hook"


def mark_lora_leaves(model: torch.nn.Module) -> list:
    """Make every peft LoRA layer a ZeRO-3 leaf module.  A patched LoRA layer computes its base layer and adapters
    in one fused function, so their own forwards (where ZeRO-3's hooks would gather their parameters) never run;
    as a leaf, the LoRA layer's forward gathers all of them."""
    classes = lora_layer_classes()
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    leaves = set_z3_leaf_modules(model, classes, raise_if_not_found=False)
    for module in leaves:
        if INPUT_HOOK_ATTR not in module.__dict__:  # registered before DeepSpeed's own hooks, so it runs first
            setattr(module, INPUT_HOOK_ATTR, module.register_forward_pre_hook(_input_requires_grad))
    return leaves


def unmark_lora_leaves(model: torch.nn.Module) -> None:
    """Remove the input hooks :func:`mark_lora_leaves` registered (DeepSpeed's leaf flag stays with its engine)."""
    for module in model.modules():
        handle = module.__dict__.pop(INPUT_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()


def _input_requires_grad(module: torch.nn.Module, args: tuple):
    """Forward pre-hook of a LoRA leaf module: an input that does not require grad is replaced by a detached copy
    that does.  DeepSpeed reduces a leaf module's gradients from a full backward hook, which torch runs once the
    module's input gradients exist — or, when no input requires grad, from the output side, *before* the module's
    backward has produced the adapters' gradients (they would be reduced as zeros and left in ``.grad``)."""
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor) or args[0].requires_grad:
        return None
    if not any(p.requires_grad for p in module.parameters()):
        return None
    return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
