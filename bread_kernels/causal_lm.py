"""The causal-LM forward whose loss is the fused head+loss (the default of ``patch(model)``; ``fused_loss=True``
requires it).

transformers' causal LMs compute, in their ``forward``::

    hidden = self.<base>(...).last_hidden_state                 # [B, S, H]
    hidden = slice_logits_to_keep(hidden, logits_to_keep)
    logits = self.lm_head(hidden)                                # [B, S, V]: the step's largest tensors
    logits = c · tanh(logits / c)                                # Gemma2 only (final_logit_softcapping = c)
    logits = s · logits                                          # AyaVision only (logit_scale = s)
    loss = ForCausalLMLoss(logits, labels, vocab_size, **kwargs)  # shift, ignore_index=-100, mean or / num_items

and the vision-language models of :data:`FAMILIES` (``…ForConditionalGeneration``: Qwen2-VL, Llava, ...) compute the
same, their ``self.model`` merging the image features into the language model's input embeddings before its layers
(``hidden`` is its ``last_hidden_state``; the soft-capping, PaliGemma's, and the logit scale, AyaVision's, are read
from ``config.get_text_config()``).

:func:`install` replaces that forward (an instance attribute; :func:`uninstall` removes it) with one that, when
``labels`` are given and grad is enabled, calls the base model with the same arguments, shifts the labels exactly as
``ForCausalLMLoss`` does (pad with ``ignore_index`` and shift by one, or takes ``shift_labels``), and computes the
loss with :func:`~bread_kernels.functions.head_loss.fused_head_loss` from the hidden states and the head's weight and
:class:`~bread_kernels.WeightPlan` (the head module's ``_bread_weight_plan``, which the optimizer writes), so no
[tokens, vocab] tensor exists.  The output is the model's own output class with ``logits=None`` (as Liger-Kernel
does); ``cache``, ``hidden_states`` and ``attentions`` are the base model's.  Without labels, or without grad
(evaluation, generation), the model's own forward runs unchanged and returns the logits; so it does, whatever
``fused_loss`` asked, in a forward ``torch.export`` traces: the exported graph trains nothing, so the fused loss
saves nothing there, and its label check reads the labels on the host, which export cannot trace.

Only the families whose forward is exactly the sketch above are accepted (:data:`FAMILIES`, each checked against the
unpatched model by the tests).  What happens elsewhere depends on how the fused loss was asked for:

* ``patch(model, fused_loss=True)`` (*required*): anything else — another family, a class whose forward is not
  transformers' own (replaced on the class by a library or the user: :func:`_replaced_forward`), a custom
  ``loss_function`` or ``loss_type``, a head that is not a plain ``nn.Linear`` or whose weight its forward computes
  (pruned, parametrized), a head weight that is not materialised at the forward (ZeRO-3 partitions it until its
  module's own forward gathers it), a head plan the fused loss cannot carry out
  (:func:`~bread_kernels.functions.head_loss.head_plan_refusal`), a head computed in float16 (an fp16 head or fp16
  autocast, whose loss scaler's factor would reach the fused loss's gradients too late:
  :func:`~bread_kernels.functions.head_loss.head_dtype_refusal`) — is refused with an error naming the remedy,
  ``fused_loss=False``.
* ``patch(model)`` (the default, ``fused_loss=None``): installed where :func:`prepare` accepts the model; at each
  forward, where one of the conditions above holds, the model's own forward runs (its head, its logits, its loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass

import torch
from torch import nn

from .functions.head_loss import (dw_bytes_beside_hidden_sized, fused_head_loss, head_dtype_refusal,
                                  head_plan_refusal, loss_bytes_beside_kept, unfused_loss_bytes)
from .installed_forward import install_forward
from .plan import PLAN_ATTR
from .quantized import quantized_weight

__all__ = ["FAMILIES", "Family", "find_causal_lm", "prepare", "install", "uninstall", "shifted_labels"]


@dataclass(frozen=True)
class Family:
    """What the fused forward must know about one causal-LM class."""

    base: str  #: the attribute holding the base model whose ``last_hidden_state`` feeds the head
    #: the attribute of the (text) config, ``config.get_text_config()``, of the final-logit soft-capping that the
    #: forward applies, if it applies one
    softcap: str | None = None
    labels_to_base: bool = False  #: whether the forward hands ``labels`` to the base model too (Gemma3's does)
    #: the attribute of the (text) config of a factor ``s`` the forward multiplies the logits by before the loss
    #: (AyaVision's ``logit_scale``); the fused loss scores ``s·h`` instead: ``(s·h)·Wᵀ = s·(h·Wᵀ)`` for a head
    #: without bias, and autograd carries the factor back to ``h``
    logit_scale: str | None = None


#: the config attribute of a final-logit soft-capping; set on a family whose forward applies none (``softcap=None``),
#: it is refused: whether a forward of another transformers version applies it cannot be read from the config
SOFTCAP_ATTR = "final_logit_softcapping"

#: causal-LM and vision-language classes (by name) whose forward is the sketch in the module docstring
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("model"),
    "MistralForCausalLM": Family("model"),
    "Qwen2ForCausalLM": Family("model"),
    "Qwen3ForCausalLM": Family("model"),
    "GemmaForCausalLM": Family("model"),
    "Gemma2ForCausalLM": Family("model", softcap=SOFTCAP_ATTR),
    "GPT2LMHeadModel": Family("transformer"),
    # vision-language models: ``model`` is the vision tower and the language model, ``lm_head`` the head
    "Qwen2VLForConditionalGeneration": Family("model"),
    "Qwen2_5_VLForConditionalGeneration": Family("model"),
    "Qwen3VLForConditionalGeneration": Family("model"),
    "MllamaForConditionalGeneration": Family("model"),
    "LlavaForConditionalGeneration": Family("model"),
    "LlavaNextForConditionalGeneration": Family("model"),
    "Mistral3ForConditionalGeneration": Family("model"),
    "Gemma3ForConditionalGeneration": Family("model", labels_to_base=True),
    "PaliGemmaForConditionalGeneration": Family("model", softcap=SOFTCAP_ATTR),
    "LlavaOnevisionForConditionalGeneration": Family("model"),
    "Idefics3ForConditionalGeneration": Family("model"),
    "SmolVLMForConditionalGeneration": Family("model"),
    "InternVLForConditionalGeneration": Family("model"),
    "Glm4vForConditionalGeneration": Family("model"),
    "AyaVisionForConditionalGeneration": Family("model", logit_scale="logit_scale"),
    "VipLlavaForConditionalGeneration": Family("model"),
    "LlavaNextVideoForConditionalGeneration": Family("model"),
    "Idefics2ForConditionalGeneration": Family("model"),
    "Cohere2VisionForConditionalGeneration": Family("model"),  # its text config's logit_scale: not applied (5.25)
}

_INSTALLED_ATTR = "_bread_fused_loss"


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model`` (the model itself, or the one a peft wrapper holds) whose forward the fused
    loss replaces; raises naming the supported families and the remedy.  A causal LM that is a part of a composite
    model (:func:`_composite_around`: a vision-encoder-decoder's GPT-2, InstructBLIP's Llama) is not one: that
    model's forward calls it without labels and computes the loss from its logits, so a fused loss there would
    never run."""
    composite = None
    for name, module in model.named_modules():
        if type(module).__name__ in FAMILIES:
            composite = _composite_around(model, name)
            if composite is None:
                return module
    if composite is not None:
        raise ValueError(
            f"patch: fused_loss=True needs a causal LM that the model's forward calls with the labels, and {composite} "
            "(an encoder-decoder or vision-language model, whose forward computes the loss from that part's logits: "
            "the fused loss would never run). Use patch(model, fused_loss=False) (the model's own head and loss, "
            "with the fused head backward)")
    raise ValueError(
        f"patch: fused_loss=True needs a causal LM of a supported family ({', '.join(sorted(FAMILIES))}), and "
        f"{type(model).__name__} has none; its loss cannot be matched. Use patch(model, fused_loss=False) (the "
        "model's own head and loss, with the fused head backward)")


