"""``patch(model)``: find the block stack, the input embedding and the output head, and install the wrappers.

Discovery is structural: the block stack is the ``nn.ModuleList`` of repeated modules of one class holding the most
parameters (Llama/Mistral/Qwen2 ``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``); the embedding
and head come from ``get_input_embeddings()`` / ``get_output_embeddings()`` when the model has them.

What is installed — all as instance attributes, so :func:`unpatch` restores the original module tree and the
``state_dict`` never changes:

* every ``nn.Linear`` and GPT-2 ``Conv1D`` inside the blocks, and the head: a forward through
  :func:`~bread_kernels.fused_linear`.  Until an optimizer assigns a :class:`~bread_kernels.WeightPlan` (the
  ``_bread_weight_plan`` attribute, written through :meth:`PatchedModel.apply_plans`) it computes exactly what the
  original forward does, with plain autograd.
* every peft LoRA layer (``peft.tuners.lora.Linear``, over an ``nn.Linear`` or a ``Conv1D``): a forward through
  :func:`~bread_kernels.functions.lora.fused_lora_linear` (its base layer and adapters are not patched on their
  own).  One active adapter per layer; DoRA and the other peft variants, ``lora_bias`` and mixed-adapter batches
  are refused with an error.  Without gradients (generation, evaluation) peft's own forward runs.
* the input embedding (a plain ``nn.Embedding``): a forward through :func:`~bread_kernels.functions.fused_embedding`,
  whose on-the-fly update touches only the rows of this batch's tokens.
* every block: the streaming forward of :mod:`bread_kernels.stream`.
* with ``fused_loss=True``, on a causal LM: a forward whose loss (given ``labels``, with grad) is the fused
  head+loss of :mod:`bread_kernels.causal_lm` — no [tokens, vocab] logits, ``logits=None`` in the output.

A weight shared with another module (a tied embedding and head) keeps plain autograd in both, so every use
contributes to one summed gradient (design invariant 2).
"""

from __future__ import annotations

import types
import weakref
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import causal_lm
from .functions.embedding import fusable_embedding, fused_embedding
from .functions.linear import fused_linear
from .functions.lora import fused_lora_linear
from .peft_lora import Conv1D, check_lora_layer, is_lora_layer, trained_adapter
from .plan import PLAN_ATTR, WeightPlan, begin_forward
from .stream import StreamConfig, streamed_block_forward

__all__ = ["patch", "unpatch", "set_cut", "PatchedModel", "patched_state", "patched_models"]

_STATE_ATTR = "_bread_patch"
_PATCHED_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def patched_models() -> list[nn.Module]:
    """Every live model that :func:`patch` has patched (and not unpatched)."""
    return list(_PATCHED_MODELS)


class PatchedModel:
    """What :func:`patch` found and installed; kept on the model as ``model._bread_patch``."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, blocks_name: str, embedding, head, recompute: bool,
                 fused_loss: bool = False):
        self.model_ref = weakref.ref(model)
        self.blocks = blocks
        self.blocks_name = blocks_name
        self.embedding = embedding
        self.head = head
        self.stream = StreamConfig(recompute=recompute)
        self.fused_loss = fused_loss  # the causal LM's loss comes from the fused head+loss (bread_kernels.causal_lm)
        # (qualified name, module) of every module given a fused forward: the linears and the input embedding
        self.fused_modules: list[tuple[str, nn.Module]] = []
        self.block_of_linear: dict[int, int] = {}  # id(module) -> block index (absent for the head)
        self.shared_weights: set[int] = set()  # ids of parameters with more than one owner
        self.checkpointing_flags: dict[int, bool] = {}  # blocks whose HF gradient_checkpointing we turned off
        self.forward_hook = None  # starts a new forward for the plans' multi-use bookkeeping
        self._driver = None  # weakref to the optimizer whose plans are installed (see drive())

    def block_prefixes(self) -> list[str]:
        return [f"{self.blocks_name}.{i}." if self.blocks_name else f"{i}." for i in range(len(self.blocks))]

    # -- what an optimizer writes ---------------------------------------------------------------------------------
    def apply_plans(self, plans: Mapping[str, WeightPlan | None]) -> None:
        """Give each fused module (by qualified name, as in :attr:`fused_modules`) its plan; a module left out or
        mapped to None computes what its original forward does, with plain autograd."""
        known = {name for name, _ in self.fused_modules}
        unknown = sorted(set(plans) - known)
        if unknown:
            raise KeyError(f"apply_plans: {unknown[:3]} are not fused modules of this patched model")
        for name, module in self.fused_modules:
            plan = plans.get(name)
            if plan is not None and not isinstance(plan, WeightPlan):
                raise TypeError(f"apply_plans: the plan of {name} is a {type(plan).__name__}, not a WeightPlan")
            setattr(module, PLAN_ATTR, plan)

    def clear_plans(self) -> None:
        """Every fused module back to plain autograd, and the backward reaching every block."""
        self.apply_plans({})
        self.set_cut(0)

    def set_cut(self, cut: int) -> None:
        """Blocks below ``cut`` run without autograd; the backward stops at block ``cut``."""
        if not isinstance(cut, int) or not 0 <= cut <= len(self.blocks):
            raise ValueError(f"set_cut: cut must be an int in [0, {len(self.blocks)}], got {cut!r}")
        self.stream.cut = cut

    @property
    def cut(self) -> int:
        return self.stream.cut

    def drive(self, driver) -> None:
        """Record the optimizer that writes this model's plans (held weakly; :func:`unpatch` closes it)."""
        self._driver = weakref.ref(driver) if driver is not None else None

    @property
    def driver(self):
        """The live optimizer that writes this model's plans, or None."""
        return self._driver() if self._driver is not None else None


