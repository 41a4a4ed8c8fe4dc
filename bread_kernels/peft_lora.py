"""What bread_kernels knows about peft's LoRA: the one module that imports peft.

Used by :mod:`~bread_kernels.patch` (which layers get the fused LoRA function, what is refused),
:mod:`~bread_kernels.optim` (which parameters are adapters), :mod:`~bread_kernels.lora` (BREAD's init and merge)
and the DeepSpeed integration (LoRA layers as ZeRO-3 leaf modules).  peft is optional: without it no module is a
LoRA layer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

try:
    from peft.tuners.lora import Linear as LoraLinear
except ImportError:  # peft is optional
    LoraLinear = None

try:  # peft's LoRA on parameters (LoraConfig(target_parameters=...)): MoE expert weights
    from peft.tuners.lora import ParamWrapper
except ImportError:  # peft missing, or older than target_parameters
    ParamWrapper = None

from .quantized import quantized_weight

try:  # GPT-2 and friends store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

__all__ = ["LoraLinear", "is_linear_layer", "peft_remapped_targets", "linear_subclass_computes_linear",
           "lora_layer_classes", "is_lora_layer", "fusable_lora_layer", "is_param_wrapper", "lora_layers",
           "is_adapter_name",
           "tuner_adapter_attributes", "non_lora_adapter_names", "peft_wrapping", "adapter_parameters",
           "trained_adapter", "check_lora_layer"]


def is_linear_layer(module: nn.Module) -> bool:
    """A layer the fused linear function computes: ``nn.Linear``, GPT-2's ``Conv1D``, or a subclass of ``nn.Linear``
    that only restates its forward (:func:`linear_subclass_computes_linear`: Falcon's ``FalconLinear``) — each with a
    weight of plain elements: an ``nn.Linear`` whose weight torchao or quanto quantized into a tensor subclass, or
    transformers stored in fp8 (:func:`~bread_kernels.quantized.quantized_weight`), keeps its own forward."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and quantized_weight(weight) is not None:
        return False
    if type(module) is nn.Linear or (Conv1D is not None and isinstance(module, Conv1D)):
        return True
    return isinstance(module, nn.Linear) and linear_subclass_computes_linear(module)


#: what a subclass's forward raises on a probe it does not take: it then computes something else than a linear
_PROBE_REFUSALS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError, NotImplementedError,
                   AssertionError)


def linear_subclass_computes_linear(module: nn.Linear) -> bool:
    """Whether a subclass of ``nn.Linear`` computes ``y = x Wᵀ + b`` and nothing else: no parameters, buffers or
    submodules of its own beyond ``weight`` and ``bias``, and a forward whose result on probe rows [4, 16, 48] with
    a random weight [40, 48] and bias [40] (in the layer's dtype and device, in evaluation and training mode) is
    ``F.linear``'s bit for bit, as the fused forward computes it.  Falcon's ``x @ Wᵀ + b`` is, in fp32 and without
    a bias in bf16; with a bias in bf16 it rounds the product before adding the bias, which ``F.linear`` does not,
    so such a layer keeps its own forward and ``patch`` names it.  A layer on the meta device fails the probe; one
    whose weight ZeRO-3 has partitioned (empty until gathered) is probed as one built whole.

    The answer is the class's forward's (and its plain settings'), so it is probed once per (class, dtype, bias or
    not, device type, the instance's number/string/bool attributes) and kept: a 60-layer model's hundreds of such
    layers cost one small probe, not a weight-sized random tensor each."""
    own = set(module._parameters) - {"weight", "bias"}
    if own or module._buffers or module._modules:
        return False
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or not weight.is_floating_point():
        return False
    if weight.dim() != 2 and not _partitioned(weight):
        return False
    key = (type(module), weight.dtype, module.bias is None, weight.device.type, _settings(module))
    answer = _PROBED.get(key)
    if answer is None:
        answer = _PROBED[key] = _probe_computes_linear(module, weight.dtype, weight.device)
    return answer


