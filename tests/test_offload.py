"""Models whose weights accelerate offloads (``from_pretrained(device_map=...)`` with a module on ``"disk"``,
``cpu_offload``, ``disk_offload``): their parameters lie on the meta device and accelerate's hooks hand each forward
a temporary copy.  ``patch`` refuses them (its fused layers would compute from the meta tensors: an uninitialised
result, not an error), an optimizer refuses to train a meta parameter (the update would land in the dropped copy),
and what can train — the other weights around a frozen offloaded one, on the unpatched path — trains as the
plain-autograd reference on a copy loaded whole.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bread_kernels
from bread_kernels.patch import patched_state

from tests import model_zoo as models
from .optim.reference_bcd import ReferenceBCD, block_prefixes

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

STEPS = 3
ADAM = dict(lr=1e-2, eps=1e-3, weight_decay=0.01)
CPU_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
           **{f"model.layers.{i}": "cpu" for i in range(3)}}


def _saved(tmp_path):
    model = models.llama(layers=3)
    model.save_pretrained(tmp_path / "saved")
    return model


def _loaded(tmp_path, on_disk: str):
    """The saved model loaded with ``on_disk`` offloaded to the disk, everything else on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some parameters are on the meta device"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", device_map={**CPU_MAP, on_disk: "disk"}, offload_folder=tmp_path / "offload",
            attn_implementation="eager")
    return model.train()


def _offloaded(tmp_path, how: str):
    original = _saved(tmp_path)
    if how == "cpu_offload":
        return original, accelerate.cpu_offload(copy.deepcopy(original), execution_device="cpu")
    if how == "disk_offload":
        return original, accelerate.disk_offload(copy.deepcopy(original), tmp_path / "disk", execution_device="cpu")
    return original, _loaded(tmp_path, how)


@pytest.mark.parametrize("how", ["model.layers.1", "model.norm", "lm_head", "cpu_offload", "disk_offload"])
def test_patch_refuses_a_model_whose_weights_accelerate_offloads(tmp_path, how):
    """Patched, such a model's fused layers bypassed accelerate's hooks: the forward ran on the meta weights and gave
    a wrong loss (an lm_head on the disk: ~131 in place of ~4.66), with or without grad, and its training dropped
    the final norm's on-the-fly updates.  Refused, with the model left as it was."""
    original, model = _offloaded(tmp_path, how)
    ids = models.batch(0)
    with pytest.raises(ValueError, match="offloaded by accelerate.*device_map=None"):
        bread_kernels.patch(model)
    assert patched_state(model) is None
    with torch.no_grad():
        torch.testing.assert_close(models.loss_of(model, ids), models.loss_of(original, ids))


@pytest.mark.parametrize("on_disk, bcd, refused", [
    ("model.layers.1", dict(sgd_mode="disabled"), r"model.layers.1.self_attn.q_proj.weight .* ACTIVE while block 1"),
    ("model.norm", dict(sgd_mode="all"), r"model.norm.weight .* SGD while block 0"),
    ("model.norm", dict(sgd_mode="all", sgd_use_sign=True), r"model.norm.weight .* SIGN while block 0"),
    ("model.layers.1", dict(lora_mode="adapter_only"), r"q_proj.lora_A.default.weight .* ACTIVE while block 1"),
], ids=["badam", "sgd", "sign", "lora"])
def test_block_optimizer_refuses_to_train_an_offloaded_weight(tmp_path, on_disk, bcd, refused):
    """Unpatched (plain autograd and hooks), the gradient reached only accelerate's temporary copy: the optimizer's
    hooks and base optimizer never saw it, and the offloaded weights silently stayed as loaded (peft puts the
    adapters of an offloaded layer on the meta device too, where autograd's backward fails).  Refused at
    construction, before anything on the model is touched."""
    _saved(tmp_path)
    model = _loaded(tmp_path, on_disk)
    if "lora_mode" in bcd:
        model = models.with_lora(model, r=4)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=f"{refused} is active, but it holds no values.*accelerate leaves"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), **ADAM), list(model.named_parameters()),
                                     verbose=0, **bcd)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def _reference(model, **bcd):
    layers, embedding = models.layout(model)
    blocks = block_prefixes([n for n, _ in model.named_parameters()], layers, embedding)
    reference = ReferenceBCD(model, blocks, loss_fn=models.loss_of, optimizer_kwargs=dict(ADAM),
                             switch_block_every=1, **bcd)
    for ids in models.batches(STEPS):
        reference.step(ids)


def _engine(model, **bcd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow path's warning
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), **ADAM),
                                           list(model.named_parameters()), switch_block_every=1, verbose=0, **bcd)
    for ids in models.batches(STEPS):
        models.loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad()


def _stored(model) -> dict[str, torch.Tensor]:
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return get_state_dict_offloaded_model(model)


def test_badam_with_a_frozen_offloaded_norm_trains_as_the_reference(tmp_path):
    """BAdam never writes the final norm: offloaded, it is read through accelerate's hook like any frozen weight."""
    original = _saved(tmp_path)
    model = _loaded(tmp_path, "model.norm")
    reference = copy.deepcopy(original)
    _reference(reference)
    _engine(model)
    stored = _stored(model)
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(stored[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(stored["model.layers.1.self_attn.q_proj.weight"],
                           original.state_dict()["model.layers.1.self_attn.q_proj.weight"])


def test_a_model_built_on_the_meta_device_patches_and_trains_once_loaded():
    """No hook, no offload: patch accepts a model built on the meta device, which trains exactly once
    ``to_empty`` and ``load_state_dict`` give it its weights before the optimizer is built."""
    original = models.llama(layers=3)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(original.config)
    bread_kernels.patch(model.train(), fused_loss=False)
    model.to_empty(device="cpu")
    model.load_state_dict(original.state_dict())
    model.model.rotary_emb.inv_freq.copy_(original.model.rotary_emb.inv_freq)  # a buffer outside the state_dict
    reference = copy.deepcopy(original)
    _reference(reference, sgd_mode="all")
    _engine(model, sgd_mode="all")
    models.assert_same_parameters(reference, model)
