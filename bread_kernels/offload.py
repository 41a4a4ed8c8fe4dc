"""Which parameters hold no values in the model: on the meta device, offloaded by accelerate or never loaded.

accelerate's big-model machinery (``from_pretrained(..., device_map=...)`` with modules on ``"disk"``, or on
``"cpu"`` beside an accelerator; ``cpu_offload``, ``disk_offload``, ``dispatch_model`` with an offload folder,
``load_checkpoint_and_dispatch``) keeps an offloaded module's weights apart (in RAM or in files) and leaves its
parameters on the meta device.  An ``AlignDevicesHook`` wrapped around the module's ``forward`` hands each call a
temporary parameter built from the stored copy and puts the meta one back after it.  So:

* a forward that reads the weight without that hook computes from a meta tensor, which ``F.linear`` of a CPU input
  answers with an uninitialised CPU tensor, not an error: ``patch`` installs its own forwards on the layers, which
  is why it refuses such a model (:func:`offloaded_parameter`);
* a gradient lands on the temporary parameter, and a write into it (Adam's step, an on-the-fly SGD/sign update) is
  dropped with it, or written into a copy read anew from disk at the next forward: nothing trains a meta parameter,
  which is why an optimizer refuses any role but FROZEN on one (:func:`meta_parameter_refusal`).  Plain autograd
  with a torch optimizer, the reference, silently leaves such weights untouched; frozen, they are fine (LoRA
  adapters over an offloaded base, on the unpatched path, train as the reference's do).

A model built on the meta device and not dispatched (``torch.device("meta")``, ``init_empty_weights``) carries no
hook: ``patch`` accepts it, and it trains once materialised (``to_empty`` and ``load_state_dict``) before the
optimizer is built.  The bottom of the package: it imports nothing of it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["offloaded_parameter", "offload_refusal", "meta_parameter_refusal"]

REMEDY = ("load every weight into the model: from_pretrained without offloading (device_map=None, or one device "
          "that holds the whole model, and no offload_folder), not through accelerate's cpu_offload/disk_offload/"
          "dispatch_model with offloaded modules (accelerate.hooks.remove_hook_from_submodules does not bring the "
          "weights back); a model too large for one device trains sharded under DeepSpeed ZeRO-3 "
          "(bread_kernels.integrations.deepspeed)")


def _has_accelerate_hook(module: nn.Module) -> bool:
    return getattr(module, "_hf_hook", None) is not None


def offloaded_parameter(model: nn.Module) -> str | None:
    """The name of a parameter of ``model`` that accelerate offloads (on the meta device in a model carrying
    accelerate's hooks), or None."""
    if not any(_has_accelerate_hook(m) for m in model.modules()):
        return None
    return next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)


def offload_refusal(what: str, name: str) -> str:
    return (f"{what}: parameter {name} is offloaded by accelerate (it lies on the meta device, and accelerate's "
            "hooks hand each forward a temporary copy of it): the fused layers read each weight from the model, "
            "where they would compute from the empty meta tensor, and an update written into the copy would be "
            f"dropped with it. To train the model, {REMEDY}")


def meta_parameter_refusal(what: str, name: str, role: str, when: str = "") -> str:
    return (f"{what}: parameter {name} would be {role}{when}, but it holds no values to update: it is on the meta "
            "device, where accelerate leaves an offloaded weight (from_pretrained with device_map=..., cpu_offload, "
            "disk_offload, dispatch_model with an offload folder; peft puts an offloaded layer's LoRA adapters there "
            "too) and hands each forward a temporary copy that takes the gradient and any update and is then "
            "dropped, or where a model built on the meta device was never loaded. Nothing would train it. To train "
            f"it, {REMEDY}; a model built on the meta device: model.to_empty(device=...) and load its state_dict "
            "before building the optimizer. To leave it frozen, leave it out of named_parameters_list")