def _partitioned(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a parameter whose tensor a sharding engine emptied (ZeRO-3 keeps a partitioned
    parameter as an empty 1-D tensor until it gathers it: a model built under ``zero.Init``, or patched after
    ``initialize``).  The probe does not read the weight, so such a layer is probed as one built whole."""
    return weight.dim() == 1 and weight.numel() == 0


#: :func:`linear_subclass_computes_linear`'s answers, by (class, dtype, no bias, device type, settings)
_PROBED: dict[tuple, bool] = {}


def _settings(module: nn.Module) -> tuple:
    """The instance's plain attributes a forward may read (a scale, a flag), beyond the sizes and the mode."""
    return tuple(sorted((name, value) for name, value in vars(module).items()
                        if isinstance(value, (bool, int, float, str)) and
                        name not in ("in_features", "out_features", "training")))


def _probe_computes_linear(module: nn.Linear, dtype: torch.dtype, device: torch.device) -> bool:
    """The probe of :func:`linear_subclass_computes_linear`: random operands, not the layer's own (a bias
    initialised to zeros hides the bias add's rounding until it trains; a partitioned weight cannot be read), held
    by a shallow copy of the module sized to them."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def operand(*shape):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    n_out, n_in = 40, 48
    probe = copy.copy(module)
    probe._parameters = {"weight": operand(n_out, n_in), "bias": None if module.bias is None else operand(n_out)}
    probe.in_features, probe.out_features = n_in, n_out
    x = operand(4, 16, n_in)
    try:
        with torch.no_grad():
            expected = F.linear(x, probe.weight, probe.bias)
            for mode in (False, True):
                probe.training = mode
                got = type(module).forward(probe, x)
                if not (isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected)):
                    return False
    except _PROBE_REFUSALS:
        return False
    return True


def peft_remapped_targets(model: nn.Module) -> set[str]:
    """The ``target_modules`` names that peft turns into LoRA on expert parameters (``target_parameters``) for this
    model's type — transformers-4 names of a transformers-5 MoE's fused experts (``gate_proj``, ``up_proj``,
    ``down_proj``, ``gate`` on a DeepSeek-V3, Qwen3-MoE, OLMoE ...) — also where such a name is a linear too (a
    dense or shared-expert MLP's).  Read from peft's private conversion tables (peft 0.21); empty where they are
    missing or the model type has none."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:
        return set()
    config = getattr(model, "config", None)
    base = _MODEL_TO_CONVERSION_PATTERN.get(getattr(config, "model_type", None))
    return set(_MOE_TARGET_MODULE_MAPPING.get(base) or ())


def lora_layer_classes() -> list[type]:
    """The peft layer classes the fused LoRA function serves (empty without peft)."""
    return [LoraLinear] if LoraLinear is not None else []


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA linear layer (``peft.tuners.lora.Linear``); False when peft is not installed."""
    return LoraLinear is not None and isinstance(module, LoraLinear)


def is_param_wrapper(module: nn.Module) -> bool:
    """A peft LoRA on a module's parameters (``peft.tuners.lora.ParamWrapper``, from ``target_parameters``)."""
    return ParamWrapper is not None and isinstance(module, ParamWrapper)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every peft LoRA linear layer of ``model`` (qualified name, module)."""
    return [(n, m) for n, m in model.named_modules() if is_lora_layer(m)]


def is_adapter_name(name: str) -> bool:
    """A peft LoRA adapter parameter (``...q_proj.lora_A.default.weight``)."""
    return ".lora_" in name or name.startswith("lora_")


def tuner_adapter_attributes() -> set[str]:
    """The attribute names under which peft's tuner layers hold their trainable adapters, every tuner's
    (``BaseTunerLayer.adapter_layer_names`` of its subclasses: ``lora_A``, ``hada_w1_a`` of LoHa, ``ia3_l``,
    ``vera_lambda_b``, ``oft_R``, ``ln_tuning_layers``, ...); empty without peft.  Walked at each call: a tuner
    imported later is seen."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional
        return set()
    attributes, classes = set(), [BaseTunerLayer]
    while classes:
        cls = classes.pop()
        attributes.update(getattr(cls, "adapter_layer_names", ()))
        classes.extend(cls.__subclasses__())
    return attributes


def non_lora_adapter_names(names) -> list[str]:
    """The names among ``names`` of adapter parameters of a peft tuner other than LoRA (LoHa's
    ``….q_proj.hada_w1_a.default``, IA3's ``….k_proj.ia3_l.default``): a name part is one of
    :func:`tuner_adapter_attributes`, and it is not a LoRA adapter's (:func:`is_adapter_name`)."""
    attributes = tuner_adapter_attributes()
    return [name for name in names if not is_adapter_name(name) and not attributes.isdisjoint(name.split("."))]


def peft_wrapping(module: nn.Module) -> str | None:
    """How peft wraps ``module``, said for a user, or None: a tuner layer (LoRA or another adapter on it, its
    original as ``base_layer``), or an auxiliary training wrapper (``modules_to_save``' copies,
    ``trainable_token_indices``' delta).  None without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # peft is optional (or too old to have the wrapper class: then nothing is named)
        return None
    if isinstance(module, BaseTunerLayer):
        return "peft wraps it in a tuner layer (an adapter on the embedding, peft's target_modules)"
    if isinstance(module, AuxiliaryTrainingWrapper):
        return "peft wraps it in copies (modules_to_save) or adds trained rows to it (trainable_token_indices)"
    return None


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of a peft LoRA layer (none for a plain linear)."""
    return [p for attr in ("lora_A", "lora_B") if isinstance(getattr(module, attr, None), nn.ModuleDict)
            for p in getattr(module, attr).parameters()]


def trained_adapter(module: nn.Module, name: str) -> str | None:
    """The one active adapter of the peft LoRA layer ``name``, or None when the adapters do not contribute.  An
    adapter the fused function does not compute (:func:`_refuse_variant`; one added after ``patch`` with
    ``add_adapter``/``load_adapter``) is refused here, at every training forward."""
    if module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        raise ValueError(
            f"bread_kernels: LoRA layer {name} has {len(active)} active adapters {active}; the fused "
            "backward trains one adapter per layer. Activate one with model.set_adapter(name), or merge the others "
            "into the base weights first"
        )
    if not active:
        return None
    adapter = active[0]
    variants, biases = module.__dict__.get("lora_variant"), module.__dict__.get("lora_bias")  # peft's plain dicts
    if biases is None or (variants and adapter in variants) or biases.get(adapter):  # (cheap: every forward)
        _refuse_variant("bread_kernels", name, module, adapter)
    return adapter


def fusable_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer the fused LoRA function computes: one over a layer the fused linear computes
    (:func:`is_linear_layer`).  Another — LoRA over a quantized base (torchao's ``TorchaoLoraLinear``, peft's
    ``lora.Linear`` over a quanto ``QLinear`` or an fp8 linear), or over an ``nn.Linear`` subclass with a forward of
    its own — keeps peft's forward and plain autograd, as peft's bitsandbytes, HQQ and GPTQ LoRA layers (no
    ``lora.Linear``) do; its adapters, plain ``nn.Linear`` layers, are fused one by one."""
    return is_lora_layer(module) and is_linear_layer(module.get_base_layer())


def check_lora_layer(name: str, module: nn.Module) -> None:
    """Refuse, at patch time, the peft LoRA configurations the fused function does not compute."""
    for adapter in module.lora_A:
        _refuse_variant("patch", name, module, adapter)


def _refuse_variant(who: str, name: str, module: nn.Module, adapter: str) -> None:
    """Refuse an adapter the fused LoRA function does not compute: a peft variant (DoRA's magnitude, aLoRA, ...) or
    a bias on ``lora_B``, which it would silently leave out."""
    if adapter in getattr(module, "lora_variant", {}):
        raise NotImplementedError(
            f"{who}: LoRA layer {name} uses the peft variant {type(module.lora_variant[adapter]).__name__} "
            f"(adapter {adapter!r}: DoRA, aLoRA, ...); bread_kernels fuses plain LoRA only. Use a LoraConfig "
            "without use_dora and the other variant options, or train this model without patch()"
        )
    if module.lora_B[adapter].bias is not None:
        raise NotImplementedError(
            f"{who}: LoRA layer {name} has a bias on lora_B (adapter {adapter!r}, LoraConfig(lora_bias=True)), "
            "which the fused backward does not train; use lora_bias=False"
        )
