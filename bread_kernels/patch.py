"""``patch(model)``: find the block stack, the input embedding and the output head, and install the wrappers.

Discovery is structural: the block stack is the ``nn.ModuleList`` of repeated modules of one class holding the most
parameters (Llama/Mistral/Qwen2 ``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``); the embedding
and head come from ``get_input_embeddings()`` / ``get_output_embeddings()`` when the model has them.

What is installed — all as instance attributes, so :func:`unpatch` restores the original module tree and the
``state_dict`` never changes:

* every ``nn.Linear`` and GPT-2 ``Conv1D`` inside the blocks, and the head (also an ``nn.Linear`` subclass whose
  forward gives ``F.linear``'s values bit for bit on probe rows, as Falcon's ``FalconLinear`` does in fp32 and
  without a bias in bf16; one that computes something else keeps plain autograd, and ``patch`` warns, naming it):
  a forward through :func:`~bread_kernels.fused_linear`.  Until an optimizer assigns a
  :class:`~bread_kernels.WeightPlan` (the ``_bread_weight_plan`` attribute, written through
  :meth:`PatchedModel.apply_plans`) it computes exactly what the original forward does, with plain autograd.
* every peft LoRA layer (``peft.tuners.lora.Linear``, over an ``nn.Linear`` or a ``Conv1D``): a forward through
  :func:`~bread_kernels.functions.lora.fused_lora_linear` (its base layer and adapters are not patched on their
  own).  One active adapter per layer; DoRA and the other peft variants, ``lora_bias`` and mixed-adapter batches
  are refused with an error.  Without gradients (generation, evaluation) peft's own forward runs.
* every transformers mixture-of-experts experts module inside the blocks (recognised structurally: direct 3-D
  parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], called with the hidden states, the top-k
  expert ids and the routing weights — Qwen2/Qwen3-MoE, Mixtral, whatever ``experts_implementation`` the config
  selects): a forward through :func:`~bread_kernels.functions.experts.fused_experts`, with one plan per weight
  (``_bread_expert_plans``, keyed in :meth:`PatchedModel.apply_plans` by the parameter's qualified name).  Until
  a plan is assigned, and without gradients, transformers' own forward runs.  An experts module of another layout
  (DBRX's 2-D stacked experts too) keeps plain autograd and ``patch`` warns, naming it.  peft LoRA on expert
  parameters (``target_parameters``) is refused with an error.
* the input embedding (a plain ``nn.Embedding``): a forward through :func:`~bread_kernels.functions.fused_embedding`,
  whose on-the-fly update touches only the rows of this batch's tokens.
* the work between the GEMMs (``fused_elementwise=True``, the default), each module recognised by its output on
  probe rows: every Llama-style RMSNorm (:func:`~bread_kernels.functions.rms_norm.fusable_rms_norm`) computes
  through :func:`~bread_kernels.functions.rms_norm.rms_norm`, which saves its input and one fp32 value per row
  instead of an fp32 copy of the input; every SwiGLU MLP (:func:`~bread_kernels.functions.swiglu.fusable_swiglu_mlp`)
  through :func:`~bread_kernels.functions.swiglu.swiglu_mlp`, whose product ``silu(a)·u`` saves ``a`` and ``u``
  but not ``silu(a)``; every attention module that calls its modeling module's ``apply_rotary_pos_emb``
  (:func:`~bread_kernels.functions.rotary.install_fused_rotary`) through
  :func:`~bread_kernels.functions.rotary.rotary_embedding`, one pass per tensor each way.  All give autograd's
  values bit for bit (on a GPU's Triton kernels the norm's row sums round in another order: to fp32 rounding); a
  norm's weight keeps plain autograd (a gradient into ``.grad``).
* every block: the streaming forward of :mod:`bread_kernels.stream`.
* on a causal LM of a supported family (by default; ``fused_loss=True`` requires it, ``False`` never): a forward
  whose loss (given ``labels``, with grad) is the fused head+loss of :mod:`bread_kernels.causal_lm` — no
  [tokens, vocab] logits, ``logits=None`` in the output (as Liger-Kernel's fused linear cross-entropy does).

A weight shared with another module (a tied embedding and head) keeps plain autograd in both, so every use
contributes to one summed gradient (design invariant 2).

A block's small plain linear (at most ``hook_update_numel`` weight elements) with an on-the-fly role is not fused
either where the driver's own hooks apply the updates (:class:`~bread_kernels.optim.driver.EngineDriver`; not under
``accelerate`` or ZeRO-3): autograd computes its dW and a post-accumulate-grad hook applies the update, as the
reference does.  On such a weight the fused function's Python (a custom Function's forward, twice with the
recompute, and its backward: ~110 µs a step on a CPU) costs more than the dW it avoids (see :func:`patch`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import os
import sys
import types
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import causal_lm
from .functions.autocast import autocast_dtype
from .functions.embedding import fusable_embedding, fused_embedding
from .functions.experts import EXPERT_PLANS_ATTR, EXPERT_WEIGHTS, experts_gate, experts_layout_problem, fused_experts
from .functions.linear import fused_linear
from .functions.lora import fused_lora_linear
from .functions.recompute import replayed
from .functions.rms_norm import fusable_rms_norm, rms_norm, rms_norm_epsilon
from .functions.rotary import MARKED_FORWARD as marked_rotary_forward
from .functions.rotary import install_fused_rotary, share_fused_rotary, uninstall_fused_rotary, uses_rotary_embedding
from .functions.swiglu import fusable_swiglu_mlp, swiglu_mlp
from .head_readers import head_reader
from .installed_forward import NOT_PICKLED, InstalledForward, install_forward
from .offload import offload_refusal, offloaded_parameter
from .open_forwards import OpenForwards
from .peft_lora import (Conv1D, check_lora_layer, fusable_lora_layer, is_linear_layer, is_lora_layer,
                        is_param_wrapper, peft_remapped_targets, peft_wrapping, trained_adapter)
from .plan import PLAN_ATTR, WeightPlan, begin_forward
from .quantized import quantized_weight
from .rounding import FLOAT_DTYPES
from .stream import (CHECKPOINTING_TURNED_OFF, StreamConfig, inside_functional_call, note_embedding_outputs,
                     streamed_block_forward, turn_off_hf_checkpointing)
from .weight_readers import linears_read_outside

__all__ = ["patch", "unpatch", "set_cut", "PatchedModel", "patched_state", "patched_models", "fused_fraction",
           "DEFAULT_HOOK_UPDATE_NUMEL", "hook_update_numel_default", "register_whole_shape", "whole_shape",
           "block_stacks", "stack_prefixes", "enclosing_patched_model"]

_STATE_ATTR = "_bread_patch"
_BLOCK_ATTR = "_bread_block"  # on each block: (its own forward before patch, the stream, its index)
_PROBED_ACT_ATTR = "_bread_probed_act"  # on each fused SwiGLU MLP: the act_fn its probe found computing silu

#: ``patch(hook_update_numel=None)``'s value where ``BREAD_HOOK_UPDATE_NUMEL`` is unset: 2¹⁷ elements (512 KiB of
#: fp32 dW).  Measured on a 2-thread AVX2 CPU (``bench/results/hook_update_numel_cpu_amd_avx2_stop38.txt``): with
#: weights of 2¹²-2¹⁷ elements the hook path's step was 1-12% faster (SGD and SIGN); at 2¹⁸-2¹⁹ SGD's was up to 9%
#: slower (its fused update is one ``addmm_`` into W, with no dW to write and read again).
DEFAULT_HOOK_UPDATE_NUMEL = 1 << 17
_HOOK_UPDATE_NUMEL_ENV = "BREAD_HOOK_UPDATE_NUMEL"
_PATCHED_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def patched_models() -> list[nn.Module]:
    """Every live model that :func:`patch` has patched (and not unpatched)."""
    return list(_PATCHED_MODELS)


class PatchedModel:
    """What :func:`patch` found and installed; kept on the model as ``model._bread_patch``."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, blocks_name: str, embedding, head, recompute: bool,
                 fused_loss: bool | None = None):
        self.model_ref = weakref.ref(model)
        self.blocks = blocks
        self.blocks_name = blocks_name
        self.embedding = embedding
        self.head = head
        self.stream = StreamConfig(recompute=recompute)
        self.fused_loss = fused_loss  # as asked of patch(): None (where it can), True (required) or False
        # (qualified name, module) of every module given a fused forward: the linears and the input embedding
        self.fused_modules: list[tuple[str, nn.Module]] = []
        # (qualified name, module) of every experts module given the fused experts forward (one plan per weight)
        self.fused_experts: list[tuple[str, nn.Module]] = []
        # (qualified name, module) of every RMSNorm and SwiGLU MLP given a fused forward (no plans of their own)
        self.fused_elementwise: list[tuple[str, nn.Module]] = []
        self.block_of_linear: dict[int, int] = {}  # id(module) -> block index (absent for the head)
        self.shared_weights: set[int] = set()  # ids of parameters with more than one owner
        self.hook_update_numel = DEFAULT_HOOK_UPDATE_NUMEL  # patch()'s option: see updates_in_hook
        #: the modules below the model where a forward of its blocks may start (each module on the way from the model
        #: to its block stack: ``model.model``, peft's ``base_model`` and the models it wraps), outermost first; held
        #: here as the model holds them (the model itself is not listed: a strong reference would be a cycle)
        self.entry_modules: list[nn.Module] = []
        #: the handles of the forward-entry hooks on the model, :attr:`entry_modules` and the head
        self.entry_handles: list = []
        #: the forwards of the model and its entry modules that run now, per thread (:func:`_enter_forward`)
        self.open_forwards = OpenForwards()
        #: what runs once per forward of the model, whichever entry module starts it (:meth:`add_forward_hooks`)
        self.before_forward: OrderedDict = OrderedDict()
        self.after_forward: OrderedDict = OrderedDict()
        # (qualified name, the owning module's _parameters, attribute) of every parameter the model held at patch:
        # FSDP2 shards what it wraps (the root, each block, or a module inside one), tensor parallelism the linears of
        # its plan (an MLP's alone, the head), so a model sharded after patch shows in any of them (see shard_probe).
        # The dictionaries, not the modules: the model's own (a parameter of the root) would make a reference cycle
        self.shard_probes: list[tuple[str, dict, str]] = []
        self._driver = None  # weakref to the optimizer whose plans are installed (see drive())
        #: what computes the head outside its module, as last seen (head_readers.head_reader; see follow_head_reader)
        self.head_read_by: str | None = None

    def __deepcopy__(self, memo: dict) -> "PatchedModel":
        """The state of a deep copy of the patched model (an EMA or reference model — TRL's
        ``create_reference_model`` —, a snapshot): the copy's own modules and stream (its blocks' forwards find them
        through their own attributes), the ids it keys by mapped to the copy's modules and parameters, registered
        as a patched model of its own and driven by no optimizer: every fused module without a plan and the cut at
        0, as after :func:`patch` — by the copies themselves: a plan is not copied (``WeightPlan.__deepcopy__``: it
        belongs to the original's optimizer, whose updates would otherwise run in the copy's backward) and the
        stream starts afresh (``StreamConfig.__deepcopy__``)."""
        duplicate = PatchedModel.__new__(PatchedModel)
        memo[id(self)] = duplicate
        for key, value in self.__dict__.items():
            if key not in ("model_ref", "_driver", "open_forwards", "before_forward", "after_forward"):
                duplicate.__dict__[key] = copy.deepcopy(value, memo)
        duplicate.open_forwards, duplicate.before_forward, duplicate.after_forward = \
            OpenForwards(), OrderedDict(), OrderedDict()
        duplicate.block_of_linear = {id(memo[key]): index for key, index in self.block_of_linear.items()
                                     if key in memo}
        duplicate.shared_weights = {id(memo[key]) for key in self.shared_weights if key in memo}
        duplicate._driver = None
        model = self.model_ref()
        copied = memo.get(id(model)) if model is not None else None
        if copied is None:
            raise RuntimeError("bread_kernels: the state of a patched model was deep-copied without its model; "
                               "copy the model itself (copy.deepcopy(model))")
        duplicate.model_ref = weakref.ref(copied)
        duplicate.stream.orphan = False  # the copy's blocks stream under the copied state (StreamConfig.orphan)
        for (_, module), (_, original) in zip(duplicate.fused_elementwise, self.fused_elementwise):
            share_fused_rotary(original, module)
        _PATCHED_MODELS.add(copied)
        _register_installed(duplicate)
        _register_entries(duplicate)
        return duplicate

    def __getstate__(self):
        raise TypeError(NOT_PICKLED)

    def shard_probe(self) -> str | None:
        """The name of a parameter sharded since patch (a DTensor where a parameter of the model lay at patch), or
        None.  Every parameter, not only each block's first: a tensor-parallel plan may shard the head or an MLP
        alone, whose fused functions would meet a DTensor weight deep inside (the fused loss: aten.mm's "got mixed
        torch.Tensor and DTensor").  Before every forward, so it costs nothing where no process group is initialized
        (a DTensor lives on a device mesh, which initializes one), and one dictionary read per parameter where one
        is (about 20 µs for a 32-layer Llama's 291 on a 2-core CPU), the ``isinstance`` only for a parameter that is
        no plain ``nn.Parameter`` (``nn.Parameter`` of a DTensor is the DTensor itself)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        dtensor = _dtensor_class()
        for name, parameters, attr in self.shard_probes:
            p = parameters.get(attr)
            if type(p) is not nn.Parameter and isinstance(p, dtensor):
                return name
        return None

    def updates_in_hook(self, module: nn.Module) -> bool:
        """Whether an on-the-fly role of fused module ``module``'s weight is better left to a post-accumulate-grad
        hook (autograd's dW, then the update, as the reference does) than fused: a plain linear inside a block (not
        the head, the embedding or a LoRA layer) whose weight has at most :attr:`hook_update_numel` elements."""
        return id(module) in self.block_of_linear and not is_lora_layer(module) and \
            module.weight.numel() <= self.hook_update_numel

    def computed_outside(self, module: nn.Module) -> bool:
        """Whether fused module ``module`` is computed from its weight outside its own forward (the head under TRL's
        fused LM head: :meth:`follow_head_reader`), so that its fused backward never runs and only a
        post-accumulate-grad hook sees its dW: an on-the-fly role must then take the hook path."""
        return module is self.head and self.head_read_by is not None

    def follow_head_reader(self) -> bool:
        """Note whether something computes the head from its weight outside the head module (TRL's fused LM head,
        installed on the model after ``patch``: :func:`~bread_kernels.head_readers.head_reader`); return whether
        that changed since the last call, when the plans written before must be written again
        (:meth:`computed_outside`: an on-the-fly head then takes the hook path, as the reference's does)."""
        model = self.model_ref()
        reader = head_reader(model) if model is not None else None
        changed, self.head_read_by = reader != self.head_read_by, reader
        return changed

    def block_prefixes(self) -> list[str]:
        return stack_prefixes(self.blocks_name, len(self.blocks))

    def expert_weights(self) -> list[tuple[str, nn.Parameter]]:
        """(qualified parameter name, parameter) of every weight of the fused experts modules: each has a plan of
        its own."""
        return [(f"{name}.{attr}", getattr(module, attr)) for name, module in self.fused_experts
                for attr in EXPERT_WEIGHTS]

    # -- what an optimizer writes ---------------------------------------------------------------------------------
    def apply_plans(self, plans: Mapping[str, WeightPlan | None]) -> None:
        """Give each fused module (by qualified name, as in :attr:`fused_modules`) and each expert weight (by
        qualified parameter name, as in :meth:`expert_weights`) its plan; one left out or mapped to None computes
        what the original forward does, with plain autograd."""
        known = {name for name, _ in self.fused_modules} | {name for name, _ in self.expert_weights()}
        unknown = sorted(set(plans) - known)
        if unknown:
            raise KeyError(f"apply_plans: {unknown[:3]} are not fused modules or expert weights of this patched model")
        for name, plan in plans.items():
            if plan is not None and not isinstance(plan, WeightPlan):
                raise TypeError(f"apply_plans: the plan of {name} is a {type(plan).__name__}, not a WeightPlan")
        if any(plan is not None for plan in plans.values()):
            self.check_unchanged_since_patch()
        for name, module in self.fused_modules:
            setattr(module, PLAN_ATTR, plans.get(name))
        for name, module in self.fused_experts:
            setattr(module, EXPERT_PLANS_ATTR, {attr: plans.get(f"{name}.{attr}") for attr in EXPERT_WEIGHTS})
        self.stream.plans_changed()  # a block's roles decide what it saves: "auto" measures the kept blocks again

    def check_unchanged_since_patch(self) -> None:
        """Refuse plans for a model whose head or input embedding was replaced, or whose weights were tied or
        untied, after :func:`patch` (``resize_token_embeddings``, ``set_output_embeddings``, ``tie_weights``): what
        patch found then — which modules it fused, which weight takes the hook path because two modules share it —
        no longer holds, and a plan would train a replaced module or update a shared weight once per owner."""
        model = self.model_ref()
        if model is None:
            return
        for what, getter, patched in (("input embedding", "get_input_embeddings", self.embedding),
                                      ("head", "get_output_embeddings", self.head)):
            try:
                current = getattr(model, getter)() if hasattr(model, getter) else patched
            except NotImplementedError:
                current = None
            if current is not patched:
                setter = "set_output_embeddings" if what == "head" else "set_input_embeddings"
                raise ValueError(f"bread_kernels: the model's {what} was replaced after patch() "
                                 f"(resize_token_embeddings, {setter}); call bread_kernels.unpatch(model) and "
                                 "patch(model) again before building the optimizer")
        if _shared_weight_ids(model) != self.shared_weights:
            raise ValueError("bread_kernels: the model's weights were tied or untied after patch() (tie_weights(), "
                             "tie_word_embeddings); call bread_kernels.unpatch(model) and patch(model) again before "
                             "building the optimizer")
        self._refuse_changed_modules(type(model).__name__)

    def clear_plans(self) -> None:
        """Every fused module back to plain autograd, and the backward reaching every block."""
        self.apply_plans({})
        self.set_cut(0)

    def set_cut(self, cut: int) -> None:
        """Blocks below ``cut`` run without autograd; the backward stops at block ``cut``."""
        if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= len(self.blocks):
            raise ValueError(f"set_cut: cut must be an int in [0, {len(self.blocks)}], got {cut!r}")
        self.stream.cut = cut
        self.stream.plans_changed()  # the optimizer sets the cut whenever it writes new plans

    @property
    def cut(self) -> int:
        return self.stream.cut

    def drive(self, driver) -> None:
        """Record the optimizer that writes this model's plans (held weakly; :func:`unpatch` closes it)."""
        self._driver = weakref.ref(driver) if driver is not None else None

    def find_lost(self) -> str | None:
        """The qualified name of a module given a forward by patch (a fused layer, an experts module, a block) that
        is no longer in the model — peft's ``merge_and_unload`` put its base layer in its place,
        ``resize_token_embeddings`` a new embedding, ``del`` removed it — or None; one walk of the model's modules.
        No plan reaches what is in its place.  Where none is gone and the stack is unchanged, the suspicion
        :func:`_note_replaced_modules` raised is cleared; else the forwards go on looking (:meth:`check_forward`: it
        may be put back)."""
        return self._changed_modules()[0]

    def _changed_modules(self) -> tuple[str | None, str | None]:
        """What :meth:`find_lost` and :meth:`stack_change` find, each looked for once; where neither finds anything,
        the suspicion is cleared, else the forwards go on looking."""
        model = self.model_ref()
        if model is None:
            return None, None
        present = {id(m) for m in model.modules()}
        lost = next((name for name, module in self.installed() if id(module) not in present), None)
        change = self.stack_change()
        if lost is None and change is None:
            self.stream.suspect_lost = None
        else:
            self.suspect_lost()
        return lost, change

    def _refuse_changed_modules(self, patched: str, driven: bool = False) -> None:
        """Refuse (``ValueError``, naming the remedy) a model of class ``patched`` with a module of patch's gone
        (:meth:`find_lost`) or a block stack changed (:meth:`stack_change`) since patch."""
        lost, change = self._changed_modules()
        if lost is not None:
            raise ValueError(replaced_module_refusal(lost, patched, driven=driven))
        if change is not None:
            raise ValueError(stack_change_refusal(change, patched, driven=driven))

    def suspect_lost(self) -> None:
        """A module of this model with a forward of patch's was replaced somewhere (:func:`_note_replaced_modules`):
        the next forward with grad while an optimizer drives looks whether one is gone (:meth:`check_forward`)."""
        self.stream.suspect_lost = weakref.WeakMethod(self.check_forward)

    def check_forward(self) -> None:
        """Before a forward with grad, where a replacement was noticed: while an optimizer drives the model, refuse
        it if a module with a plan is gone from the model (the weights in its place would silently stop training);
        without one, plain autograd is right and the look waits for the next forward an optimizer drives."""
        model = self.model_ref()
        if self.driver is None or model is None:
            return
        self._refuse_changed_modules(type(model).__name__, driven=True)

    def stack_change(self) -> str | None:
        """How the block stack differs from the one :func:`patch` streams, or None: another ``ModuleList`` in its
        place (one holding every streamed block and more), a layer inserted, appended or deleted (``insert``, ``del``:
        torch reports neither to a hook), or a block moved or put in at a place (each streamed block knows its
        index, which the stream's cut compares with the optimizer's, counted by place in the stack: a block
        inserted below the active one would put that one below the cut, where it runs without autograd and never
        trains).
        A layer count the model's config states is not compared (``num_hidden_layers`` changed with the stack says
        nothing of what patch streams)."""
        model = self.model_ref()
        if model is None:
            return None
        name = self.blocks_name or type(model).__name__
        if self.current_blocks() is not self.blocks:
            return f"{name} is no longer the ModuleList patch() streams (another one was assigned in its place)"
        if len(self.blocks) != self.stream.n_blocks:
            return (f"{name} holds {len(self.blocks)} blocks where patch() streamed {self.stream.n_blocks} (a layer "
                    "inserted, appended or deleted)")
        for index, block in enumerate(self.blocks):
            held = block.__dict__.get(_BLOCK_ATTR)
            if held is None or held[1] is not self.stream or held[2] != index:
                return (f"{name}.{index} is not the block patch() streamed there (a layer moved, or another put in "
                        "its place)")
        return None

    def current_blocks(self) -> nn.Module | None:
        """The module the model holds where :func:`patch` found its block stack (another ``ModuleList`` where one was
        assigned in its place since), or None (the model gone, or nothing there)."""
        model = self.model_ref()
        if model is None:
            return None
        try:
            return model.get_submodule(self.blocks_name) if self.blocks_name else model
        except AttributeError:
            return None

    def installed(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every module given a forward of patch's that a plan or the stream acts
        through: the blocks first (a block gone takes its layers along, and is what to name), then the fused
        linears and embedding, then the experts modules."""
        blocks = [(prefix[:-1], block) for prefix, block in zip(self.block_prefixes(), self.blocks)]
        return blocks + self.fused_modules + self.fused_experts

    @property
    def driver(self):
        """The live optimizer that writes this model's plans, or None."""
        return self._driver() if self._driver is not None else None

    # -- once per forward -----------------------------------------------------------------------------------------
    def add_forward_hooks(self, before: Callable | None = None, after: Callable | None = None) -> RemovableHandle:
        """Run ``before(module, args)`` at the start of every forward of the model, and ``after(module, args,
        output)`` on its output, once per forward whichever module it starts at: the model itself, or a module below
        it on the way to the block stack (a custom loss's ``model.model(...)``, peft's ``base_model``), which the
        model's own hooks never see.  ``module`` is the module the forward started at.  ``after`` also runs on the
        output of the head called apart from a forward (the same custom loss's ``model.lm_head(hidden)``), whose
        backward reaches it first.  Returns the handle that removes both."""
        handle = RemovableHandle(self.before_forward, extra_dict=self.after_forward)
        if before is not None:
            self.before_forward[handle.id] = before
        if after is not None:
            self.after_forward[handle.id] = after
        return handle

    def begin_forward(self, module: nn.Module, args) -> None:
        """A forward of the model starts at ``module`` (not inside another of its forwards): refuse a model sharded
        after patch (FSDP2's hooks, registered later, run after these: its parameters are still the sharded DTensors
        here) or one whose fused modules were replaced, number the forward
        (:func:`~bread_kernels.plan.begin_forward`) and run the :attr:`before_forward` hooks.  A forward with grad
        that ``torch.func.functional_call`` runs on a model no optimizer drives keeps every block's activations
        (:attr:`~bread_kernels.stream.ThisForward.unrecomputed`: the tensors it swaps in are gone from the modules
        by the backward), as the unpatched model computes; where an optimizer drives, its hook refuses a swap."""
        name = self.shard_probe()
        if name is not None:
            raise TypeError(sharded_refusal("bread_kernels", name))
        grad = torch.is_grad_enabled()
        if grad and (self.stream.suspect_lost is not None or len(self.blocks) != self.stream.n_blocks):
            self.check_forward()  # here too: a block stack swapped whole runs no streamed block; a layer inserted or
            # deleted (no hook sees it) shifts the blocks' places
        # its blocks say what they compute in, which caches they were given, and whether they are recomputed
        self.stream.begin_forward(unrecomputed=grad and self.driver is None and inside_functional_call())
        begin_forward()
        for hook in list(self.before_forward.values()):
            hook(module, args)

    def forget_open_forwards(self) -> None:
        """No forward of the model runs now in this thread (an optimizer steps): forget any a ``KeyboardInterrupt``
        left open (torch calls no forward hook after one), where the frames could not tell
        (:mod:`bread_kernels.open_forwards`); another thread's stay."""
        self.open_forwards.clear()

    @property
    def entered(self) -> list[int]:
        """Where the modules whose forward runs now in this thread lie (0: the model, ``i``: ``entry_modules[i -
        1]``), outermost first, as last recorded (an entry a ``KeyboardInterrupt`` left open is dropped only when
        the next forward or the head asks)."""
        return [entry.depth for entry in self.open_forwards.entries()]

    def end_forward(self, module: nn.Module, args, output) -> None:
        """A forward of the model that started at ``module``, or the head called apart from one, returned
        ``output`` (None where it raised): run the :attr:`after_forward` hooks."""
        self.stream.end_forward()
        for hook in list(self.after_forward.values()):
            hook(module, args, output)


def _check_parameter_dtypes(model: nn.Module) -> None:
    """Refuse a model with a floating parameter the fused functions do not compute in (float64): every training
    forward would fail, at its first fused module.  A quantized weight (fp8: transformers' ``FbgemmFp8Linear`` and
    ``FP8Linear``, which a cast would silently strip of its scale) is no such parameter: its layer keeps its own
    forward (:func:`~bread_kernels.peft_lora.is_linear_layer`) and an optimizer refuses to train it."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype not in FLOAT_DTYPES and quantized_weight(p) is None:
            raise TypeError(f"patch: parameter {name} is {p.dtype}; the fused backward computes in float32, bfloat16 "
                            "or float16. Cast the model first (model.float(), or model.to(torch.bfloat16)), or train "
                            "it unpatched")


@functools.cache
def _dtensor_class() -> type:
    """``torch.distributed.tensor.DTensor``, or a class no tensor is an instance of (a torch without distributed)."""
    if not torch.distributed.is_available():
        return type("NoDTensor", (), {})
    from torch.distributed.tensor import DTensor

    return DTensor


def sharded_parameter(named_parameters) -> str | None:
    """The name of the first parameter that is a ``DTensor`` (sharded by FSDP2's ``fully_shard`` or by tensor
    parallelism), or None."""
    dtensor = _dtensor_class()
    return next((name for name, p in named_parameters if isinstance(p, dtensor)), None)


def _parameter_places(module: nn.Module) -> list[tuple[str, dict, str]]:
    """Where each of ``module``'s parameters lies: (qualified name, the owning module's ``_parameters``,
    attribute)."""
    return [((f"{name}." if name else "") + attr, owner._parameters, attr) for name, owner in module.named_modules()
            for attr, p in owner._parameters.items() if p is not None]


def sharded_refusal(what: str, name: str) -> str:
    return (f"{what}: parameter {name} is a DTensor (sharded by FSDP2's fully_shard, accelerate's or the Trainer's "
            "FSDP, or tensor parallelism); bread_kernels reads and updates whole weights (the fused backward, the "
            "on-the-fly updates) and does not support them. Train sharded with DeepSpeed ZeRO-3 "
            "(bread_kernels.integrations.deepspeed: ZeroBlockOptimizer and initialize), or replicated with "
            "DistributedDataParallel (BAdam); unpatched (bread_kernels.unpatch), BAdam (sgd_mode='disabled') runs "
            "under FSDP2 or tensor parallelism on the reference's slow path")


def _refuse_sharded(model: nn.Module, what: str) -> None:
    name = sharded_parameter(model.named_parameters())
    if name is not None:
        raise TypeError(sharded_refusal(what, name))


def patched_state(model: nn.Module) -> PatchedModel | None:
    return getattr(model, _STATE_ATTR, None)


#: functions that give a parameter's whole shape where its tensor holds less (a ZeRO-3 partitioned parameter is an
#: empty 1-D tensor until gathered), None for any other: the integrations register theirs (the DeepSpeed one on import)
_WHOLE_SHAPE: list[Callable[[torch.Tensor], tuple[int, ...] | None]] = []


def register_whole_shape(whole_shape: Callable[[torch.Tensor], tuple[int, ...] | None]) -> None:
    """Register a function giving a partitioned parameter's whole shape (None for other parameters), by which patch
    weighs the block stacks of a model built partitioned and finds its 3-D expert weights as of one built whole."""
    if whole_shape not in _WHOLE_SHAPE:
        _WHOLE_SHAPE.append(whole_shape)


def whole_shape(p: torch.Tensor) -> torch.Size:
    """``p``'s shape, or its whole shape where a sharding engine keeps less of it (:func:`register_whole_shape`)."""
    for shape_of in _WHOLE_SHAPE:
        shape = shape_of(p)
        if shape is not None:
            return torch.Size(shape)
    return p.shape


def _whole_numel(p: torch.Tensor) -> int:
    """``p``'s number of elements, whole where a sharding engine keeps less of it (:func:`whole_shape`)."""
    return whole_shape(p).numel()


#: every module of :meth:`PatchedModel.installed` -> a weak reference to its patched model's state
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_registration_hook: list = []


def replaced_module_refusal(name: str, patched: str, driven: bool = False) -> str:
    """The error for a patched model (of class ``patched``) whose module ``name`` (a fused layer, an experts module,
    a block) was replaced or removed after patch (:meth:`PatchedModel.find_lost`): no plan reaches what is in its
    place."""
    return (f"bread_kernels: {name} was replaced after patch() (peft's merge_and_unload() or unload(), "
            "resize_token_embeddings, a module assigned in its place or removed)" +
            (" while an optimizer drives the model: the weights in its place would silently stop training "
             "(close the optimizer to train on with plain autograd). "
             if driven else ", so the optimizer's plans cannot reach the module in its place. ") +
            "Merge a trained peft model with bread_kernels.merge_and_unload(model); otherwise unpatch the model "
            f"given to patch() (the {patched}: bread_kernels.unpatch) before changing it, then patch it and build "
            "the optimizer again")


def stack_change_refusal(change: str, patched: str, driven: bool = False) -> str:
    """The error for a patched model (of class ``patched``) whose block stack changed after patch
    (:meth:`PatchedModel.stack_change`)."""
    return (f"bread_kernels: the block stack changed after patch(): {change}" +
            (" while an optimizer drives the model: the cut and the plans count the blocks as patch() found them, so "
             "a block would train under another's role or not at all (close the optimizer to train on with plain "
             "autograd). " if driven else ", so the optimizer's plans and cut would count other blocks than the "
                                                "stream does. ") +
            f"Prune, grow or reorder the layers before patch(), or unpatch the model given to patch() (the {patched}: "
            "bread_kernels.unpatch) before changing them, then patch it and build the optimizer again")


def _register_installed(state: PatchedModel) -> None:
    """Enter ``state``'s modules into :data:`_INSTALLED`, and torch's global module-registration hook (once)."""
    if not _registration_hook:
        _registration_hook.append(nn.modules.module.register_module_module_registration_hook(_note_replaced_modules))
    ref = weakref.ref(state)
    for _, module in state.installed():
        _INSTALLED[module] = ref
    _INSTALLED[state.blocks] = ref  # the stack itself: swapped for a list holding its blocks and more, none is lost


def _note_replaced_modules(parent: nn.Module, name: str, value: nn.Module | None) -> None:
    """torch's global module-registration hook (``setattr`` of a module, ``add_module``, a ``ModuleList`` item, or
    None in its place), run before ``value`` takes the place of ``parent.<name>``: where the module it replaces holds
    one in :data:`_INSTALLED` that ``value`` does not (peft's ``merge_and_unload`` puts each LoRA layer's base layer
    in its place; ``add_adapter`` wraps a fused layer, which stays), its patched model suspects a loss
    (:meth:`PatchedModel.suspect_lost`), which the next look settles: the module may be elsewhere in the model, or
    put back later (a stack swapped for a subset and back), or its model may be what left a holder.  A fresh
    registration (nothing in its place) costs a dictionary read."""
    replaced = parent.__dict__.get("_modules", {}).get(name)
    if replaced is None or replaced is value or not _INSTALLED:
        return None
    kept = None
    for module in replaced.modules():
        ref = _INSTALLED.get(module)
        if ref is None:
            continue
        if kept is None:
            kept = {id(m) for m in value.modules()} if value is not None else set()
        state = ref()
        if id(module) not in kept and state is not None:
            state.suspect_lost()
    return None


def stack_prefixes(name: str, n: int) -> list[str]:
    """The name prefixes of the ``n`` blocks of the stack ``name`` (``""``: the model itself is the stack)."""
    return [f"{name}.{i}." if name else f"{i}." for i in range(n)]


def _is_stack_candidate(module: nn.Module) -> bool:
    """An ``nn.ModuleList`` of two or more modules of one class, or of Hugging Face decoder layers of several
    classes (:func:`_is_hf_layer`: Jamba's attention and Mamba layers, Mllama's self- and cross-attention layers,
    Zamba's hybrid and Mamba layers): a block stack, if it has parameters."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    return len({type(m) for m in module}) == 1 or all(_is_hf_layer(m) for m in module)


def _is_hf_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers layer (its class derives from ``GradientCheckpointingLayer``, the base
    of transformers 5's decoder and encoder layers), read by name so that patch needs no transformers import."""
    return any(cls.__name__ == "GradientCheckpointingLayer" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every block stack of ``model`` (:func:`_is_stack_candidate` with parameters) that lies in no other one's
    blocks, in module order: an encoder-decoder's two stacks, a vision-language model's vision and language layers
    (``patch`` streams the largest, :func:`_find_block_stack`; a block optimizer partitions them all)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if _is_stack_candidate(module) and next(module.parameters(), None) is not None and \
                not any(name.startswith(f"{outer}.") for outer, _ in stacks):
            stacks.append((name, module))
    return stacks


def _find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_size, empty = None, 0, False
    for name, module in model.named_modules():
        if not _is_stack_candidate(module):
            continue
        params = list(module.parameters())
        size = sum(_whole_numel(p) for p in params)
        empty = empty or (bool(params) and size == 0)
        if size > best_size:
            best, best_size = (name, module), size
    if best is None and empty:
        raise ValueError(
            f"patch: the parameters of {type(model).__name__} are empty tensors (a model built partitioned, as "
            "DeepSpeed's zero.Init and from_pretrained under a ZeRO-3 config build it), so no block stack can be "
            "weighed: import bread_kernels.integrations.deepspeed before patch (it tells their sizes), or point "
            "patch at the stack yourself: patch(model, blocks=model.<path>.layers)")
    if best is None:
        raise ValueError(
            f"patch: found no block stack in {type(model).__name__}: searched for an nn.ModuleList of two or more "
            "modules of one class (or of transformers layers) with parameters (like model.layers, transformer.h or "
            "encoder.layer). Point patch at the stack yourself: patch(model, blocks=model.<path>.layers)"
        )
    return best


def _refuse_computed_weight(module: nn.Module, plan: WeightPlan | None, weight: torch.Tensor,
                            what: str = "weight") -> None:
    """Refuse (``RuntimeError``, naming the remedy) a forward with grad of fused ``module`` whose on-the-fly plan
    was written for a parameter that ``module.<what>`` no longer is: a tensor computed from it
    (``torch.nn.utils.prune``, a parametrization, applied after the optimizer wrote its plans).  The update would be
    written into that temporary and lost; the optimizer's next plans leave such a weight to autograd and its hook."""
    if plan is None or not plan.role.updates_on_the_fly or isinstance(weight, nn.Parameter) or \
            not torch.is_grad_enabled():
        return
    raise RuntimeError(
        f"bread_kernels: {module._bread_name}'s {what} is no longer a parameter but a tensor computed from one "
        "(torch.nn.utils.prune, a parametrization) since the optimizer wrote its plans, so its on-the-fly update would "
        "be written into that temporary and lost. Prune or parametrize before building the optimizer (the weight "
        "then trains through autograd and the optimizer's hook), or close the optimizer and build a new one")


def _linear_forward(self, x):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return _plain_linear(x, self.weight, self.bias)
    _refuse_computed_weight(self, plan, self.weight)
    return fused_linear(x, self.weight, self.bias, plan)


def _conv1d_forward(self, x):
    weight = self.weight.t()  # Conv1D computes x @ W + b with W [in, out]
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return _plain_linear(x, weight, self.bias)
    _refuse_computed_weight(self, plan, self.weight)
    return fused_linear(x, weight, self.bias, plan)


def _plain_linear(x, weight, bias):
    """``F.linear`` of a layer without a plan.  Under ``torch.autocast`` a weight that requires grad is cast here,
    not by autocast, which caches its casts of such leaves until the outermost region exits, with no version check:
    a weight that the driver's hook updates in the backward (``hook_update_numel``) would be read as it was by a
    later forward in the same region (a backward, or several, inside one ``autocast`` block)."""
    if weight.requires_grad:
        dtype = autocast_dtype(x.device)
        if dtype is not None:
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
    return F.linear(x, weight, bias)


def _requiring_grad(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[bool, bool]:
    """Whether a LoRA layer's A and B require grad, as its forward found them (a recompute replays them)."""
    return lora_a.requires_grad, lora_b.requires_grad


def _as_in_the_forward(module, adapter: str, trains: tuple[bool, bool], lora_a, lora_b):
    """A and B for a recompute as the forward saw them: detached where they required no grad then (peft's
    ``disable_adapter()`` turns requires_grad on for every active adapter when it exits, the frozen ones too); an
    adapter weight that required grad in the forward and no longer does (``set_adapter()`` to another adapter
    before the backward) cannot be rebuilt: refused, naming the remedy."""
    if any(was and not now for was, now in zip(trains, (lora_a.requires_grad, lora_b.requires_grad))):
        raise RuntimeError(
            f"bread_kernels: LoRA layer {module._bread_name}'s adapter {adapter!r} stopped requiring grad between "
            "this block's forward and its backward (set_adapter() to another adapter before the backward), so the "
            "block's recompute cannot rebuild what its forward saved. Call backward() before switching adapters, "
            "or patch(model, recompute=False) to keep every block's activations instead")
    return (lora_a if trains[0] else lora_a.detach()), (lora_b if trains[1] else lora_b.detach())


def _embedding_forward(self, ids):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return F.embedding(ids, self.weight, self.padding_idx)
    _refuse_computed_weight(self, plan, self.weight)
    return fused_embedding(ids, self.weight, plan, self.padding_idx)


def _lora_forward(self, x, *args, **kwargs):
    plan = getattr(self, PLAN_ATTR)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own
    if not torch.is_grad_enabled():  # evaluation, and blocks below the cut: peft's own, whatever it serves
        return type(self).forward(self, x, *args, **kwargs)
    if self.disable_adapters and self.merged:
        self.unmerge()  # as peft's forward does: the base layer alone, without the merged adapters
    # refuses what the backward cannot do, before it runs; a recompute takes the forward's choice
    adapter = replayed(trained_adapter, self, self._bread_name)
    if args or kwargs:
        raise TypeError(
            f"bread_kernels: the patched LoRA layer {self._bread_name} was called with extra arguments "
            f"({', '.join(kwargs) or len(args)}); in training it takes only the input (peft's mixed-adapter batches, "
            "adapter_names=, are not supported by the fused backward)"
        )
    base = self.get_base_layer()
    _refuse_computed_weight(self, plan, base.weight, "base layer's weight")
    weight = base.weight.t() if Conv1D is not None and isinstance(base, Conv1D) else base.weight
    if adapter is None:  # adapters disabled, merged, or none active: the base layer alone
        return fused_linear(x, weight, base.bias, plan)
    lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    trains = replayed(_requiring_grad, lora_a, lora_b)
    if trains != (lora_a.requires_grad, lora_b.requires_grad):  # a recompute after peft changed them
        lora_a, lora_b = _as_in_the_forward(self, adapter, trains, lora_a, lora_b)
    dropout = self.lora_dropout[adapter]
    x_lora = None
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not
                                                                                         dropout.training))):
        x_lora = dropout(x.to(lora_a.dtype))  # the mask lives in dropout's own autograd node
    return fused_lora_linear(x, x_lora, weight, base.bias, lora_a, lora_b, self.scaling[adapter], plan)


