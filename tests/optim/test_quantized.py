"""Block coordinate descent over a quantized base model (QLoRA-style: bitsandbytes, torchao, fp8 linears).

A quantized weight can only stay frozen: BlockOptimizer refuses roles that would train it, naming the remedies,
and LoRA adapters over it train as peft's own autograd trains them — against the plain-autograd reference
(:class:`~tests.optim.reference_bcd.ReferenceBCD`) on an unpatched copy.  The hand-built look-alikes
(:class:`~tests.model_zoo.Int8Linear`) run everywhere; the real libraries' tests skip where they are not installed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bread_kernels
from bread_kernels.patch import patched_state

from tests import model_zoo as models
from .reference_bcd import ReferenceBCD, block_prefixes

STEPS = 3
ADAM = dict(lr=1e-2, eps=1e-3, weight_decay=0.01)
LORA_TARGETS = dict(target_modules=["q_proj", "v_proj", "down_proj"])


def _with_lora(model):
    """peft LoRA (random B, so A trains from the first step) on three linears of each block."""
    import peft

    torch.manual_seed(5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **LORA_TARGETS))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return wrapped


def _train_reference(model, **bcd):
    layers, embedding = models.layout(model.get_base_model())
    layers = [models.PEFT_PREFIX + p for p in layers]
    names = [n for n, _ in model.named_parameters()]
    blocks = block_prefixes(names, layers, models.PEFT_PREFIX + embedding)
    reference = ReferenceBCD(model, blocks, loss_fn=models.loss_of, optimizer_kwargs=dict(ADAM),
                             switch_block_every=2, **bcd)
    for ids in models.batches(STEPS):
        reference.step(ids)


def _train_engine(model, **bcd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized layers' "keep plain autograd"
        bread_kernels.patch(model)
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), **ADAM),
                                           list(model.named_parameters()), switch_block_every=2, verbose=0, **bcd)
    for ids in models.batches(STEPS):
        models.loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad()


def _plain(p: torch.Tensor) -> bool:
    return type(p) in (torch.Tensor, torch.nn.Parameter)


def _bits(p: torch.Tensor) -> torch.Tensor:
    return p.detach().view(torch.uint8) if p.dtype.itemsize == 1 else p.detach()


def _assert_trained_alike(original, **bcd):
    """``original`` trained by the engine (patched) and by the reference (unpatched) gives the same parameters: the
    adapters to fp32 rounding, the quantized weights bit for bit (and as they were); only adapters moved."""
    reference, trained = copy.deepcopy(original), copy.deepcopy(original)
    _train_reference(reference, **bcd)
    _train_engine(trained, **bcd)
    before, expected = dict(original.named_parameters()), dict(reference.named_parameters())
    for name, p in trained.named_parameters():
        if not _plain(p):  # a tensor subclass (torchao): frozen, as no update could write it
            continue
        if p.is_floating_point() and p.dtype.itemsize > 1:
            torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(_bits(p), _bits(expected[name])), name
        assert (".lora_" in name) != torch.equal(_bits(p), _bits(before[name])), f"{name} moved or stayed wrongly"


def test_bcd_target_quantized_weight_is_refused_with_the_remedy():
    """BAdam over an int8 base: Adam would train the active block's int8 weights (torch cannot even make them
    require grad); refused at construction, naming adapter_only and leaving them out, with nothing touched."""
    model = models.quantize_blocks(models.llama(layers=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bread_kernels.patch(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"q_proj\.weight is a quantized weight \(stored as torch\.int8\).*ACTIVE"
                                         r".*lora_mode='adapter_only'.*out of named_parameters_list"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), **ADAM), list(model.named_parameters()),
                                     verbose=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert patched_state(model).driver is None


def test_sgd_on_a_quantized_weight_is_refused():
    """sgd_mode='all' with LoRA adapter_only would give the inactive int8 base weights the on-the-fly update."""
    model = _with_lora(models.quantize_blocks(models.llama(layers=2)))
    with pytest.raises(ValueError, match=r"quantized weight.*would be SGD"):
        bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), **ADAM), list(model.named_parameters()),
                                     verbose=0, lora_mode="adapter_only", sgd_mode="all")


@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_lora_adapter_only_over_a_quantized_look_alike_matches_the_reference(weight_dtype):
    """QLoRA with BCD over the adapters: peft's lora.Linear over an nn.Linear subclass with a quantized weight keeps
    peft's forward (patch refused it as a quantized base, and an fp8 weight as a float64-like dtype to cast), its
    adapters are fused as plain linears, and training matches the reference."""
    _assert_trained_alike(_with_lora(models.quantize_blocks(models.llama(layers=2), weight_dtype)),
                          lora_mode="adapter_only")


def test_badam_over_the_unquantized_rest_of_a_quantized_model_matches_the_reference():
    """The quantized weights left out of the list: each block trains its norms, BREAD-SGD moves the embedding and
    the head, and the int8 weights stay frozen."""
    original = models.quantize_blocks(models.llama(layers=2))
    reference, trained = copy.deepcopy(original), copy.deepcopy(original)
    bcd = dict(sgd_mode="all")
    layers, embedding = models.layout(reference)
    floating = [n for n, p in reference.named_parameters() if p.is_floating_point()]
    ref = ReferenceBCD(reference, block_prefixes(floating, layers, embedding), loss_fn=models.loss_of,
                       optimizer_kwargs=dict(ADAM), switch_block_every=2, **bcd)
    ref.params = {n: p for n, p in ref.params.items() if n in floating}
    ref.names = floating
    ref._new_base_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bread_kernels.patch(trained)
        named = [(n, p) for n, p in trained.named_parameters() if p.is_floating_point()]
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW([p for _, p in named], **ADAM), named,
                                           switch_block_every=2, verbose=0, **bcd)
    for ids in models.batches(STEPS):
        ref.step(ids)
        models.loss_of(trained, ids).backward()
        opt.step()
        opt.zero_grad()
    models.assert_same_parameters(reference, trained)


def _with_a_complex_parameter(model):
    """``model`` (a zoo Llama) with a complex64 parameter in block 0's MLP, which adds ``0.01·Σ Re(c²)`` to its
    output: a weight of another dtype that is not quantized, trained by Adam as any other."""
    mlp = model.model.layers[0].mlp
    mlp.phase = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(6)))
    mlp.register_forward_hook(lambda module, args, output: output + 0.01 * (module.phase * module.phase).real.sum())
    return model


def test_a_complex_parameter_is_no_quantized_weight_and_trains_as_the_reference():
    """A complex64 parameter (neither floating nor one byte wide, but no quantized storage) in an active block: Adam
    trains it as the reference does, with the rest of the model (it was refused as a quantized weight)."""
    original = _with_a_complex_parameter(models.llama(layers=2))
    reference, trained = copy.deepcopy(original), copy.deepcopy(original)
    layers, embedding = models.layout(reference)
    ref = ReferenceBCD(reference, block_prefixes([n for n, _ in reference.named_parameters()], layers, embedding),
                       loss_fn=models.loss_of, optimizer_kwargs=dict(ADAM), switch_block_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bread_kernels.patch(trained)
        opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(trained.parameters(), **ADAM),
                                           list(trained.named_parameters()), switch_block_every=2, verbose=0)
    for ids in models.batches(STEPS):
        ref.step(ids)
        models.loss_of(trained, ids).backward()
        opt.step()
        opt.zero_grad()
    assert "model.layers.0.mlp.phase" in models.moved_parameters(original, reference)
    models.assert_same_parameters(reference, trained)


def test_lora_over_bitsandbytes_8bit_matches_the_reference(tmp_path):
    """The real thing: a model loaded with BitsAndBytesConfig(load_in_8bit=True) (bitsandbytes' CPU backend),
    peft's Linear8bitLt LoRA layers, BCD over the adapters."""
    pytest.importorskip("bitsandbytes")
    import transformers

    models.llama(layers=2).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    model.config._attn_implementation = "eager"
    _assert_trained_alike(_with_lora(model.train()), lora_mode="adapter_only")


def test_lora_over_torchao_int8_matches_the_reference():
    """torchao's quantize_ keeps each nn.Linear (the head too) and swaps its weight for an Int8Tensor: such a layer,
    peft's TorchaoLoraLinear over it and the head keep their own forward (the fused linear crashed in aten.mm on
    it), and the adapters train as the reference trains them."""
    quantization = pytest.importorskip("torchao.quantization")
    model = models.llama(layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
        model = _with_lora(model)
    _assert_trained_alike(model, lora_mode="adapter_only")
