"""The layer-streaming backward: which blocks of the stack run under autograd, and how they are recomputed.

Forward, for block ℓ of L, with the cut c (the lowest block whose backward the step needs):

* ℓ < c: the block runs under ``no_grad`` and stores nothing — no backward will ever reach it (unless a gradient
  must pass through it to something the optimizer does not drive: below).
* ℓ ≥ c, ``recompute=True``: the block runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved):
  its graph is built but only its input is kept; the backward recomputes the saved tensors — stopping as soon as
  the last one the backward needs exists, so a pre-norm block's last GEMM is never recomputed (see
  :mod:`bread_kernels.functions.recompute`) — and the fused Linear functions inside apply each weight's Role.
  The lowest needed block's input needs no gradient, so autograd computes no dX for it.
* ℓ ≥ c, ``recompute=False``, or one of the top blocks kept (:meth:`StreamConfig.kept_blocks`): the block runs under
  plain autograd (activations kept); the fused Linear functions still apply the Roles.  The top block's backward comes
  first, so keeping its activations saves its whole recompute for the memory of one block's activations alive during the
  head and the loss.  With ``keep_top="auto"`` top blocks are kept when a fused head+loss follows the blocks
  (:meth:`StreamConfig.fused_loss_follows`), which then holds no more than the larger of the hidden states' size and
  what the count sets beside the kept blocks for the top block's backward (:meth:`StreamConfig.room_beside_kept`).  The
  top block, unless it and what the loss holds beside it would take more than both the budget below and a recomputed
  block's backward (twice its activations): it saves its recompute, and the kept block's backward replaces a recomputed
  block's.  More, as many as the memory the fused loss saves pays for: the model's own head and loss would hold
  ``T·V·12`` bytes at the peak of their backward (``budget_bytes``), so ``k`` top blocks whose saved activations, plus
  the larger of what the fused loss holds beside them in the forward (a block of logits, an on-the-fly head's fp32 dW:
  ``loss_bytes``) and what the top block's backward allocates (its activations' gradients, about its activations' size),
  take no more than that keep the peak under the unfused model's.  Each kept block's activations are measured (bytes per
  token, saved tensors beyond its arguments and weights) and the count grows by at most one unmeasured block per
  forward; new plans (a block switch: roles decide what a block saves) start again from the top block alone.  In a kept
  block the linears that save their inputs (on-the-fly, LoRA, ACTIVE) save instead what rebuilds them in their backward:
  the norms' outputs and the SwiGLU product come back from the norms' and the product's own saved tensors
  (:mod:`bread_kernels.functions.rebuild`), ``2K + I`` values per token fewer, so more blocks fit the budget.

A block with on-the-fly work whose input does not require grad (the lowest needed block) is still visited by the
backward: its fused functions take a backward trigger.  Other arguments (attention mask, rotary cos/sin, any tensor
that requires grad) are passed through to every run of the block; the checkpoint carries their gradients too.

Below the cut a block runs under autograd after all, as one above it (its weights frozen: dX only), where a gradient
must pass through it to something the optimizer does not drive: hidden states whose graph reaches a parameter
(``inputs_embeds`` from a trainable projector or prompt, an embedding trained by its own optimizer, a trainable scale a
forward hook applies to a lower block's output) or another argument that requires grad.  The embeddings' output of a
frozen embedding made to require grad (``enable_input_require_grads``, which Hugging Face's gradient checkpointing
calls: a leaf that is no parameter, whatever GPT-2's position embeddings or DeepSpeed's hooks add to it) leads to
nothing and is not followed; it is told from a leaf the caller made to require grad — ``inputs_embeds`` whose gradient
is asked for (input saliency, ``torch.autograd.grad(loss, inputs_embeds)``), a perturbation added to them
(adversarial training) — by being the output of one of the model's input embeddings (:func:`note_embedding_outputs`),
which a forward hook on it made require grad, and the caller's leaf is followed, as the unpatched model gives it its
gradient.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import stateless
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from .functions.autocast import autocast_dtype
from .functions.experts import EXPERT_PLANS_ATTR
from .functions.rebuild import rebuilding_outputs
from .functions.recompute import ForwardRecord, Recomputing
from .plan import BACKWARD_TRIGGER, PLAN_ATTR

__all__ = ["StreamConfig", "streamed_block_forward", "turn_off_hf_checkpointing", "CHECKPOINTING_TURNED_OFF",
           "note_embedding_outputs", "inside_functional_call"]

#: on a block whose HF ``gradient_checkpointing`` was turned off — by ``patch``, or by the stream where it was enabled
#: after ``patch`` — so that ``unpatch`` turns it back on
CHECKPOINTING_TURNED_OFF = "_bread_checkpointing_turned_off"


class ThisForward(threading.local):
    """What the forward of the model that runs now (or ran last) in the calling thread recorded, per thread as the
    forwards are (:mod:`.open_forwards`; a thread takes its own with it when it ends), reset where a forward of the
    model starts (:meth:`StreamConfig.begin_forward`):

    * :attr:`autocast`: the ``torch.autocast`` dtype its blocks computed in, None for none — what an optimizer reads
      after the forward, where an autocast entered inside the model's forward (accelerate's ``prepare``) has been
      left again;
    * :attr:`caches`: the KV caches its blocks were given, with what they held when it started
      (:class:`ForwardCaches`); None outside a forward of the model (dropped where it ends);
    * :attr:`unrecomputed`: whether its blocks keep their activations, recompute or not: a forward with grad that
      ``torch.func.functional_call`` runs on a model no optimizer drives (a recompute in the backward would read the
      model's own parameters, which functional_call has put back by then, instead of the tensors it swapped in)."""

    autocast: torch.dtype | None = None  # class defaults: what a thread that never set them reads
    caches: "ForwardCaches | None" = None
    unrecomputed: bool = False


@dataclass
class StreamConfig:
    """Shared by every block of one patched model; ``cut`` is written through ``PatchedModel.set_cut``."""

    recompute: bool = True
    cut: int = 0
    #: with ``recompute``: the number of top blocks that keep their activations instead (their backward starts from
    #: what the forward saved), or ``"auto"``: as many as a fused head+loss that follows pays for; through ``patch``
    keep_top: int | str = 0
    n_blocks: int = 0
    #: during a forward whose blocks a fused head+loss follows (see :meth:`fused_loss_follows`): ``"auto"`` keeps the
    #: top block, and more within :attr:`auto_budget_bytes`
    auto_keeps_top: bool = False
    #: during such a forward: what the model's own head and loss would hold at their peak, which the blocks
    #: ``"auto"`` keeps share with :attr:`auto_loss_bytes` or the top block's backward (the top block is kept even
    #: where it alone takes more)
    auto_budget_bytes: int = 0
    #: during such a forward: what the fused loss holds beside the kept blocks in the forward (a block of logits,
    #: an on-the-fly head's dW)
    auto_loss_bytes: int = 0
    #: the saved activations per token of each block ``"auto"`` kept since the plans last changed, by block index
    #: (a block's role decides what it saves: an active block also saves its linears' inputs for dW)
    block_bytes: dict = field(default_factory=dict)
    #: how many blocks the current forward kept (reset by :meth:`fused_loss_follows`)
    kept: int = 0
    #: how many times each block was recomputed in a backward, by block index; for tests and benchmarks
    recomputes: dict = field(default_factory=dict)
    #: ``"auto"``'s count for the forward that runs now, decided at its first block (so every block agrees)
    _auto_count: int | None = field(default=None, repr=False)
    #: in the forward that runs now: the ids of the hidden states' nodes below the cut found to lead to a parameter
    #: (their blocks run under autograd), where the next block's walk stops; emptied where a forward of the model
    #: starts and ends, and where block 0 walks (blocks called by hand)
    followed_below_cut: set = field(default_factory=set, repr=False)
    #: set where a module of the model with a forward of patch's was replaced (``PatchedModel.suspect_lost``): a weak
    #: method that, before a forward with grad, refuses it if one is gone while an optimizer drives
    suspect_lost: Any = None
    #: in the calling thread: what the forward that runs now (or ran last) recorded (:class:`ThisForward`)
    this_forward: ThisForward = field(default_factory=ThisForward, repr=False)
    #: the stream of a deep copy of a part of a patched model (a block, the base model) taken without the model's
    #: patched state: no model numbers its forwards or knows its blocks' places, so its blocks run their own forward
    #: (depth up-scaling's copy of a block, put into a patched stack, would read the KV cache as one of another
    #: forward's)
    orphan: bool = False

    def begin_forward(self, unrecomputed: bool = False) -> None:
        """A forward of the model starts in this thread: its blocks say what they compute in, and the KV caches they
        are given count by what they hold from now on (:class:`ForwardCaches`); ``unrecomputed``: its blocks keep
        their activations (:attr:`ThisForward.unrecomputed`)."""
        this = self.this_forward
        this.autocast = None
        this.caches = ForwardCaches(torch.is_grad_enabled())
        this.unrecomputed = unrecomputed
        self.followed_below_cut.clear()

    def end_forward(self) -> None:
        """The forward of the model that ran in this thread ended: a block called outside one reads its caches as
        they are, and is recomputed as the stream's options say."""
        self.this_forward.caches = None
        self.this_forward.unrecomputed = False
        self.followed_below_cut.clear()  # ids of nodes that die with the forward's graph

    def __deepcopy__(self, memo: dict) -> "StreamConfig":
        """The stream of a deep copy of the model (or of its blocks): the same options, the cut at 0 (no optimizer
        drives the copy: every block runs under autograd) and nothing measured or counted yet."""
        duplicate = StreamConfig(recompute=self.recompute, keep_top=self.keep_top, n_blocks=self.n_blocks,
                                 orphan=True)  # until the copy of the patched state takes it (its model is copied)
        memo[id(self)] = duplicate
        return duplicate

    def kept_blocks(self, tokens: int = 0) -> int:
        """How many top blocks keep their activations in the forward that runs now (``tokens``: the hidden states'
        rows, which ``"auto"`` sizes a block's activations by).  ``"auto"``: from the top down, the blocks whose
        measured activations, together with the larger of what the loss holds beside them in the forward
        (:attr:`auto_loss_bytes`) and what the top block's backward allocates (its activations' gradients, taken at
        its activations' size), fit :attr:`auto_budget_bytes`, and at most one block not yet measured (taken at
        the largest measured size, and measured in this forward); always the top block, unless it and the loss
        beside it would take more than both the budget and a recomputed block's backward (twice its activations)."""
        if self.keep_top != "auto":
            return self.keep_top
        if not self.auto_keeps_top:
            return 0
        if self._auto_count is None:
            top = (self.block_bytes.get(self.n_blocks - 1) or 0) * tokens
            count, total = 1, top + self._beside_kept(top)
            if total > max(self.auto_budget_bytes, 2 * top):  # the top block and the loss would peak above both
                self._auto_count = 0  # the unfused loss and a recomputed block's backward: keep nothing
                return 0
            largest = max(self.block_bytes.values(), default=0) * tokens
            for index in range(self.n_blocks - 2, -1, -1) if largest > 0 else ():
                measured = index in self.block_bytes
                total += self.block_bytes[index] * tokens if measured else largest
                if total > self.auto_budget_bytes:
                    break
                count += 1
                if not measured:
                    break
            self._auto_count = count
        return self._auto_count

    def _beside_kept(self, top: int) -> int:
        """What sits beside the kept blocks' activations at the step's peak: the larger of what the fused loss holds
        in the forward and what the top block's backward allocates (its activations' gradients, about ``top``)."""
        return max(self.auto_loss_bytes, top)

    def room_beside_kept(self, tokens: int) -> int:
        """Inside :meth:`fused_loss_follows`, after the blocks' forward: the bytes what follows the kept blocks in
        the forward (the fused loss) may hold within what ``"auto"`` counts beside them — the larger of what the loss
        was counted at and what the top block's backward allocates later (counted at its activations' size, as this
        forward measured them at ``tokens`` rows).  A function of this forward alone, so a resumed run chunks its
        loss, and rounds its sums, as the run it resumes; the loss's blocks of logits follow the measured
        activations.  The step's peak stays within the unfused loss's (the count's budget); it may pass a step that
        recomputes every block where the top block's backward allocates less than its activations.  0 where no
        block was kept; the loss's own count with ``keep_top`` given as a number (nothing is measured then)."""
        if not self.kept:
            return 0
        if self.keep_top != "auto":
            return self.auto_loss_bytes
        return int(self._beside_kept((self.block_bytes.get(self.n_blocks - 1) or 0) * tokens))

    def plans_changed(self) -> None:
        """The roles of the blocks may have changed (the optimizer wrote new plans): ``"auto"`` measures again,
        from the top block alone."""
        self.block_bytes.clear()

    @contextlib.contextmanager
    def fused_loss_follows(self, keep: bool = True, budget_bytes: int = 0, loss_bytes: int = 0):
        """Mark the blocks' forward run inside as one a fused head+loss follows (the causal-LM forward of
        :mod:`bread_kernels.causal_lm` wraps its base model's call in it); :attr:`kept` then says how many blocks
        kept their activations.  ``budget_bytes``: what the model's own head and loss would hold at their peak
        (:func:`~bread_kernels.functions.head_loss.unfused_loss_bytes`); ``loss_bytes``: what the fused loss holds
        beside the kept blocks (its block of logits, a head's dW accumulated in the forward and the temporaries of
        its update in the backward: :func:`~bread_kernels.functions.head_loss.loss_bytes_beside_kept`);
        ``"auto"`` keeps the top block and as many more as fit (:meth:`kept_blocks`).
        ``keep=False``: the loss cannot be bounded beside kept blocks (a head's dW accumulated in the forward holds
        more than the unfused loss would), so ``"auto"`` keeps nothing."""
        outer = self.auto_keeps_top, self.auto_budget_bytes, self.auto_loss_bytes, self._auto_count
        self.auto_keeps_top, self.auto_budget_bytes, self.auto_loss_bytes = keep, budget_bytes, loss_bytes
        self._auto_count, self.kept = None, 0
        try:
            yield self
        finally:
            self.auto_keeps_top, self.auto_budget_bytes, self.auto_loss_bytes, self._auto_count = outer


def block_has_work(block: nn.Module) -> bool:
    """Whether the block's backward would do anything: a parameter needs a gradient or a fused on-the-fly update.
    (The parameters first: an active block answers at its first one, where the walk over every module's plans cost
    ~70 µs of a host-bound block's forward.)"""
    if any(p.requires_grad for p in block.parameters()):
        return True
    for module in block.modules():
        plans = [getattr(module, PLAN_ATTR, None), *getattr(module, EXPERT_PLANS_ATTR, {}).values()]
        if any(plan is not None and plan.role.updates_on_the_fly for plan in plans):
            return True
    return False


# the KV cache's names across transformers versions (5.24 renamed ``past_key_values`` to ``cache``)
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


# torch.compile: each block runs eagerly (a graph break): the checkpoint with a context_fn and the fused Functions
# inside are not traceable by dynamo; what lies between the blocks (embedding, norms, loss) is compiled
@torch.compiler.disable
def streamed_block_forward(block: nn.Module, original: Callable, config: StreamConfig, index: int,
                           *args: Any, **kwargs: Any):
    """The forward installed on each block by :func:`bread_kernels.patch`."""
    if config.orphan:  # a copy of a block made without its model: plain autograd (StreamConfig.orphan)
        return original(*args, **kwargs)
    forward = _caches_seen(config, index, kwargs)
    if not torch.is_grad_enabled():
        if forward is not None and forward.with_grad and config.recompute and \
                not getattr(block, "_can_checkpoint_with_cache", False):
            # a pass under no_grad inside a training forward (HRM's first low-level cycles): refused before it
            # writes the cache, as a block below the cut is
            _refuse_filled_caches([kwargs], index, forward)
        return original(*args, **kwargs)
    if config.suspect_lost is not None:
        check = config.suspect_lost()
        if check is not None:
            check()
    if turn_off_hf_checkpointing(block):  # enabled after patch(): ours replaces it
        warnings.warn("bread_kernels: the model's gradient checkpointing is replaced by the streaming backward's own "
                      "recompute; turned the layers' gradient_checkpointing flag off", RuntimeWarning, stacklevel=2)
    hidden_name, arguments, keywords, call = _block_call(original, args, kwargs)
    hidden = arguments[hidden_name]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"bread_kernels: block {index}'s first argument is {type(hidden).__name__}, not hidden states")
    config.this_forward.autocast = autocast_dtype(hidden.device)
    needing_grad = [name for name, value in arguments.items()
                    if name != hidden_name and any(t.requires_grad for t in _tensors_in(value))]
    if index < config.cut and not (needing_grad or _leads_to_a_wanted_leaf(hidden, config, index)):
        if config.recompute and not getattr(block, "_can_checkpoint_with_cache", False):
            # before a block below the cut writes it: a recomputed one would refuse it
            _refuse_filled_caches(keywords, index, forward)
        with torch.no_grad():
            return original(*args, **kwargs)
    if not config.recompute or config.this_forward.unrecomputed:
        return original(*args, **kwargs)
    if index >= config.n_blocks - config.kept_blocks(hidden.numel() // hidden.shape[-1]):
        config.kept += 1
        with rebuilding_outputs():  # its linears' inputs are rebuilt from the norms' and products' saved tensors
            if config.keep_top == "auto" and not _saved_tensor_hooks_active():
                return _measuring_saved_bytes(block, original, config, index, args, kwargs, hidden)
            return original(*args, **kwargs)

    # a recomputed block must not write a KV cache a second time (what HF's own checkpointing does too); layers
    # that only read the cache say so with HF's ``_can_checkpoint_with_cache`` and keep it
    keeps_cache = getattr(block, "_can_checkpoint_with_cache", False)
    if not keeps_cache:
        _refuse_filled_caches(keywords, index, forward)
    for named in keywords:  # the arguments by name, and a **kwargs catch-all's
        if not keeps_cache:
            for name in _CACHE_ARGUMENTS:
                if named.get(name) is not None:
                    _note_unwritten(named[name], index)
                    named[name] = None
        if named.get("use_cache"):
            named["use_cache"] = False

    record = ForwardRecord()
    modes = _modes(block)  # the forward's, which a recompute replays (model.eval() before the backward)

    def run(h):
        # the autograd graph keeps ``run`` until it is freed: holding no hidden state here keeps a block's
        # recomputed input (and its .grad) from living on after the block's backward
        arguments[hidden_name] = h
        # HF's checkpointing turned back on between the forward and this recompute (TRL's trainers wrap their
        # reference forward in ``disable_gradient_checkpointing``, whose exit enables it again): the block's own
        # forward would checkpoint itself inside ours and save other tensors than the forward did
        turn_off_hf_checkpointing(block)
        changed = _in_modes(modes)
        try:
            with record:  # the recompute replays the forward's adapter choices
                return call()
        finally:
            arguments[hidden_name] = None
            for module, mode in changed:
                module.training = mode

    if not (hidden.requires_grad or needing_grad or block_has_work(block)):
        with torch.no_grad():
            return run(hidden)

    def count_recompute():
        config.recomputes[index] = config.recomputes.get(index, 0) + 1

    return checkpoint(run, hidden, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (contextlib.nullcontext(), Recomputing(count_recompute)))


#: the code of the function every functional_call of torch runs the module's forward from (in its frame)
_FUNCTIONAL_CALL_CODE = getattr(getattr(stateless, "_functional_call", None), "__code__", None)


def inside_functional_call() -> bool:
    """Whether the caller runs inside ``torch.func.functional_call`` (or ``torch.nn.utils.stateless.functional_call``,
    ``torch.func.grad`` of a function calling it), which swaps tensors of its caller's into the modules' parameters
    until the forward returns: a walk up the calling thread's frames for functional_call's own (~0.06-0.1 µs a
    frame: 2-5 µs at a Trainer's depth of 40 frames)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _FUNCTIONAL_CALL_CODE:
        frame = frame.f_back
    return frame is not None


def _modes(block: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each module of ``block`` with its mode (``training``) now: what a forward ran in, module by module (dropout
    switched off by ``module.eval()`` in a training model, or left on in an evaluation one)."""
    return [(module, module.training) for module in block.modules()]


def _in_modes(modes: list[tuple[nn.Module, bool]]) -> list[tuple[nn.Module, bool]]:
    """Put each module back in the mode of :func:`_modes` for a recompute that comes after a mode changed
    (``model.eval()`` between a loss and its backward: with dropout, the recompute saved other tensors than the
    forward and the checkpoint failed, as Hugging Face's own checkpointing does); returns the modules it changed, each
    with the mode to put back after."""
    changed = []
    for module, training in modes:
        if module.training is not training:
            changed.append((module, module.training))
            module.training = training
    return changed


#: the outputs of the patched models' input embeddings a hook made to require grad, held weakly
#: (:func:`note_embedding_outputs`)
_EMBEDDING_OUTPUTS = WeakIdKeyDictionary()


def note_embedding_outputs(embedding: nn.Module) -> list:
    """Remember, as what the backward below the cut does not follow (:func:`_wanted_leaf`), the outputs of the input
    embedding ``embedding`` (one of the modules Hugging Face's ``enable_input_require_grads`` hooks) that forward
    hooks made leaves that require grad: ``enable_input_require_grads``'s ``output.requires_grad_(True)`` (so that a
    checkpointed block gives the adapters above it their gradients), on the output the embedding computed, or on a
    new tensor a hook before it returned (NEFTune's noise, a ``detach()``).  The embedding's own forward never
    returns such a leaf (a frozen table gives an output that requires no grad, a trained one an output with a
    ``grad_fn``), and a leaf the caller makes is the caller's to follow (an input saliency's ``inputs_embeds``).  Two
    forward hooks, kept first and last by a pre-hook (torch runs them in the order of ``module._forward_hooks``,
    read after the forward): the first sees what the embedding computed, the last what the hooks hand on.  Returns
    their handles."""
    first = embedding.register_forward_hook(_computed_output, prepend=True)
    last = embedding.register_forward_hook(_final_output)
    order = embedding.register_forward_pre_hook(functools.partial(_keep_first_and_last, first.id, last.id))
    return [first, last, order]


#: per thread, the embedding output :func:`_computed_output` saw last (weakly), for :func:`_final_output`
_COMPUTED = threading.local()


def _computed_output(module: nn.Module, args, output) -> None:
    _COMPUTED.output = weakref.ref(output) if isinstance(output, torch.Tensor) else None


def _final_output(module: nn.Module, args, output) -> None:
    computed, _COMPUTED.output = getattr(_COMPUTED, "output", None), None
    for tensor in (computed() if computed is not None else None, output):
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.grad_fn is None:
            _EMBEDDING_OUTPUTS[tensor] = True


def _keep_first_and_last(first_id: int, last_id: int, module: nn.Module, args) -> None:
    hooks = module._forward_hooks
    if first_id in hooks and next(iter(hooks)) != first_id:
        hooks.move_to_end(first_id, last=False)
    if last_id in hooks and next(reversed(hooks)) != last_id:
        hooks.move_to_end(last_id)


def _wanted_leaf(leaf: torch.Tensor) -> bool:
    """Whether the backward must bring a gradient to ``leaf``, a leaf that requires grad: a parameter, or a tensor
    the caller made to require grad (``inputs_embeds`` of an input saliency, a perturbation added to them) — not the
    output of an input embedding that a forward hook made to require grad (``enable_input_require_grads``:
    :func:`note_embedding_outputs`), nor the engine's own backward trigger."""
    if isinstance(leaf, nn.Parameter):
        return True
    return leaf is not BACKWARD_TRIGGER and leaf not in _EMBEDDING_OUTPUTS


def _leads_to_a_wanted_leaf(hidden: torch.Tensor, config: StreamConfig, index: int, limit: int = 10_000) -> bool:
    """Whether the graph below a block's hidden states reaches a leaf that wants a gradient (:func:`_wanted_leaf`: an
    ``nn.Parameter`` — a trained projector, soft prompt, embedding or scale — or a tensor the caller made to require
    grad, the hidden states themselves included): only then must a block below the cut pass a gradient down.  A leaf
    that is an embedding's output made to require grad by ``enable_input_require_grads`` (reached through GPT-2's
    position embeddings, BERT's embedding norm or DeepSpeed's identity Functions) leads to nothing.  The walk stops
    at the hidden states of a lower block that was followed in this forward (from block 0 on: their nodes are alive,
    so their ids are theirs), so each block walks its own graph once.  Past ``limit`` nodes: assume it does
    (following costs time, never a wrong gradient)."""
    if index == 0:
        config.followed_below_cut.clear()
    grad_fn = hidden.grad_fn
    if grad_fn is None:
        return hidden.requires_grad and _wanted_leaf(hidden)
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if id(node) in config.followed_below_cut or len(seen) >= limit:
            break
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            if _wanted_leaf(variable):
                break
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    else:
        return False
    config.followed_below_cut.add(id(grad_fn))
    return True


def turn_off_hf_checkpointing(block: nn.Module) -> bool:
    """Turn off a block's Hugging Face ``gradient_checkpointing`` (the stream's recompute replaces it), marking the
    block so that ``unpatch`` turns it back on; whether it was on."""
    if not getattr(block, "gradient_checkpointing", False):
        return False
    block.gradient_checkpointing = False
    block.__dict__[CHECKPOINTING_TURNED_OFF] = True
    return True


def _held_tokens(cache: Any, index: int) -> int:
    """The tokens that layer ``index`` of ``cache`` holds (0 for an object that is no cache).  A layer that holds no
    keys and values by design — transformers' ``DummyLayer``, which a hybrid model's cache (Nemotron-H) keeps for its
    MLP-only and MoE-only layers — has no ``get_seq_length``, and the cache's own ``get_seq_length(index)`` raises
    ``AttributeError`` on it: it holds none."""
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        return 0
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and index < len(layers):
        if not callable(getattr(layers[index], "get_seq_length", None)):
            return 0
    return length(index)


def _refuse_filled_caches(keywords: list[dict], index: int, forward: "ForwardCaches | None") -> None:
    """A recomputed block runs without the KV cache (the recompute would write it a second time), which is right for
    the empty cache a model makes for itself with ``use_cache``; one that holds a prefix's keys and values must be
    read, so it is refused with the remedy (its attention would fail on the prefix's length, or miss the prefix).
    What counts is what block ``index``'s layer of the cache held when the forward started (``forward``; None: a
    block called outside a forward of the model, the layer as it is now), not what this forward wrote into it:
    lower blocks write theirs, and a model that runs its stack several times in one forward (HRM, each pass into
    layers of its own, ``layer_idx + cycle_offset``) wrote block ``index``'s layer in an earlier pass.
    ``keywords``: the block's arguments by name (and a ``**kwargs`` catch-all's)."""
    for named in keywords:
        for name in _CACHE_ARGUMENTS:
            cache = named.get(name)
            held = _held_tokens(cache, index) if forward is None else forward.held_at_start(name, cache, index)
            if held > 0:
                raise ValueError(
                    f"bread_kernels: a KV cache holding {held} tokens when the forward started (a prefix) reached "
                    f"block {index} as {name!r} in a training forward, but a recomputed block runs without the cache "
                    "(its recompute would write it again), as Hugging Face's gradient checkpointing drops it. Patch "
                    "with recompute=False to train on a prefix's cache, or pass the prefix with the input instead")


class ForwardCaches:
    """The KV caches the blocks of one forward of the model were given, each with what its layers held when the
    forward's blocks first saw it: the lengths ``(n_0, …, n_{L-1})`` of its ``L`` layers, taken once per cache in a
    forward started with grad enabled (``with_grad``: the only forwards that refuse a prefix), where a later block
    may find its layer written by this forward itself.  Caches are held weakly.  Reading the lengths is host-side
    metadata (a static cache's length tensor is copied on its device, not read: no host sync)."""

    __slots__ = ("with_grad", "_lengths")

    def __init__(self, with_grad: bool):
        self.with_grad = with_grad
        #: by cache: its layers' lengths at its first sight, or None (not taken: a forward without grad, a cache
        #: whose layers cannot be counted)
        self._lengths: "weakref.WeakKeyDictionary[Any, tuple | None]" = weakref.WeakKeyDictionary()

    def see(self, name: str, cache: Any) -> None:
        """Block arguments name ``cache`` as ``name``: at its first sight in this forward, refuse it where an
        earlier forward with grad left holes in it (:func:`_refuse_cache_with_holes`) and take its lengths."""
        try:
            if cache in self._lengths:
                return
        except TypeError:  # an object that takes no weak reference (or no hash): read as it is at each block
            return
        if _UNWRITTEN_CACHES:
            _refuse_cache_with_holes(name, cache)
        self._lengths[cache] = _layer_lengths(cache) if self.with_grad else None

    def held_at_start(self, name: str, cache: Any, index: int) -> Any:
        """The tokens layer ``index`` of ``cache`` (passed as ``name``) held when this forward's blocks first saw it
        (where they did not take its lengths: as it holds them now)."""
        if cache is None:
            return 0
        self.see(name, cache)  # a cache bound positionally is first seen here
        try:
            lengths = self._lengths.get(cache)
        except TypeError:
            lengths = None
        if lengths is None:
            return _held_tokens(cache, index)
        return lengths[index] if index < len(lengths) else 0


def _layer_lengths(cache: Any) -> tuple | None:
    """The tokens each layer of ``cache`` holds (a static layer's length tensor copied: it grows in place), or None
    where its layers cannot be counted (no ``layers`` list and no ``len``) or it is no cache."""
    if not callable(getattr(cache, "get_seq_length", None)):
        return None
    layers = getattr(cache, "layers", None)
    try:
        count = len(layers) if isinstance(layers, (list, tuple)) else len(cache)
    except TypeError:
        return None
    lengths = (_held_tokens(cache, i) for i in range(count))
    return tuple(held.clone() if isinstance(held, torch.Tensor) else held for held in lengths)


def _caches_seen(config: StreamConfig, index: int, kwargs: dict) -> ForwardCaches | None:
    """Record the KV caches block ``index`` is given by keyword (as Hugging Face passes them) in the forward of the
    model that runs in this thread (:class:`ForwardCaches`), which it returns; None where the block runs outside
    one (called by itself): then the first block refuses a cache with holes, as it finds it."""
    forward = config.this_forward.caches
    if forward is None:
        if index == 0 and _UNWRITTEN_CACHES:
            for name in _CACHE_ARGUMENTS:
                _refuse_cache_with_holes(name, kwargs.get(name))
        return None
    if not forward.with_grad and not _UNWRITTEN_CACHES:  # generation: nothing to record, nothing to refuse
        return forward
    for name in _CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            forward.see(name, cache)
    return forward


#: the KV caches a forward with grad passed to recomputed blocks, which did not write them: by cache, those blocks'
#: indices (the model hands such a cache back with their layers empty; see :func:`_refuse_cache_with_holes`)
_UNWRITTEN_CACHES: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()


def _note_unwritten(cache: Any, index: int) -> None:
    """Record that block ``index`` runs without ``cache`` in this forward (its layer of the cache stays empty)."""
    try:
        _UNWRITTEN_CACHES.setdefault(cache, set()).add(index)
    except TypeError:  # an object that takes no weak reference: nothing to say later
        pass


def _refuse_cache_with_holes(name: str, cache: Any) -> None:
    """Where a forward's blocks first see ``cache`` (passed as ``name``): refuse a KV cache that an earlier forward
    with grad filled only below its cut — the layers of the blocks it recomputed (dropping the cache, as Hugging
    Face's gradient checkpointing does) are empty while lower ones hold the prefix, so continuing from it
    (``model(next_ids, past_key_values=cache)``, a sampling loop whose first forward ran with grad) failed on a
    shape deep in the attention, or attended to no prefix in those layers.  A cache whose layers are all empty
    again (reset) is forgotten.  Only at the first sight: later in the same forward the cache holds what this
    forward wrote."""
    try:
        unwritten = _UNWRITTEN_CACHES.get(cache) if cache is not None else None
    except TypeError:
        return
    if not unwritten or not callable(getattr(cache, "get_seq_length", None)):
        return
    layers = len(getattr(cache, "layers", ())) or 1
    held = max((_held_tokens(cache, i) for i in range(layers) if i not in unwritten), default=0)
    if held == 0 or all(_held_tokens(cache, i) > 0 for i in unwritten):  # empty (reset), or its holes filled since
        del _UNWRITTEN_CACHES[cache]
        return
    raise ValueError(
        f"bread_kernels: the KV cache passed as {name!r} was filled by a forward with grad enabled, in which "
        f"blocks {sorted(unwritten)} were recomputed in the backward and, like Hugging Face's gradient "
        f"checkpointing, did not write it: their layers hold no keys and values while the lower ones hold "
        f"{held} tokens. Fill a cache you continue from under torch.no_grad() (as generate() does), or patch "
        "with recompute=False")


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are set around the forward (``save_on_cpu``, an offloading library): the
    measurement's own hook would replace theirs for a block, so ``"auto"`` then measures nothing and keeps the top
    block only.  torch has no public query; where its private one is gone this says True (the same safe answer), and
    ``tests/test_stream.py`` fails on the count of kept blocks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _measuring_saved_bytes(block, original, config: StreamConfig, index: int, args, kwargs, hidden):
    """Run kept block ``index``'s forward and record in ``config.block_bytes`` the bytes per token of what autograd
    saved for its backward: distinct storages, less the block's arguments and parameters (alive whether it is kept
    or not).  A tensor whose storage cannot be read (a wrapper subclass: DTensor, a quantised weight) stops the
    measurement; the block then counts as the largest measured one (none measured: only the top block is kept)."""
    inputs = [*_tensors_in(list(args)), *_tensors_in(kwargs)]
    saved, readable = {}, [True]

    def pointer(tensor):
        try:
            return tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            readable[0] = False
            return None

    params = [*block.parameters(), *block.buffers()]
    alive = {found[0] for found in map(pointer, [*inputs, *params]) if found is not None}

    def pack(tensor):
        if readable[0] and tensor.device.type != "meta":
            found = pointer(tensor)
            if found is not None and found[0] not in alive:
                saved[found[0]] = found[1]
        # a computed tensor detached: the same storage, without a grad_fn that would point back at the node saving
        # it; a leaf (a parameter) as it is — an update in the backward writes the parameter itself (under ZeRO-3 its
        # shards, found through its own attributes, which a detached alias lacks)
        return tensor if tensor.grad_fn is None else tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = original(*args, **kwargs)
    if readable[0]:
        config.block_bytes[index] = sum(saved.values()) / max(1, hidden.numel() // hidden.shape[-1])
    return output


def _tensors_in(value):
    """The tensors in a block argument (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def _block_call(original: Callable, args: tuple, kwargs: dict) -> tuple[str, dict, list[dict], Callable[[], Any]]:
    """A block's call as ``(hidden_name, arguments, keywords, call)``: ``arguments`` maps the forward's arguments by
    name, the hidden states' first; ``keywords`` the dicts that hold arguments by name (``arguments``, and a
    ``**kwargs`` catch-all's where the binding nests one there); ``call()`` runs the forward on what they hold then,
    the hidden states passed as the caller passed them.  Where the block is called as Hugging Face calls it (the
    hidden states first, positionally or by name, everything else by keyword) the names are the caller's, without
    ``inspect``'s binding (its ``BoundArguments`` cost ~20 µs a block's forward)."""
    signature = _signature(original)
    first = next(iter(signature.parameters.values()), None)
    if first is not None and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and len(args) <= 1 and \
            (len(args) == 1) != (first.name in kwargs):
        name = first.name
        arguments = {name: args[0] if args else kwargs[name]}
        arguments.update(kwargs)
        if not args:
            return name, arguments, [arguments], lambda: original(**arguments)

        def positional():  # a wrapper whose signature names its first parameter otherwise still gets it
            rest = dict(arguments)
            return original(rest.pop(name), **rest)

        return name, arguments, [arguments], positional
    bound = signature.bind(*args, **kwargs)
    catch_all = [bound.arguments[p.name] for p in signature.parameters.values()
                 if p.kind is inspect.Parameter.VAR_KEYWORD and p.name in bound.arguments]
    return next(iter(bound.arguments)), bound.arguments, [bound.arguments, *catch_all], \
        lambda: original(*bound.args, **bound.kwargs)


def _signature(forward) -> inspect.Signature:
    """The signature of a block's bound forward (without ``self``).  Cached by the method's function, held weakly:
    an entry holding the method, or a function whose closure holds it (a forward wrapped per instance with
    ``types.MethodType``), would keep its block, with its weights, alive."""
    function = getattr(forward, "__func__", None)
    if function is None:  # a plain callable (a wrapped forward): not cached
        return inspect.signature(forward)
    try:
        signature = _unbound_signatures.get(function)
    except TypeError:  # a callable that takes no weak reference: not cached
        return _unbound_signature(function)
    if signature is None:
        signature = _unbound_signatures[function] = _unbound_signature(function)
    return signature


_unbound_signatures: "weakref.WeakKeyDictionary[Callable, inspect.Signature]" = weakref.WeakKeyDictionary()
_HAS_A_DEFAULT = object()  # what a parameter's default becomes: binding needs to know there is one, not its value


def _unbound_signature(function) -> inspect.Signature:
    """``function``'s signature without its first parameter, and without its defaults' values or annotations: a
    cached entry holding them would keep what they hold alive (a wrapper's ``_original=block.forward``: its key)."""
    return inspect.Signature([p.replace(annotation=inspect.Parameter.empty,
                                        default=p.default if p.default is inspect.Parameter.empty else _HAS_A_DEFAULT)
                              for p in list(inspect.signature(function).parameters.values())[1:]])