def _composite_around(model: nn.Module, name: str) -> str | None:
    """Where the module at ``name`` in ``model`` is a part of a composite model — an enclosing module that holds
    parameters beside it (an encoder, a vision tower) and is not peft's wrapper —, a description of that; else
    None (the model itself, or inside peft's wrappers or a wrapper holding nothing else)."""
    path = name.split(".") if name else []
    for depth in range(len(path)):
        enclosing = model.get_submodule(".".join(path[:depth]))
        if type(enclosing).__module__.startswith("peft."):
            continue  # peft's forward hands the labels to the model it wraps (a prompt encoder's too)
        child = path[depth]
        beside = sorted({n.split(".")[0] for n, _ in enclosing.named_parameters() if n.split(".")[0] != child})
        if beside:
            where = f"'{'.'.join(path[:depth])}'" if depth else "the model"
            return (f"the {type(model.get_submodule(name)).__name__} at '{name}' is a part of "
                    f"{type(enclosing).__name__} ({where}), which holds {', '.join(beside)} beside it")
    return None


def _head_problem(lm: nn.Module) -> str | None:
    """Why the head of ``lm`` cannot be the fused loss's (None: it is a plain ``nn.Linear``)."""
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        return (f"the head of {type(lm).__name__} is a {type(head).__name__}, not a plain nn.Linear (a peft LoRA "
                "head, a quantized head, a parametrized one, ...)")
    if not isinstance(head._parameters.get("weight"), nn.Parameter):
        return (f"the head of {type(lm).__name__} holds no weight parameter but a tensor computed from one by a "
                "forward pre-hook (torch.nn.utils.prune's, from weight_orig), which the fused loss, reading the "
                "weight without the head's forward, would never compute again")
    stored = quantized_weight(head.weight)
    if stored is not None:  # torchao's quantize_ keeps the nn.Linear and swaps its weight
        return f"the head of {type(lm).__name__} is a quantized nn.Linear (its weight {stored})"
    return None