def _rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, rms_norm_epsilon(self))


def _swiglu_mlp_forward(self, x):
    """:func:`~bread_kernels.functions.swiglu.swiglu_mlp`, which computes ``silu``: where the MLP's ``act_fn`` is
    no longer the one patch probed (``mlp.act_fn = nn.GELU()`` after patch), the MLP's own forward."""
    if self.act_fn is not self.__dict__.get(_PROBED_ACT_ATTR):
        return type(self).forward(self, x)
    return swiglu_mlp(self, x)


def _experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    plans = getattr(self, EXPERT_PLANS_ATTR)
    if all(plan is None for plan in plans.values()) or not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)  # transformers'
    if args or kwargs:
        raise TypeError(f"bread_kernels: the patched experts module {self._bread_name} was called with extra "
                        f"arguments ({', '.join(kwargs) or len(args)}); the fused experts take (hidden_states, "
                        "top_k_index, top_k_weights)")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"bread_kernels: the experts module {self._bread_name} is expert-parallel; the "
                                  "fused experts hold every expert on one process (train without expert parallelism)")
    for attr in EXPERT_WEIGHTS:
        _refuse_computed_weight(self, plans[attr], getattr(self, attr), attr)
    grouped = getattr(getattr(self, "config", None), "_experts_implementation", None) == "grouped_mm"
    return fused_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                         tuple(plans[attr] for attr in EXPERT_WEIGHTS), experts_gate(self), autocast_casts=not grouped)