def patched_state(model: nn.Module) -> PatchedModel | None:
    return getattr(model, _STATE_ATTR, None)


def _find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ValueError(
            f"patch: found no block stack in {type(model).__name__}: searched for an nn.ModuleList of two or more "
            "modules of one class with parameters (like model.layers, transformer.h or encoder.layer). Point patch "
            "at the stack yourself: patch(model, blocks=model.<path>.layers)"
        )
    return best


def _linear_forward(self, x):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return F.linear(x, self.weight, self.bias)
    return fused_linear(x, self.weight, self.bias, plan)


def _conv1d_forward(self, x):
    weight = self.weight.t()  # Conv1D computes x @ W + b with W [in, out]
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return F.linear(x, weight, self.bias)
    return fused_linear(x, weight, self.bias, plan)


def _embedding_forward(self, ids):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return F.embedding(ids, self.weight, self.padding_idx)
    return fused_embedding(ids, self.weight, plan, self.padding_idx)


def _lora_forward(self, x, *args, **kwargs):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own
    adapter = trained_adapter(self, self._bread_name)  # refuses what the backward cannot do, before it runs
    if not torch.is_grad_enabled():  # evaluation, and blocks below the cut
        return type(self).forward(self, x, *args, **kwargs)
    if args or kwargs:
        raise TypeError(
            f"bread_kernels: the patched LoRA layer {self._bread_name} was called with extra arguments "
            f"({', '.join(kwargs) or len(args)}); in training it takes only the input (peft's mixed-adapter batches, "
            "adapter_names=, are not supported by the fused backward)"
        )
    base = self.get_base_layer()
    weight = base.weight.t() if Conv1D is not None and isinstance(base, Conv1D) else base.weight
    if adapter is None:  # adapters disabled, merged, or none active: the base layer alone
        return fused_linear(x, weight, base.bias, plan)
    lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    x_lora = None
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not
                                                                                         dropout.training))):
        x_lora = dropout(x.to(lora_a.dtype))  # the mask lives in dropout's own autograd node
    return fused_lora_linear(x, x_lora, weight, base.bias, lora_a, lora_b, self.scaling[adapter], plan)


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (Conv1D is not None and isinstance(module, Conv1D))