def _check_head(lm: nn.Module) -> None:
    problem = _head_problem(lm)
    if problem is not None:
        raise ValueError(f"patch: fused_loss=True needs a plain nn.Linear head, and {problem}; use patch(model, "
                         "fused_loss=False)")


def _replaced_forward(cls: type) -> str | None:
    """Where the forward of the causal-LM class ``cls`` is not transformers' own, which one it is (None: every layer
    of it — transformers' decorators and the function they wrap — is a function of a ``transformers`` module, read
    from its globals, which ``functools.wraps`` does not copy).  A library or the user may replace it on the class
    (Liger-Kernel's ``apply_liger_kernel_to_*``, a z-loss or a weighted loss around transformers' forward): its loss is
    not known to be ``ForCausalLMLoss``'s."""
    layer = cls.forward
    for _ in range(64):  # a chain of __wrapped__ that loops is not transformers' either
        module = getattr(layer, "__globals__", {}).get("__name__", "")
        if module != "transformers" and not module.startswith("transformers."):
            code = getattr(layer, "__code__", None)
            what = f"{code.co_name} of {module or code.co_filename}" if code is not None else type(layer).__name__
            return (f"the forward of {cls.__name__} is not transformers' own ({cls.__name__}.forward is {what}: a "
                    "library or your code replaced it, e.g. Liger-Kernel's apply_liger_kernel_to_*), whose loss "
                    "the fused loss cannot know it matches")
        layer = getattr(layer, "__wrapped__", None)
        if layer is None:
            return None
    return f"the forward of {cls.__name__} wraps itself more than 64 times"


def prepare(model: nn.Module) -> tuple[nn.Module, tuple]:
    """Check that the fused-loss forward can take the place of the causal LM's in ``model`` (raising with the
    remedy if not) and return (that causal LM, what :func:`install` records on it); touches nothing."""
    lm = find_causal_lm(model)
    replaced = _replaced_forward(type(lm))
    if replaced is not None:
        raise ValueError(f"patch: fused_loss=True needs transformers' own forward, and {replaced}; use "
                         "patch(model, fused_loss=False) (that forward's head and loss, with the fused head backward)")
    _check_head(lm)
    original = type(lm).forward
    signature = inspect.signature(original)  # follows the decorators' __wrapped__ to the real parameters
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if "labels" not in signature.parameters or var_keyword is None:
        raise ValueError(f"patch: the forward of {type(lm).__name__} has no labels= or **kwargs; fused_loss=True "
                         "cannot take its place. Use patch(model, fused_loss=False)")
    return lm, (signature, var_keyword, _output_class(original))


def install(model: nn.Module, required: bool = True, stream=None) -> nn.Module:
    """Give the causal LM inside ``model`` the fused-loss forward (see :func:`prepare`); returns that causal LM.
    ``required=False``: a forward the fused loss cannot match runs the model's own forward instead of raising.
    ``stream``: the patched blocks' :class:`~bread_kernels.stream.StreamConfig` (not imported: the stream sits
    beside this module), told that a fused loss follows their forward; the top block may then keep its activations,
    and the loss holds no more than the hidden states' size, or what the stream counted beside its kept blocks,
    while one does (:meth:`~bread_kernels.stream.StreamConfig.room_beside_kept`)."""
    lm, info = prepare(model)
    setattr(lm, _INSTALLED_ATTR, (*info, required, stream))
    if "forward" not in lm.__dict__:
        # the original's signature (functools.wraps): Trainer keeps only the batch columns the forward names
        forward = functools.wraps(type(lm).forward)(lambda self, *args, **kwargs: _fused_loss_forward(self, *args,
                                                                                                       **kwargs))
        forward._bread_fused_loss_forward = True  # what uninstall removes (read through the InstalledForward)
        install_forward(lm, forward)
    return lm