def _experts_modules(root: nn.Module, prefix: str, remapped: set[str] = frozenset()) -> list[tuple[str, nn.Module]]:
    """The experts modules under ``root`` that the fused experts compute; warns about the ones holding 3-D
    weights that they do not (those keep plain autograd), and refuses peft LoRA on parameters."""
    found = []
    for name, module in root.named_modules(prefix=prefix):
        if is_param_wrapper(module):
            raise NotImplementedError(
                f"patch: {name} is a peft LoRA on parameters ({type(module).__name__}, LoraConfig(target_parameters="
                "...); peft's target_modules='all-linear', or a target that peft renames to an expert weight "
                f"({', '.join(sorted(remapped)) or 'none for this model type'}), puts it on a mixture-of-experts "
                "model's experts and router too), which the fused backward does not support: name the linear layers "
                f"in target_modules ({_linear_names(root, remapped)}; the expert weights then take BlockOptimizer's "
                "Roles), or train this model without patch()"
            )
        if not _experts_like(module):
            _warn_unrecognised_experts(name, module)
            continue
        problem = experts_layout_problem(module, shape_of=whole_shape)  # a partitioned one as if built whole
        if problem is None:
            found.append((name, module))
        else:
            warnings.warn(f"patch: {name} ({type(module).__name__}) holds 3-D weights but is not an experts module "
                          f"the fused experts compute: {problem}. It keeps plain autograd (its on-the-fly updates go "
                          "through the hook path, which materialises its whole gradient)", RuntimeWarning,
                          stacklevel=3)
    return found


