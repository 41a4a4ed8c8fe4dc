"""Which Role each parameter has for a given active block and mode: pure functions over parameter names.

They hold the BlockOptimizers semantics (a prefix is active when it is a *substring* of a name; the "partial"
modes reach the parameters after the first active one in ``named_parameters`` order) and are tested on plain name
lists, without a model.
"""

from __future__ import annotations

from typing import Iterable

from ..peft_lora import is_adapter_name
from ..plan import Role

__all__ = ["SGD_MODES", "LORA_MODES", "roles_for_block", "lowest_needed_block", "no_decay_names"]

SGD_MODES = ("disabled", "all", "partial")
LORA_MODES = ("all", "partial", "adapter_only")


def roles_for_block(names: list[str], prefixes: list[str], *, sgd_mode: str = "disabled", sign: bool = False,
                    lora_mode: str = "all") -> dict[str, Role]:
    """Each name's Role while the block given by ``prefixes`` (its prefixes plus ``active_modules``) is active.

    Args:
        names: every parameter name, in ``named_parameters()`` order.
        prefixes: a name is active when one of them is a substring of it (BlockOptimizers' rule).
        sgd_mode: ``"disabled"`` (BAdam: the rest is frozen), ``"all"`` (every inactive base parameter takes the
            on-the-fly update), ``"partial"`` (only those after the first active name).
        sign: the on-the-fly update is ``SIGN`` instead of ``SGD``.
        lora_mode: with peft adapters among the names: ``"all"`` (every adapter is trained), ``"partial"`` (the
            adapters after the first active name), ``"adapter_only"`` (only the block's adapters; its base weights
            stay frozen).  Adapters never take the on-the-fly update.

    Raises ``ValueError`` if the block has no trainable parameter.
    """
    if sgd_mode not in SGD_MODES:
        raise ValueError(f"unknown sgd_mode {sgd_mode!r}; use one of {', '.join(SGD_MODES)}")
    if lora_mode not in LORA_MODES:
        raise ValueError(f"unknown lora_mode {lora_mode!r}; use one of {', '.join(LORA_MODES)}")
    active = {n for n in names if any(p in n for p in prefixes)}
    adapters = {n for n in names if is_adapter_name(n)}
    if adapters:
        if lora_mode == "all":
            active |= adapters
        elif lora_mode == "partial":
            first = min((names.index(n) for n in active), default=len(names))
            active |= {n for n in names[first:] if n in adapters}
        else:  # adapter_only
            active &= adapters
    if not active and adapters and lora_mode == "adapter_only":
        raise ValueError(f"the block {prefixes} holds no LoRA adapter, and lora_mode='adapter_only' trains only the "
                         "active block's adapters; put adapters in every block (peft's target_modules and "
                         "layers_to_transform), leave this block out of block_prefix_list, or use lora_mode='all' or "
                         "'partial'")
    if not active:
        raise ValueError(f"the block {prefixes} has no trainable parameter")
    if sgd_mode == "all":
        eligible = set(names)
    elif sgd_mode == "partial":
        first = min(names.index(n) for n in active)
        eligible = set(names[first:])
    else:
        eligible = set()
    eligible -= adapters
    on_the_fly = Role.SIGN if sign else Role.SGD
    return {n: Role.ACTIVE if n in active else on_the_fly if n in eligible else Role.FROZEN for n in names}


def lowest_needed_block(names: list[str], roles: dict[str, Role], block_prefixes: list[str]) -> int:
    """The cut: the lowest block (``block_prefixes[i]`` starts the names of block i) with a non-frozen parameter,
    0 if a parameter before the blocks (the input embedding) needs its gradient, ``len(block_prefixes)`` if no
    block has work."""
    first_block_name = next((i for i, n in enumerate(names) if any(n.startswith(p) for p in block_prefixes)),
                            len(names))
    lowest = len(block_prefixes)
    for position, name in enumerate(names):
        if roles[name] is Role.FROZEN:
            continue
        index = next((i for i, p in enumerate(block_prefixes) if name.startswith(p)), None)
        if index is None:
            if position < first_block_name:
                return 0
            continue
        lowest = min(lowest, index)
    return lowest


def no_decay_names(names: Iterable[str], norm_parameters: Iterable[str] | None = None) -> set[str]:
    """Biases and normalisation weights: the base optimizer's group without weight decay.  ``norm_parameters``
    are the names of the normalisation modules' parameters when the model is known (by module class); without it
    a name containing ``norm`` or ``.ln_`` counts."""
    names = list(names)
    result = {n for n in names if n.endswith("bias")}
    if norm_parameters is not None:
        result.update(norm_parameters)
    else:
        result.update(n for n in names if "norm" in n.lower() or ".ln_" in n)
    return result