def _is_ours(forward) -> bool:
    """Whether ``forward`` (a module's instance attribute) is the one :func:`install` installed."""
    return getattr(forward, "_bread_fused_loss_forward", False) is True


def uninstall(model: nn.Module) -> None:
    """Remove the fused-loss forward (harmless if none is installed).  A forward another library installed on the
    causal LM — over ours (TRL's fused LM head: ``add_fused_lm_head``, which keeps ours as its ``original_forward``,
    and accelerate's ``convert_outputs_to_fp32`` around it) or before ``patch`` — stays: removing it would remove
    that library's behaviour too (TRL's trainers' ``evaluate()`` then failed on ``outputs.log_probs``); ours, kept
    inside it, then runs the model class's forward (:func:`_fused_loss_forward`)."""
    for module in model.modules():
        if _INSTALLED_ATTR in module.__dict__:
            if _is_ours(module.__dict__.get("forward")):
                module.__dict__.pop("forward")
            module.__dict__.pop(_INSTALLED_ATTR)


def shifted_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``ForCausalLMLoss``'s targets: ``labels`` [..., S] padded with ``ignore_index`` and shifted left by one
    (position s predicts token s + 1; the last position predicts nothing)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def positions_to_score(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states [B, T', H] of the positions the model's own forward would score ([N, H] for a boolean
    mask): transformers' ``slice_logits_to_keep`` where it has one (its 2-D and boolean forms included), else the
    slice every family's forward made before that helper existed (transformers 4.45 to 5.17): the last
    ``logits_to_keep`` positions for an int (0: all of them), those indices for a 1-D tensor."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _fused_loss_forward(self, *args, **kwargs):
    """The forward installed by :func:`install` (see the module docstring); once uninstalled (a forward another
    library installed over it still calls it), the model class's forward."""
    installed = self.__dict__.get(_INSTALLED_ATTR)
    if installed is None:
        return type(self).forward(self, *args, **kwargs)
    signature, var_keyword, output_cls, required, stream = installed
    # not ``type(self).forward.__get__(self)``: where the forward breaks dynamo's graph (the blocks do), dynamo
    # resumes the call of that bound method as ``self.forward`` (this forward again: a RecursionError, torch 2.13)
    original = functools.partial(type(self).forward, self)
    bound = signature.bind(self, *args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None or not torch.is_grad_enabled() or torch.compiler.is_exporting():
        return original(*args, **kwargs)
    refusal = _refusal(self)
    if refusal is not None:
        if required:
            raise ValueError(f"bread_kernels: {refusal}, so the fused loss cannot take its place; patch(model, "
                             "fused_loss=False) (or patch(model), which uses it only where it can)")
        return original(*args, **kwargs)

    extra = dict(bound.arguments.pop(var_keyword, {}))
    return_dict = extra.pop("return_dict", None)
    named = {k: v for k, v in bound.arguments.items() if k not in ("self", "labels", "logits_to_keep")}
    logits_to_keep = bound.arguments.get("logits_to_keep", 0)
    family = FAMILIES[type(self).__name__]
    base = getattr(self, family.base)
    if family.labels_to_base:
        named["labels"] = labels
    head = self.get_output_embeddings()
    softcap = getattr(_text_config(self), family.softcap, None) if family.softcap else None
    scale = getattr(_text_config(self), family.logit_scale) if family.logit_scale else None
    plan = getattr(head, PLAN_ATTR, None)
    held = dw_bytes_beside_hidden_sized(labels.numel(), head.weight, head.bias, plan, softcap)
    if stream is None:
        follows = contextlib.nullcontext()
    else:  # kept blocks share the unfused loss's peak with what the fused loss holds beside them (StreamConfig)
        follows = stream.fused_loss_follows(
            held is not None, budget_bytes=unfused_loss_bytes(labels.numel(), head.weight),
            loss_bytes=loss_bytes_beside_kept(labels.numel(), head.weight, head.bias, plan, held, softcap))
    with follows:
        outputs = base(**named, **extra)  # the loss kwargs too, as HF
        room = stream.room_beside_kept(labels.numel()) if stream is not None else 0
    hidden = positions_to_score(outputs.last_hidden_state, logits_to_keep)
    if scale is not None:
        hidden = hidden * scale  # the logits s·(h·Wᵀ) as (s·h)·Wᵀ (a head without bias: _refusal)

    ignore_index = extra.get("ignore_index", -100)
    shift = extra.get("shift_labels")
    targets = (shifted_labels(labels, ignore_index) if shift is None else shift).reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"bread_kernels: the fused loss scores {hidden.shape[0]} positions (after logits_to_keep="
            f"{logits_to_keep if not isinstance(logits_to_keep, torch.Tensor) else 'a tensor'}) but the labels give "
            f"{targets.shape[0]} targets; pass labels (or shift_labels) of one per kept position")
    hidden_sized = stream is not None and stream.kept > 0
    loss = fused_head_loss(hidden, head.weight, head.bias, targets, plan, ignore_index=ignore_index,
                           num_items_in_batch=extra.get("num_items_in_batch"), softcap=softcap,
                           hidden_sized=hidden_sized, room_bytes=room - (held or 0),
                           dw_bytes=held if hidden_sized and held else None)

    fields = {f.name for f in dataclasses.fields(output_cls)} - {"loss", "logits"}
    output = output_cls(loss=loss, logits=None, **{k: getattr(outputs, k) for k in fields if hasattr(outputs, k)})
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return output if return_dict else _as_tuple(output)


def _as_tuple(output) -> tuple:
    """``return_dict=False``'s tuple: ``output.to_tuple()`` (its fields that are not None, in order) with the logits'
    place kept, as None, so that every item has the index it has in the unpatched model's tuple, which holds the
    logits there (as Liger-Kernel's tuple does); ``to_tuple()`` dropped it, and ``outputs[1]`` was the KV cache or
    the hidden states.  A nested output (a vision-language model's ``image_outputs``) becomes its own tuple, as
    ``to_tuple()`` makes it."""
    return tuple(value.to_tuple() if hasattr(value, "to_tuple") else value
                 for name, value in ((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
                 if value is not None or name == "logits")


def _refusal(lm: nn.Module) -> str | None:
    """Why this forward of the causal LM ``lm`` cannot be the fused loss's (None: it can)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    replaced = _replaced_forward(type(lm))
    if replaced is not None:
        return replaced
    if lm.loss_function is not ForCausalLMLoss:
        name = getattr(lm.loss_function, "__name__", type(lm.loss_function).__name__)
        return (f"{type(lm).__name__} computes its loss with {name} (a custom loss_function or config.loss_type), "
                "not transformers' ForCausalLMLoss")
    problem = _head_problem(lm)
    if problem is not None:
        return problem
    if FAMILIES[type(lm).__name__].softcap is None and getattr(_text_config(lm), SOFTCAP_ATTR, None) is not None:
        return (f"the config of {type(lm).__name__} sets {SOFTCAP_ATTR}, a soft-capping its family's forward is not "
                "known to apply (transformers' versions differ)")
    head = lm.get_output_embeddings()
    if FAMILIES[type(lm).__name__].logit_scale is not None and head.bias is not None:
        return (f"the head of {type(lm).__name__} has a bias, which its logit scale s multiplies too: s·(h·Wᵀ + b) "
                "is not the fused loss's (s·h)·Wᵀ + b")
    if tuple(head.weight.shape) != (head.out_features, head.in_features):
        return (f"the head's weight has shape {tuple(head.weight.shape)} at the forward, not ({head.out_features}, "
                f"{head.in_features}): it is gathered only by its module's own forward (ZeRO-3 partitioning)")
    return head_dtype_refusal(head.weight) or head_plan_refusal(getattr(head, PLAN_ATTR, None))


def _text_config(lm: nn.Module):
    """The config of ``lm``'s language model: ``config.get_text_config()`` (a causal LM's config is its own)."""
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


def _output_class(forward) -> type:
    """The ``ModelOutput`` class the original forward returns (from its annotation: the class, or the one dataclass
    of a union such as the vision-language models' ``tuple | LlavaCausalLMOutputWithPast``)."""
    annotation = inspect.signature(forward, eval_str=True).return_annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        classes = [a for a in typing.get_args(annotation) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        annotation = classes[0] if len(classes) == 1 else annotation
    if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
        raise ValueError(f"patch: cannot tell the output class of {forward.__qualname__} (annotation "
                         f"{annotation!r}), so fused_loss=True cannot build its output; patch(model, fused_loss=False)")
    return annotation
