"""patch's fused elementwise work (RMSNorm, SwiGLU, the rotary embedding) on a whole model: what it installs and
removes, and what a block then saves for its backward."""

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

import bread_kernels
from bread_kernels.functions.rotary import RotaryDispatch
from bread_kernels.patch import patched_state
from tests.model_zoo import BUILDERS


def _llama(dtype=torch.bfloat16):
    return BUILDERS["llama"](dtype=dtype)


def test_patch_installs_the_fused_forwards_and_unpatch_and_the_option_remove_them():
    fused_kinds = (LlamaRMSNorm, LlamaMLP, LlamaAttention)
    model = _llama()
    modules = [m for m in model.modules() if isinstance(m, fused_kinds)]
    original_rotary = modeling_llama.apply_rotary_pos_emb
    bread_kernels.patch(model)
    assert sorted(n for n, _ in patched_state(model).fused_elementwise) == \
        sorted(n for n, m in model.named_modules() if isinstance(m, fused_kinds))
    assert all("forward" in m.__dict__ for m in modules)
    assert isinstance(modeling_llama.apply_rotary_pos_emb, RotaryDispatch)
    bread_kernels.patch(model, fused_elementwise=False)
    assert not any("forward" in m.__dict__ for m in modules)
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    bread_kernels.patch(model, fused_elementwise=True)
    assert all("forward" in m.__dict__ for m in modules)
    bread_kernels.unpatch(model)
    assert not any("forward" in m.__dict__ for m in modules)
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    with pytest.raises(TypeError, match="fused_elementwise must be True or False"):
        bread_kernels.patch(model, fused_elementwise="yes")


def _saved_bytes(layer, x, position_embeddings) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``layer``, less its input and parameters."""
    alive = {t.untyped_storage().data_ptr() for t in [x, *position_embeddings, *layer.parameters()]}
    saved = {}

    def pack(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in alive:
            saved[pointer] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LlamaDecoderLayer.forward(layer, x, position_embeddings=position_embeddings)  # not the streamed forward
    return sum(saved.values())


def test_a_frozen_bf16_llama_block_saves_no_fp32_copy_of_its_inputs_and_no_silu():
    """HF's norm saves x in fp32 for its backward (two per block); the fused one saves the bf16 input, which for
    the first norm is the block's own input: (4 + 4 − 2)·H bytes less per token.  The SwiGLU product saves its two
    inputs and not silu(a): 2·I bytes less."""
    model = _llama()
    layer = model.model.layers[0].requires_grad_(False)
    tokens, hidden, inter = 2 * 9, model.config.hidden_size, model.config.intermediate_size
    x = torch.randn(2, 9, hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(9).unsqueeze(0)
    position_embeddings = model.model.rotary_emb(x, positions)
    plain = _saved_bytes(layer, x, position_embeddings)
    bread_kernels.patch(model)
    fused = _saved_bytes(layer, x, position_embeddings)
    assert plain - fused == ((4 + 4 - 2) * hidden + 2 * inter) * tokens


def test_a_module_with_another_librarys_instance_forward_keeps_it():
    """accelerate's hooks (``dispatch_model``) replace a module's instance ``forward``: patch leaves such a module
    alone, and unpatch does not remove what it did not install."""
    model = _llama()
    norm = model.model.norm
    calls = []
    own = norm.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    norm.forward = hooked
    bread_kernels.patch(model)
    assert norm.forward is hooked and all(m is not norm for _, m in patched_state(model).fused_elementwise)
    bread_kernels.unpatch(model)
    assert norm.forward is hooked


def test_a_model_kernelized_by_the_kernels_library_keeps_its_rotary_embedding():
    """``use_kernels=True`` (the `kernels` library's hub layers, a rotary kernel among them) is the user's choice of
    kernel: patch fuses the norms and MLPs but leaves the attention's rotary embedding alone."""
    model = _llama()
    model._use_kernels = True  # what set_use_kernels records after kernelize (which needs the hub)
    original_rotary = modeling_llama.apply_rotary_pos_emb
    bread_kernels.patch(model)
    fused = [m for _, m in patched_state(model).fused_elementwise]
    assert not any(isinstance(m, LlamaAttention) for m in fused) and any(isinstance(m, LlamaMLP) for m in fused)
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    bread_kernels.unpatch(model)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_activation_swapped_after_patch_is_the_one_computed(family):
    """An MLP's ``act_fn`` replaced after ``patch`` (``mlp.act_fn = nn.GELU()``): the fused SwiGLU forward computed
    ``silu`` regardless, in evaluation and in training (logits 4e-3 off the unpatched model's).  The MLP now runs
    its own forward, and BREAD-SGD over it trains as the plain-autograd reference does."""
    import copy

    from tests import model_zoo as models

    original = models.llama(layers=2) if family == "llama" else models.causal_lm("qwen2")
    reference, model = copy.deepcopy(original), bread_kernels.patch(copy.deepcopy(original), fused_loss=False)
    for each in (reference, model):
        each.model.layers[0].mlp.act_fn = torch.nn.GELU()
    ids = models.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)
    layers = [f"model.layers.{i}." for i in range(2)]
    models.assert_sgd_all_trains_as_the_reference(reference, model, blocks=(layers, "model.embed_tokens."))