def _unrecognised_expert_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) of the weights of a mixture-of-experts experts module (transformers names its class
    ``...Experts``) that hold no 3-D weight and are not linear layers' — DBRX's experts, each of ``w1``, ``v1``,
    ``w2`` the E experts' matrices stacked into one 2-D [E·F, H] parameter; empty for any other module (an experts
    module of linear layers, Switch Transformers' and NLLB-MoE's, is fused linear by linear)."""
    if not type(module).__name__.endswith("Experts") or any(_experts_like(m) for m in module.modules()):
        return []
    linear_owned = {id(p) for m in module.modules() if _is_linear_or_quantized(m) or is_lora_layer(m)
                    for p in m.parameters()}
    return [(name, p) for name, p in module.named_parameters() if id(p) not in linear_owned]


def _warn_unrecognised_experts(name: str, module: nn.Module) -> None:
    weights = _unrecognised_expert_weights(module)
    if weights:
        warnings.warn(f"patch: {name} ({type(module).__name__}) is a mixture-of-experts experts module whose weights "
                      f"({', '.join(n for n, _ in weights)}) are neither 3-D gate_up_proj [E, 2I, H] / down_proj "
                      "[E, H, I] nor linear layers, so the fused experts do not compute it. It keeps plain autograd "
                      "(its on-the-fly updates go through the hook path, which materialises each weight's whole "
                      "gradient)", RuntimeWarning, stacklevel=4)


def _linear_names(root: nn.Module, remapped: set[str]) -> list[str]:
    """The distinct last name components of the linear layers under ``root`` (inside peft's LoRA layers too), as a
    ``target_modules`` list names them — less ``remapped`` (:func:`~bread_kernels.peft_lora.peft_remapped_targets`:
    peft turns a target of such a name into LoRA on the experts' parameters, also where it names a linear)."""
    names = {name.rsplit(".", 1)[-1] for name, module in root.named_modules()
             if (is_lora_layer(module) or _is_linear_or_quantized(module)) and name and ".lora_" not in f".{name}"
             and not name.endswith("base_layer")}
    return sorted(names - remapped)


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, ``Conv1D``, or an ``nn.Linear`` subclass that only restates its forward (Falcon's)."""
    return is_linear_layer(module)


def _is_linear_or_quantized(module: nn.Module) -> bool:
    """:func:`_is_linear`, or an ``nn.Linear`` whose weight is quantized: a linear layer to name (a LoRA target, an
    experts module's own linears), though not one the fused linear computes."""
    return _is_linear(module) or (isinstance(module, nn.Linear) and _quantized_weight_of(module) is not None)


def _fusable_linears(root: nn.Module, prefix: str, unfused: list | None = None) -> list[tuple[str, nn.Module]]:
    """The LoRA layers and plain linears under ``root`` (a fused LoRA layer's base layer and adapters are part of it;
    a LoRA layer over a base the fused linear does not compute, a quantized one, keeps peft's forward, and its
    adapters are plain linears); ``unfused`` collects the (name, module) of each ``nn.Linear`` subclass that
    computes something else, or whose weight is quantized."""
    found, inside_lora = [], []
    for name, module in root.named_modules(prefix=prefix):
        if any(name.startswith(f"{lora}.") for lora in inside_lora):
            continue
        if fusable_lora_layer(module):
            check_lora_layer(name, module)
            inside_lora.append(name)
            found.append((name, module))
        elif _is_linear(module):
            found.append((name, module))
        elif isinstance(module, nn.Linear) and unfused is not None:
            unfused.append((name, module))
    return found


def _quantized_weight_of(module: nn.Module) -> str | None:
    """How ``module.weight`` is stored where it is quantized (:func:`~bread_kernels.quantized.quantized_weight`)."""
    weight = getattr(module, "weight", None)
    return quantized_weight(weight) if isinstance(weight, torch.Tensor) else None


def _warn_unfused_linears(unfused: list[tuple[str, nn.Module]]) -> None:
    """Say which ``nn.Linear`` layers in the blocks keep plain autograd: quantized ones (bitsandbytes', torchao's,
    quanto's, fp8: their weights can only stay frozen), and subclasses whose forward is not ``x·Wᵀ + b`` (a router
    returning its top-k, a layer with an fp32 output, ...)."""
    quantized, other = [], []
    for name, module in unfused:
        stored = _quantized_weight_of(module)
        (quantized if stored is not None else other).append((name, module, stored))
    if quantized:
        classes = sorted({type(module).__name__ for _, module, _ in quantized})
        name, _, stored = quantized[0]
        warnings.warn(f"patch: {len(quantized)} quantized linear layer(s) in the blocks ({', '.join(classes)}; "
                      f"{name}: weight {stored}, ...) keep their own forward and plain "
                      "autograd: their weights can only stay frozen (an optimizer refuses to train them), LoRA "
                      "adapters over them train", RuntimeWarning, stacklevel=3)
    if other:
        classes = sorted({type(module).__name__ for _, module, _ in other})
        warnings.warn(f"patch: {len(other)} nn.Linear subclass layer(s) in the blocks ({', '.join(classes)}; "
                      f"{other[0][0]}, ...) do not compute a plain x·Wᵀ + b and keep plain autograd: their "
                      "on-the-fly updates go through the hook path, which materialises each one's whole gradient",
                      RuntimeWarning, stacklevel=3)


def _warn_linears_read_outside(read_outside: dict[str, str]) -> None:
    """Say which linears in the blocks keep plain autograd because the model's code computes with their weight
    outside their forward (:mod:`bread_kernels.weight_readers`: Mamba's ``dt_proj``), where a fused forward would
    never run and an on-the-fly update of theirs would silently never be applied."""
    if not read_outside:
        return
    name, reader = next(iter(read_outside.items()))
    warnings.warn(f"patch: the model's code computes with the weight of {len(read_outside)} linear layer(s) in the "
                  f"blocks outside their own forward, on some path ({name}: {reader}; ...), where a fused forward "
                  "would never run, so they keep plain autograd: their on-the-fly updates go through the hook path, "
                  "which materialises each one's whole gradient, as the reference does", RuntimeWarning, stacklevel=3)


def _warn_unfused_embedding(name: str, embedding: nn.Module) -> None:
    """Say that the untied input embedding ``name`` keeps plain autograd, and why (:func:`_why_unfused_embedding`):
    its on-the-fly update materialises the whole [vocab, hidden] gradient."""
    warnings.warn(f"patch: the input embedding {name} ({type(embedding).__name__}) keeps plain autograd: "
                  f"{_why_unfused_embedding(embedding)}, which the fused embedding does not reproduce. An on-the-fly "
                  "update of it (sgd_mode='all') goes through the hook path, which materialises its whole [vocab, "
                  "hidden] gradient, as the reference does", RuntimeWarning, stacklevel=3)


def _why_unfused_embedding(embedding: nn.Module) -> str:
    """Why :func:`~bread_kernels.functions.embedding.fusable_embedding` turns ``embedding`` down: peft's wrapper
    around it (LoRA on ``embed_tokens``, ``modules_to_save``), a subclass with its own forward (the scaled word
    embeddings of Gemma3, BART or XGLM multiply the rows by ``embed_scale``), ``max_norm``, ``scale_grad_by_freq``,
    ``sparse``, or no ``nn.Embedding`` at all."""
    wrapped = peft_wrapping(embedding)
    if wrapped is not None:
        return wrapped
    if not isinstance(embedding, nn.Embedding):
        return "it is not an nn.Embedding"
    if type(embedding).forward is not nn.Embedding.forward:
        return "it is a subclass of nn.Embedding with its own forward"
    stored = quantized_weight(embedding.weight)
    if stored is not None:
        return f"its weight is quantized ({stored})"
    options = [option for option, on in (("max_norm", embedding.max_norm is not None),
                                         ("scale_grad_by_freq", embedding.scale_grad_by_freq),
                                         ("sparse", embedding.sparse)) if on]
    return f"it is built with {' and '.join(options)}" if options else "it is not the plain nn.Embedding it serves"


def _warn_unfused_head(name: str, head: nn.Module) -> None:
    """Say that the output head ``name`` keeps plain autograd (not a linear layer or a peft LoRA layer: peft's
    ``modules_to_save`` wraps it in a ``ModulesToSaveWrapper`` holding the original and a trained copy): neither the
    fused linear nor the fused head+loss serves it, so its on-the-fly update materialises the whole [vocab, hidden]
    gradient and the loss its [tokens, vocab] fp32 logits."""
    wrapping = peft_wrapping(head)
    why = f" ({wrapping})" if wrapping is not None else ""
    warnings.warn(f"patch: the output head {name} ({type(head).__name__}) is not a linear layer patch fuses{why}, "
                  "so it keeps plain autograd and the fused head+loss "
                  "does not run: an on-the-fly update of it (sgd_mode='all') goes through the hook path, which "
                  "materialises its whole [vocab, hidden] gradient, and the loss its fp32 logits, as the reference "
                  "does. On a peft model, train the head through LoRA instead (target_modules=[..., 'lm_head']), "
                  "which patch fuses", RuntimeWarning, stacklevel=3)


def patch(model: nn.Module, *, blocks: nn.ModuleList | None = None, recompute: bool = True,
          fused_loss: bool | None = None, keep_top: int | str = "auto", fused_elementwise: bool = True,
          hook_update_numel: int | None = None) -> nn.Module:
    """Install the fused backward on ``model`` (in place) and return it.  Calling it again is harmless (and
    changes ``recompute``, ``fused_loss``, ``keep_top``, ``fused_elementwise`` and ``hook_update_numel`` to the
    values given).

    Args:
        blocks: the stack of repeated blocks, if discovery cannot find it (``model.model.layers``).
        recompute: save only each block's input and recompute it in the backward (like gradient checkpointing);
            ``False`` keeps activations.
        fused_loss: on a causal LM (:data:`bread_kernels.causal_lm.FAMILIES`), a forward given ``labels`` with grad
            enabled computes the loss with the fused head+loss (:mod:`bread_kernels.functions.head_loss`): no
            [tokens, vocab] logits, and the head's Role done inside it; it then returns ``logits=None`` (a forward
            without labels, or without grad, returns the logits as ever).  ``None`` (the default): wherever the
            model and the step allow it, the model's own head and loss elsewhere (another family, a custom loss, a
            ZeRO-3-partitioned head: see :mod:`bread_kernels.causal_lm`); ``True``: required, refused with an error
            where it cannot match; ``False``: never (the model's own head, with the fused linear backward, and its
            logits).
        keep_top: with ``recompute``, the number of top blocks that keep their activations instead of being
            recomputed.  The top block's backward runs first, right after the loss's: keeping it saves one block's
            forward per step, for one block's activations alive while the head and the loss run.  ``"auto"`` (the
            default), in a forward whose loss is the fused head+loss (which then holds no more than the hidden
            states' size): the top block — the step's peak stays that of a recomputed block's backward — and as
            many more top blocks as the memory the fused loss does not hold pays for (the fp32 log-softmax, its
            gradient and the log-softmax's backward result that the model's own loss holds at its peak: ``T·V·12``
            bytes), shared with the larger of what the fused loss holds beside the kept blocks and what the top
            block's backward allocates (see :class:`~bread_kernels.stream.StreamConfig`); each kept block's
            activations measured, the count growing by at most one block per step and starting again from the top
            block when the plans change; elsewhere none (measured in the README's "Speed" section).  0 recomputes
            every block; ``k`` keeps the top ``k`` (each beyond the first adds one block's activations to the
            peak).
        fused_elementwise: compute every Llama-style RMSNorm (the blocks' and the final one), SwiGLU MLP and
            rotary embedding of the model with this library's Functions: the same values and gradients as
            autograd's, bit for bit (on a GPU, whose Triton kernels sum a norm's rows in another order: to fp32
            rounding; ``BREAD_ELEMENTWISE=torch`` keeps torch's ops there), from less saved memory (no fp32 copy of a norm's input, no ``silu(a)``: a bf16
            Llama block saves about a third less) and fewer ops.  ``False`` leaves them as they are.
        hook_update_numel: a block's plain linear whose weight has at most this many elements takes an on-the-fly
            role (SGD/SIGN) the way the reference does: autograd materialises its dW (at most this many elements,
            one weight at a time) and a post-accumulate-grad hook of the driver applies the update, with the same
            rule and finiteness flag; a non-finite gradient is skipped and reported per parameter, as the reference's
            hooks do (a bias on its own, where the fused update skips weight and bias together).  On such a small
            weight the fused function's Python costs more host time than the dW it avoids costs memory traffic:
            ~110 µs a weight and step on a CPU, where a tiny (host-bound) model's BREAD-SGD and sign steps ran 8-13%
            faster (the partial variants' 3-4%).  In bf16/fp16 the update then uses autograd's dW rounded to the
            weight's dtype, as the reference's hook does.  A kept block (``keep_top``) saves a hooked layer's input
            itself, not what rebuilds it.  ``None`` (the default): ``BREAD_HOOK_UPDATE_NUMEL`` if set, else
            :data:`DEFAULT_HOOK_UPDATE_NUMEL` (2¹⁷); 0 fuses every update.  Read when an optimizer writes its plans
            (at each block switch).  Under DeepSpeed ZeRO-3 and under
            :func:`~bread_kernels.accelerate` (whose library applies the hook updates) every update stays fused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected a torch.nn.Module, got {type(model).__name__}")
    _check_options(blocks, recompute, fused_loss, fused_elementwise, "patch")
    hook_update_numel = _check_hook_update_numel(hook_update_numel)
    _check_parameter_dtypes(model)
    _refuse_sharded(model, "patch")
    offloaded = offloaded_parameter(model)
    if offloaded is not None:
        raise ValueError(offload_refusal("patch", offloaded))
    state = patched_state(model)
    if state is not None:
        if state.model_ref() is not model:  # a wrapper's attributes read through to the model it wraps
            _refuse_unfused_layers_of_wrapper(model, state)
        if blocks is not None and blocks is not state.blocks:
            raise ValueError("patch: this model is already patched with another block stack; unpatch it first")
        keep_top = _check_keep_top(keep_top, len(state.blocks))
        _set_fused_loss(model, fused_loss, state)  # first: a refusal leaves everything as it was
        state.stream.recompute = recompute
        state.fused_loss = fused_loss
        state.stream.keep_top = keep_top
        state.hook_update_numel = hook_update_numel
        _set_fused_elementwise(model, fused_elementwise, state)
        return model
    if fused_loss:
        causal_lm.prepare(model)  # refuse before anything on the model is touched

    if blocks is None:
        blocks_name, blocks = _find_block_stack(model)
    else:
        names = [n for n, m in model.named_modules() if m is blocks]
        if not names:
            raise ValueError("patch: blocks= is not a submodule of this model")
        blocks_name = names[0]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except NotImplementedError:
        head = None

    keep_top = _check_keep_top(keep_top, len(blocks))
    _refuse_blocks_streamed_elsewhere(model, blocks_name, blocks)
    state = PatchedModel(model, blocks, blocks_name, embedding, head, recompute, fused_loss)
    state.stream.keep_top, state.stream.n_blocks = keep_top, len(blocks)
    state.hook_update_numel = hook_update_numel
    state.shared_weights = _shared_weight_ids(model)
    state.shard_probes = _parameter_places(model)

    _strip_copied_forwards(model, None)  # a copy of a part of a patched model carries its forwards: patched afresh
    targets: list[tuple[str, nn.Module, int | None]] = []
    experts: list[tuple[str, nn.Module]] = []
    unfused: list[tuple[str, nn.Module]] = []
    remapped = peft_remapped_targets(model)  # for the refusal of peft's LoRA on parameters
    read_outside: dict[str, str] = {}
    for index, block in enumerate(blocks):  # everything is found (and refused) before anything is installed
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        linears = _fusable_linears(block, prefix, unfused)
        read_outside.update(linears_read_outside(block, prefix, linears))
        targets += [(name, module, index) for name, module in linears if name not in read_outside]
        experts += _experts_modules(block, prefix, remapped)
    _warn_unfused_linears(unfused)
    _warn_linears_read_outside(read_outside)
    if head is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        if _is_linear(head) or fusable_lora_layer(head):
            targets += [(name, module, None) for name, module in _fusable_linears(head, head_name)][:1]
        elif any(True for _ in head.parameters()):
            _warn_unfused_head(head_name, head)

    for name, module, index in targets:
        setattr(module, PLAN_ATTR, None)
        module._bread_name = name
        if is_lora_layer(module):
            forward = _lora_forward
        else:
            forward = _conv1d_forward if Conv1D is not None and isinstance(module, Conv1D) else _linear_forward
        install_forward(module, forward)
        state.fused_modules.append((name, module))
        if index is not None:
            state.block_of_linear[id(module)] = index

    for name, module in experts:
        setattr(module, EXPERT_PLANS_ATTR, dict.fromkeys(EXPERT_WEIGHTS))
        module._bread_name = name
        install_forward(module, _experts_forward)
        state.fused_experts.append((name, module))

    if embedding is not None and id(getattr(embedding, "weight", None)) not in state.shared_weights:
        name = next(n for n, m in model.named_modules() if m is embedding)
        if fusable_embedding(embedding):
            setattr(embedding, PLAN_ATTR, None)
            embedding._bread_name = name
            install_forward(embedding, _embedding_forward)
            state.fused_modules.append((name, embedding))
        else:
            _warn_unfused_embedding(name, embedding)

    for index, block in enumerate(blocks):
        turn_off_hf_checkpointing(block)  # HF's own checkpointing: ours replaces it
        own = block.forward
        if getattr(own, "__self__", None) is block:  # the class's forward: kept unbound (a bound one is a cycle)
            own = _Unbound(own.__func__)
        setattr(block, _BLOCK_ATTR, (own, state.stream, index))
        install_forward(block, _streamed_forward)
    _set_fused_loss(model, fused_loss, state)
    _set_fused_elementwise(model, fused_elementwise, state)
    _install_entry_hooks(model, state)
    setattr(model, _STATE_ATTR, state)
    _PATCHED_MODELS.add(model)
    _register_installed(state)
    _register_entries(state)
    return model


def _refuse_blocks_streamed_elsewhere(model: nn.Module, blocks_name: str, blocks: nn.ModuleList) -> None:
    """Refuse (``ValueError``, naming the remedy) a block stack holding a block that another live patched model
    streams: a second stream over the first one's would hand the first a tuple of arguments for hidden states.
    ``model`` is part of that model (``patch(model.model)``, or the model peft's ``merge_and_unload()`` returned from
    a patched peft model), or shares the block with it.  A deep copy of a patched block streams under no live model
    (:meth:`PatchedModel.__deepcopy__` registers only a whole model's copy): it is patched afresh."""
    for index, block in enumerate(blocks):
        if _BLOCK_ATTR not in block.__dict__:
            continue
        owner = _INSTALLED.get(block)
        state = owner() if owner is not None else None
        other = state.model_ref() if state is not None else None
        if other is None or not any(b is block for b in state.blocks):
            continue
        name = f"{blocks_name}.{index}" if blocks_name else str(index)
        if any(m is model for m in other.modules()):
            raise ValueError(f"patch: {name} is a block of the patched {type(other).__name__}, which this "
                             f"{type(model).__name__} is part of (a submodule of a patched model, or the model peft's "
                             "merge_and_unload() or unload() returned from a patched peft model); call "
                             f"bread_kernels.unpatch(model) first (it unpatches the {type(other).__name__}), then "
                             "patch(model)")
        raise ValueError(f"patch: {name} is a block of the patched {type(other).__name__}, another model, and a block "
                         "is streamed by one patched model only: give this model a copy of it (copy.deepcopy), or "
                         f"unpatch the {type(other).__name__} first (bread_kernels.unpatch)")


def enclosing_patched_model(module: nn.Module) -> nn.Module | None:
    """The live patched model that ``module`` lies on the way to the blocks of (its base model ``model.model``, or
    the model peft's ``merge_and_unload()`` / ``unload()`` returned from a patched peft model), or None."""
    ref = _ENTRIES.get(module)
    state = ref() if ref is not None else None
    if state is None or not any(entry is module for entry in state.entry_modules):
        return None
    return state.model_ref()


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """The ids of the parameters that more than one module owns (a head tied to the embedding)."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, n in owners.items() if n > 1}


@torch.compiler.disable  # a graph break under torch.compile, where the stream's own (disabled) forward is one anyway
def _streamed_forward(self, *args, **kwargs):
    """A block's forward under the stream.  What it needs (the block's own forward, the stream, its index) is an
    attribute of the block, not a closure's or a keyword default's: ``copy.deepcopy`` maps an attribute to the copy's
    (its own bound forward and stream) where a closure would keep the original's; and dynamo caches each traced
    function's defaults in a ``WeakKeyDictionary`` keyed by the function, where a default that reaches the block
    would keep the model alive for good."""
    original, config, index = self.__dict__[_BLOCK_ATTR]
    if type(original) is _Unbound:
        original = types.MethodType(original.function, self)
    return streamed_block_forward(self, original, config, index, *args, **kwargs)


#: the functions patch installs as a module's forward (:func:`_strip_copied_forwards` tells them by these)
_PATCH_FORWARDS = frozenset({_linear_forward, _conv1d_forward, _lora_forward, _embedding_forward, _experts_forward,
                             _rms_norm_forward, _swiglu_mlp_forward, _streamed_forward, marked_rotary_forward})


class _Unbound(NamedTuple):
    """A block's own forward before patch, kept as its function: bound to the block, from the block's own
    ``__dict__``, it would make a reference cycle (the model then freed only by the cycle collector)."""

    function: Callable


#: each module a forward of a patched model may start at (the model, :attr:`PatchedModel.entry_modules`, the head)
#: -> its patched state, weakly (for a deep copy of the model, its copy's: :meth:`PatchedModel.__deepcopy__`)
_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
#: each module of :data:`_ENTRIES` by the id of its forward pre-hooks' dict, which a shallow copy of it shares
#: (accelerate's ``compile_regions`` copies the model and the modules on the way to its blocks so): a forward of the
#: copy's ``model.model`` is a forward of the original's (:func:`_entry`)
_ENTRIES_BY_HOOKS: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()


def entry_modules(model: nn.Module, blocks_name: str) -> list[nn.Module]:
    """The modules strictly between ``model`` and its block stack (named ``blocks_name``), outermost first: each
    one's forward may run the blocks without the model's (``model.model`` of a causal LM, GPT-2's ``transformer``,
    a peft model's ``base_model``, ``base_model.model`` and ``base_model.model.model``)."""
    parts = blocks_name.split(".")[:-1] if blocks_name else []
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(1, len(parts) + 1)]


def _install_entry_hooks(model: nn.Module, state: PatchedModel) -> None:
    """Give the model and each of its entry modules the hooks that start and end a forward
    (:func:`_enter_forward`, :func:`_leave_forward`: module-level functions, so no closure holds the model or copies
    along with it), and the head the hook on its output called apart (:func:`_head_output`).  The end hook is
    called even where the forward raised an ``Exception`` (torch's ``always_call``); a forward a ``KeyboardInterrupt``
    left open is found stale by its frame at the next entry (:mod:`bread_kernels.open_forwards`)."""
    state.entry_modules = entry_modules(model, state.blocks_name)
    for module in (model, *state.entry_modules):
        state.entry_handles.append(module.register_forward_pre_hook(_enter_forward))
        state.entry_handles.append(module.register_forward_hook(_leave_forward, always_call=True))
    if state.head is not None:
        state.entry_handles.append(state.head.register_forward_hook(_head_output))
    for embedding in _input_embeddings(model):
        state.entry_handles += note_embedding_outputs(embedding)


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embeddings of ``model`` and of each of its submodules that has them (a vision-language model's
    vision tower), as Hugging Face's ``enable_input_require_grads`` finds the modules it hooks."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Module):
            found.setdefault(id(embedding), embedding)
    return list(found.values())


def _entry_points(state: PatchedModel) -> list[nn.Module]:
    """The modules whose hooks :func:`_install_entry_hooks` installs: the model, its entry modules, its head."""
    return [m for m in (state.model_ref(), *state.entry_modules, state.head) if m is not None]


def _register_entries(state: PatchedModel) -> None:
    """Enter the model of ``state``, its entry modules and its head into :data:`_ENTRIES`."""
    ref = weakref.ref(state)
    for module in _entry_points(state):
        _ENTRIES[module] = ref
        hooks = module.__dict__.get("_forward_pre_hooks")  # none yet in a module a deep copy is still filling
        if hooks is not None:
            _ENTRIES_BY_HOOKS[id(hooks)] = module


def _entry(module: nn.Module) -> tuple[PatchedModel | None, nn.Module]:
    """The patched state whose forward may start at ``module`` (None: a deep copy of a part of the model, whose hooks
    copied along and do nothing; a replica ``nn.DataParallel`` made), and the module of that state ``module`` is:
    itself, or the original of a shallow copy of it (one sharing its hooks, as ``compile_regions`` makes)."""
    ref = _ENTRIES.get(module)
    if ref is None:
        original = _ENTRIES_BY_HOOKS.get(id(module._forward_pre_hooks))
        if original is None or original._forward_pre_hooks is not module._forward_pre_hooks or \
                module.__dict__.get("_is_replica", False):
            return None, module
        ref, module = _ENTRIES.get(original), original
    return (ref() if ref is not None else None), module


def _entry_depth(state: PatchedModel, module: nn.Module) -> int:
    """Where ``module`` lies on the way from the model to its blocks: 0 for the model, ``i`` for
    ``state.entry_modules[i - 1]``."""
    return 0 if module is state.model_ref() else \
        1 + next(i for i, entry in enumerate(state.entry_modules) if entry is module)


# The entry hooks are torch.compiler.disable'd themselves (~1 µs a call in eager, five to nine calls a forward), not
# plain functions that route through a disabled one under torch.compiler.is_compiling() as fused_linear does: dynamo
# then compiles the hook's own frame where the forward resumes after the graph break, guarding on its arguments (the
# module, the output's type), and a training loop with evaluations hit the recompile limit there (test_compile.py).
@torch.compiler.disable  # host-side bookkeeping: never traced into a graph
def _enter_forward(module, args) -> None:
    """The forward pre-hook of a patched model and of its entry modules: starts a forward of the model
    (:meth:`PatchedModel.begin_forward`) unless a module above ``module`` runs its forward in this thread (the
    model's forward calling ``model.model``).  A forward that a ``KeyboardInterrupt`` left open (torch then calls no
    forward hook) is dropped here, found by its frame no longer running; a forward in another thread is not this
    one's outer forward: each thread has its own (:class:`~bread_kernels.open_forwards.OpenForwards`)."""
    state, module = _entry(module)
    if state is None:
        _refuse_data_parallel_replica(module)
        return
    if not state.open_forwards.open(_entry_depth(state, module), sys._getframe()):
        state.begin_forward(module, args)


@torch.compiler.disable  # host-side bookkeeping: never traced into a graph
def _leave_forward(module, args, output) -> None:
    """The forward hook of a patched model and of its entry modules (also where the forward raised an
    ``Exception``: ``output`` None): ends the forward that started at ``module`` (:meth:`PatchedModel.end_forward`)."""
    state, module = _entry(module)
    if state is not None and state.open_forwards.close(_entry_depth(state, module), sys._getframe()):
        state.end_forward(module, args, output)


@torch.compiler.disable  # host-side bookkeeping: never traced into a graph
def _head_output(module, args, output) -> None:
    """The forward hook of a patched model's head: called apart from a forward of the model (a custom loss's
    ``model.lm_head(model.model(...).last_hidden_state)``), its output is the forward's too
    (:meth:`PatchedModel.end_forward`); inside one that runs in this thread, the model's output covers it."""
    state, module = _entry(module)
    if state is not None and not state.open_forwards.running(sys._getframe()):
        state.end_forward(module, args, output)


def _refuse_data_parallel_replica(module: nn.Module) -> None:
    """Refuse the forward of a replica ``nn.DataParallel`` made of a patched model (or of a module on the way to its
    blocks) for a device of its own: a shallow copy, run in a thread of its own, whose fused layers' forwards are
    bound (weakly) to the original modules, so they would compute with the first device's weights, and write the
    on-the-fly updates there, from each replica's gradient; no forward of it is numbered, guarded or averaged."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "bread_kernels: a patched model runs under torch.nn.DataParallel on several devices, which the engine "
            "does not support: the replicas' fused layers are bound to the original modules (they would compute "
            "with the first device's weights and update them from each replica's gradient on its own). Use "
            "DistributedDataParallel (torchrun; the optimizer averages the on-the-fly updates over the ranks), or "
            "one device (DataParallel over one device runs the model itself)")


def _set_fused_loss(model: nn.Module, fused_loss: bool | None, state: PatchedModel) -> None:
    """Install (required or where it can) or remove the fused-loss forward, as ``fused_loss`` asks.  ``install``
    checks before it changes anything, so a refusal of ``fused_loss=True`` leaves a model as it was."""
    if fused_loss is False:
        causal_lm.uninstall(model)
        return
    try:
        causal_lm.install(model, required=bool(fused_loss), stream=state.stream)
    except ValueError:
        if fused_loss:
            raise
        causal_lm.uninstall(model)  # None on a model the fused loss cannot match: its own head and loss


def _set_fused_elementwise(model: nn.Module, enabled: bool, state: PatchedModel) -> None:
    """Install the fused forward on every RMSNorm, SwiGLU MLP and rotary embedding it computes exactly
    (``enabled``), or remove it.  Installed already: nothing is probed again."""
    if enabled and state.fused_elementwise:
        return
    for _, module in state.fused_elementwise:
        if uses_rotary_embedding(module):
            uninstall_fused_rotary(module)
        else:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_PROBED_ACT_ATTR, None)
    state.fused_elementwise = []
    if not enabled:
        return
    kernelized = bool(getattr(model, "use_kernels", False))  # the `kernels` library's hub rotary: the user's choice
    for name, module in model.named_modules():
        if "forward" in module.__dict__:  # another library's instance forward (accelerate's hooks): left as it is
            continue
        forward = _rms_norm_forward if fusable_rms_norm(module) else \
            _swiglu_mlp_forward if fusable_swiglu_mlp(module) else None
        if forward is not None:
            install_forward(module, forward)
            if forward is _swiglu_mlp_forward:  # in __dict__, not registered: no submodule of the MLP's
                module.__dict__[_PROBED_ACT_ATTR] = module.act_fn
            state.fused_elementwise.append((name, module))
        elif not kernelized and uses_rotary_embedding(module) and install_fused_rotary(module):
            state.fused_elementwise.append((name, module))


def check_patch_options(options, what: str) -> None:
    """Refuse ``patch_options`` (given to a library that patches the model later: ``accelerate``, the Trainer's
    callbacks) that :func:`patch` would refuse whatever the model: not a mapping of its keywords, or a value of the
    wrong type or range (``keep_top`` against the model's blocks, ``blocks`` against its modules: at the patch)."""
    if not isinstance(options, Mapping):
        raise TypeError(f"{what}: patch_options must be a dict of bread_kernels.patch's keywords, got "
                        f"{type(options).__name__}")
    unknown = sorted(set(options) - set(_PATCH_KEYWORDS))
    if unknown:
        raise TypeError(f"{what}: unknown patch option(s) {unknown}; bread_kernels.patch takes "
                        f"{', '.join(_PATCH_KEYWORDS)}")
    _check_options(options.get("blocks"), options.get("recompute", True), options.get("fused_loss"),
                   options.get("fused_elementwise", True), what)
    _check_keep_top(options.get("keep_top", "auto"), None, what)
    if options.get("hook_update_numel") is not None:
        _check_hook_update_numel(options["hook_update_numel"])


def check_patch_of(model: nn.Module, options, what: str) -> None:
    """Refuse (touching nothing) ``patch_options`` that :func:`patch` would refuse for ``model`` (patched now or
    not): besides :func:`check_patch_options`, ``fused_loss=True`` for a model the fused loss cannot match,
    ``blocks=`` that is not a submodule of it, a ``keep_top`` past its blocks.  For a caller that closes something
    (a previous owner of the parameters, which may unpatch the model) before it patches."""
    check_patch_options(options, what)
    if options.get("fused_loss"):
        causal_lm.prepare(model)
    blocks, state = options.get("blocks"), patched_state(model)
    if blocks is not None and not any(m is blocks for m in model.modules()):
        raise ValueError(f"{what}: patch_options' blocks= is not a submodule of this model")
    if blocks is None:
        blocks = state.blocks if state is not None else _find_block_stack(model)[1]
    _check_keep_top(options.get("keep_top", "auto"), len(blocks), what)


#: :func:`patch`'s keywords, read from its signature (one list: a keyword added there is an option here)
_PATCH_KEYWORDS = tuple(name for name, parameter in inspect.signature(patch).parameters.items()
                        if parameter.kind is inspect.Parameter.KEYWORD_ONLY)


def _check_options(blocks, recompute, fused_loss, fused_elementwise, what: str) -> None:
    """The checks of :func:`patch`'s keywords that need no model (``keep_top``'s needs its blocks)."""
    if fused_loss is not None and not isinstance(fused_loss, bool):
        raise TypeError(f"{what}: fused_loss must be None (where it can), True or False, got {fused_loss!r}")
    if not isinstance(fused_elementwise, bool):
        raise TypeError(f"{what}: fused_elementwise must be True or False, got {fused_elementwise!r}")
    if not isinstance(recompute, bool):
        raise TypeError(f"{what}: recompute must be True or False, got {recompute!r}")
    if blocks is not None and (not isinstance(blocks, nn.ModuleList) or len(blocks) == 0):
        raise TypeError(f"{what}: blocks= must be a non-empty nn.ModuleList of the model's repeated blocks")


def _check_keep_top(keep_top, n_blocks: int | None, what: str = "patch") -> int | str:
    """``keep_top`` if it is ``"auto"`` or an int in [0, ``n_blocks``] (>= 0 where the blocks are not known yet)."""
    if isinstance(keep_top, str) and keep_top == "auto":
        return keep_top
    if isinstance(keep_top, bool) or not isinstance(keep_top, int) or keep_top < 0 or \
            (n_blocks is not None and keep_top > n_blocks):
        allowed = f"an int in [0, {n_blocks}]" if n_blocks is not None else "an int >= 0"
        raise ValueError(f"{what}: keep_top must be 'auto' or {allowed} (the number of top blocks that keep their "
                         f"activations), got {keep_top!r}")
    return keep_top


def hook_update_numel_default() -> int:
    """``patch(hook_update_numel=None)``'s value: ``BREAD_HOOK_UPDATE_NUMEL`` if set, else
    :data:`DEFAULT_HOOK_UPDATE_NUMEL`."""
    configured = os.environ.get(_HOOK_UPDATE_NUMEL_ENV)
    if configured is None:
        return DEFAULT_HOOK_UPDATE_NUMEL
    try:
        value = int(configured)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{_HOOK_UPDATE_NUMEL_ENV} must be a number of elements >= 0 (0 fuses every on-the-fly "
                         f"update), got {configured!r}")
    return value


def _check_hook_update_numel(hook_update_numel) -> int:
    if hook_update_numel is None:
        return hook_update_numel_default()
    if isinstance(hook_update_numel, bool) or not isinstance(hook_update_numel, numbers.Integral) or \
            hook_update_numel < 0:
        raise ValueError(f"patch: hook_update_numel must be None (the default) or a number of weight elements >= 0 "
                         f"(0 fuses every on-the-fly update), got {hook_update_numel!r}")
    return int(hook_update_numel)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules (trained values kept; same ``state_dict`` keys).  Harmless if not patched.

    The optimizer driving the model (a :class:`~bread_kernels.BlockOptimizer`) is closed first: its plans, cut
    and hooks belong to the engine removed here.  Given a module on the way from a patched model to its blocks (its
    base model, or the model peft's ``merge_and_unload()`` / ``unload()`` returned from a patched peft model, whose
    modules carry the peft model's patch), it unpatches that patched model, and returns ``model``."""
    state = patched_state(model)
    if state is None:
        enclosing = enclosing_patched_model(model)
        if enclosing is not None:
            unpatch(enclosing)
        return model
    # a wrapper of the patched model (peft's, around a model patched before it) unpatches the model it wraps, and
    # is what is returned (``model = unpatch(model)`` keeps the wrapper)
    given, model = model, state.model_ref() or model
    driver = state.driver
    if driver is not None:  # its plans and hooks belong to the wrappers removed here
        state.drive(None)  # first: a driver whose close() unpatches the model (accelerate's) finds it undriven
        driver.close()
        if patched_state(model) is None:
            return given
    for _, module in state.installed():
        _INSTALLED.pop(module, None)
    _INSTALLED.pop(state.blocks, None)
    causal_lm.uninstall(model)
    _set_fused_elementwise(model, False, state)
    for _, module in state.fused_modules + state.fused_experts:
        for attr in ("forward", PLAN_ATTR, EXPERT_PLANS_ATTR, "_bread_name"):
            module.__dict__.pop(attr, None)
    for block in state.blocks:
        block.__dict__.pop("forward", None)
        block.__dict__.pop(_BLOCK_ATTR, None)
        if block.__dict__.pop(CHECKPOINTING_TURNED_OFF, False):
            block.gradient_checkpointing = True
        _strip_copied_forwards(block, state)
    current = state.current_blocks()
    if current is not None and current is not state.blocks:  # a stack assigned anew (a copied layer put into it)
        for block in current:
            _strip_copied_forwards(block, state)
    for handle in state.entry_handles:
        handle.remove()
    state.entry_handles = []
    for module in _entry_points(state):
        _ENTRIES.pop(module, None)
        if _ENTRIES_BY_HOOKS.get(id(module._forward_pre_hooks)) is module:
            del _ENTRIES_BY_HOOKS[id(module._forward_pre_hooks)]
    delattr(model, _STATE_ATTR)
    _PATCHED_MODELS.discard(model)
    return given


def _strip_copied_forwards(block: nn.Module, state: PatchedModel | None) -> None:
    """Remove from ``block``'s modules the forwards of patch's that no list of ``state`` holds: those of a deep copy
    of a patched block or layer put into the stack after patch (depth up-scaling, ``layers.append(copy.deepcopy(
    layers[0]))``, or a ``ModuleList`` assigned in the stack's place), which carry the copied forwards along
    (design invariant 5: after :func:`unpatch` the model is the original module tree); with ``state`` None, those of
    every copy in a model about to be patched.  A module that another live patched model fused (:data:`_INSTALLED`)
    keeps its own."""
    for module in block.modules():
        forward = module.__dict__.get("forward")
        if not isinstance(forward, InstalledForward) or forward.__func__ not in _PATCH_FORWARDS:
            continue
        owner = _INSTALLED.get(module)
        if owner is not None and owner() is not None and owner() is not state:
            continue
        if forward.__func__ is marked_rotary_forward:
            uninstall_fused_rotary(module)
        for attr in ("forward", PLAN_ATTR, EXPERT_PLANS_ATTR, "_bread_name", _BLOCK_ATTR, _PROBED_ACT_ATTR):
            module.__dict__.pop(attr, None)
        if module.__dict__.pop(CHECKPOINTING_TURNED_OFF, False):
            module.gradient_checkpointing = True


def _refuse_unfused_layers_of_wrapper(wrapper: nn.Module, state: PatchedModel) -> None:
    """``patch`` of a wrapper (peft's ``get_peft_model``) around a model patched before it was wrapped: the LoRA
    layers the wrapper put in are not fused, and patching again would leave them so."""
    fused = {id(module) for _, module in state.fused_modules}
    unfused = [name for name, module in wrapper.named_modules() if is_lora_layer(module) and id(module) not in fused]
    if unfused:
        raise ValueError(f"patch: this model wraps a model patched before it was wrapped (peft.get_peft_model after "
                         f"patch), and its {len(unfused)} LoRA layers ({unfused[0]}, ...) are not fused; call "
                         "bread_kernels.unpatch(model), then patch(model)")


def set_cut(model: nn.Module, cut: int) -> None:
    """Blocks below ``cut`` run without autograd; the backward stops at block ``cut``.  For a patched model no
    optimizer drives (an optimizer sets the cut below its lowest trained block at every switch): refused while one
    does, since a cut above that block would silently leave it, and the updates below the cut, untrained."""
    state = patched_state(model)
    if state is None:
        raise ValueError("set_cut: the model is not patched")
    driver = state.driver
    if driver is not None and not getattr(driver, "closed", False):
        raise RuntimeError(f"set_cut: a live {type(driver).__name__} drives this model and sets the cut itself at "
                           "every block switch (below the lowest block it trains); close it first (close(), or "
                           "bread_kernels.unpatch) to set the cut by hand")
    state.set_cut(cut)


def fused_fraction(model: nn.Module) -> dict:
    """How much of a patched model's block stack the fused functions serve (for reports and tests).

    Returns a dict: ``block_parameters`` (elements of every parameter in the blocks), ``fused`` (elements of those
    owned by a fused linear / LoRA layer or a fused experts module, and not shared with another module — what an
    optimizer's plans can route through a fused backward), ``fraction`` (their ratio), ``linear_and_expert`` and
    ``fused_linear_and_expert`` (the same restricted to the weights and biases of ``nn.Linear``/``Conv1D`` layers
    and the 3-D expert weights), ``fraction_of_linear_and_expert``, and ``unfused``: the (name, elements) of every
    block parameter outside the fused functions (norms, MoE routers' weights, ...), which take the hook path.  (A
    fused linear's on-the-fly role takes the hook path too where its weight has at most
    :attr:`PatchedModel.hook_update_numel` elements: a choice made when the plans are written, not counted here.)"""
    state = patched_state(model)
    if state is None:
        raise ValueError("fused_fraction: the model is not patched; call bread_kernels.patch(model) first")
    fused_ids = {id(p) for _, module in state.fused_modules + state.fused_experts for p in module.parameters()
                 if id(p) not in state.shared_weights}
    linear_ids = {id(p) for block in state.blocks for module in block.modules()
                  if isinstance(module, nn.Linear) or _is_linear(module)
                  for p in module.parameters(recurse=False)}
    linear_ids |= {id(p) for block in state.blocks for module in block.modules()
                   if _experts_like(module) for p in module.parameters(recurse=False) if len(whole_shape(p)) == 3}
    linear_ids |= {id(p) for block in state.blocks for module in block.modules()
                   for _, p in _unrecognised_expert_weights(module)}
    seen: set[int] = set()
    total = fused = linear = fused_linear = 0
    unfused = []
    for index, block in enumerate(state.blocks):
        prefix = f"{state.blocks_name}.{index}." if state.blocks_name else f"{index}."
        for name, p in block.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            numel = _whole_numel(p)  # a ZeRO-3 partitioned parameter's tensor is empty until gathered
            total += numel
            is_fused, is_linear = id(p) in fused_ids, id(p) in linear_ids
            fused += numel * is_fused
            linear += numel * is_linear
            fused_linear += numel * (is_fused and is_linear)
            if not is_fused:
                unfused.append((prefix + name, numel))
    return {"block_parameters": total, "fused": fused, "fraction": fused / total if total else 1.0,
            "linear_and_expert": linear, "fused_linear_and_expert": fused_linear,
            "fraction_of_linear_and_expert": fused_linear / linear if linear else 1.0, "unfused": unfused}


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _experts_like(module: nn.Module) -> bool:
    """A module holding 3-D weights (fused or not; partitioned ones by their whole shape): an experts module to
    :func:`_experts_modules`, counted with the expert weights by :func:`fused_fraction`.  Not a convolution, whose
    weight is 3-D in one dimension (Mamba's depthwise ``conv1d``): it is a layer of its own, as a norm is."""
    return not isinstance(module, _CONVOLUTIONS) and any(len(whole_shape(p)) == 3
                                                          for p in module.parameters(recurse=False))