def _fusable_linears(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The LoRA layers and plain linears under ``root`` (a LoRA layer's base layer and adapters are part of it)."""
    found, inside_lora = [], []
    for name, module in root.named_modules(prefix=prefix):
        if any(name.startswith(f"{lora}.") for lora in inside_lora):
            continue
        if is_lora_layer(module):
            check_lora_layer(name, module)
            inside_lora.append(name)
            found.append((name, module))
        elif _is_linear(module):
            found.append((name, module))
    return found


def patch(model: nn.Module, *, blocks: nn.ModuleList | None = None, recompute: bool = True,
          fused_loss: bool = False) -> nn.Module:
    """Install the fused backward on ``model`` (in place) and return it.  Calling it again is harmless (and
    changes ``recompute`` and ``fused_loss`` to the values given).

    Args:
        blocks: the stack of repeated blocks, if discovery cannot find it (``model.model.layers``).
        recompute: save only each block's input and recompute it in the backward (like gradient checkpointing);
            ``False`` keeps activations.
        fused_loss: on a causal LM (:data:`bread_kernels.causal_lm.FAMILIES`), a forward given ``labels`` with grad
            enabled computes the loss with the fused head+loss (:mod:`bread_kernels.functions.head_loss`): no
            [tokens, vocab] logits, and the head's Role done inside it; it then returns ``logits=None``.  Other
            models are refused with an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fused_loss, bool):
        raise TypeError(f"patch: fused_loss must be True or False, got {fused_loss!r}")
    state = patched_state(model)
    if state is not None:
        if blocks is not None and blocks is not state.blocks:
            raise ValueError("patch: this model is already patched with another block stack; unpatch it first")
        if fused_loss and not state.fused_loss:
            causal_lm.install(model)
        elif state.fused_loss and not fused_loss:
            causal_lm.uninstall(model)
        state.stream.recompute = recompute
        state.fused_loss = fused_loss
        return model
    if fused_loss:
        causal_lm.prepare(model)  # refuse before anything on the model is touched

    if blocks is None:
        blocks_name, blocks = _find_block_stack(model)
    else:
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise TypeError("patch: blocks= must be a non-empty nn.ModuleList of the model's repeated blocks")
        names = [n for n, m in model.named_modules() if m is blocks]
        if not names:
            raise ValueError("patch: blocks= is not a submodule of this model")
        blocks_name = names[0]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except NotImplementedError:
        head = None

    state = PatchedModel(model, blocks, blocks_name, embedding, head, recompute, fused_loss)
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    state.shared_weights = {pid for pid, n in owners.items() if n > 1}

    targets: list[tuple[str, nn.Module, int | None]] = []
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        targets += [(name, module, index) for name, module in _fusable_linears(block, prefix)]
    if head is not None and (_is_linear(head) or is_lora_layer(head)):
        head_name = next(n for n, m in model.named_modules() if m is head)
        targets += [(name, module, None) for name, module in _fusable_linears(head, head_name)][:1]

    for name, module, index in targets:
        setattr(module, PLAN_ATTR, None)
        module._bread_name = name
        if is_lora_layer(module):
            forward = _lora_forward
        else:
            forward = _conv1d_forward if Conv1D is not None and isinstance(module, Conv1D) else _linear_forward
        module.forward = types.MethodType(forward, module)
        state.fused_modules.append((name, module))
        if index is not None:
            state.block_of_linear[id(module)] = index

    if embedding is not None and fusable_embedding(embedding) and id(embedding.weight) not in state.shared_weights:
        setattr(embedding, PLAN_ATTR, None)
        embedding._bread_name = next(n for n, m in model.named_modules() if m is embedding)
        embedding.forward = types.MethodType(_embedding_forward, embedding)
        state.fused_modules.append((embedding._bread_name, embedding))

    for index, block in enumerate(blocks):
        if getattr(block, "gradient_checkpointing", False):  # HF's own checkpointing: ours replaces it
            state.checkpointing_flags[index] = True
            block.gradient_checkpointing = False
        original = block.forward
        block.forward = types.MethodType(
            lambda self, *a, _orig=original, _i=index, **k: streamed_block_forward(self, _orig, state.stream, _i, *a,
                                                                                   **k),
            block,
        )
    if fused_loss:
        causal_lm.install(model)
    state.forward_hook = model.register_forward_pre_hook(lambda module, args: begin_forward())
    setattr(model, _STATE_ATTR, state)
    _PATCHED_MODELS.add(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules (trained values kept; same ``state_dict`` keys).  Harmless if not patched.

    The optimizer driving the model (a :class:`~bread_kernels.BlockOptimizer`) is closed first: its plans, cut
    and hooks belong to the engine removed here."""
    state = patched_state(model)
    if state is None:
        return model
    driver = state.driver
    if driver is not None:  # its plans and hooks belong to the wrappers removed here
        driver.close()
    causal_lm.uninstall(model)
    for _, module in state.fused_modules:
        for attr in ("forward", PLAN_ATTR, "_bread_name"):
            module.__dict__.pop(attr, None)
    for index, block in enumerate(state.blocks):
        block.__dict__.pop("forward", None)
        if state.checkpointing_flags.get(index):
            block.gradient_checkpointing = True
    state.forward_hook.remove()
    delattr(model, _STATE_ATTR)
    _PATCHED_MODELS.discard(model)
    return model


def set_cut(model: nn.Module, cut: int) -> None:
    """Blocks below ``cut`` run without autograd; the backward stops at block ``cut``."""
    state = patched_state(model)
    if state is None:
        raise ValueError("set_cut: the model is not patched")
    state.set_cut(cut)
