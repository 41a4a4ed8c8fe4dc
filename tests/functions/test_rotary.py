"""The fused rotary embedding against transformers' ``apply_rotary_pos_emb`` under autograd (bit for bit, on every
backend), float64 and gradcheck; which calls and which functions it takes over; the dispatcher's lifetime."""

import copy
import gc

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

import bread_kernels
from bread_kernels.functions import rotary
from bread_kernels.functions.rotary import RotaryDispatch, RotaryFunction, rotary_embedding
from tests.model_zoo import BUILDERS

from ..aten_ops import AtenOps
from ..conftest import DEVICE, DTYPES


def _inputs(dtype, table_batch=1, seed=0, device=DEVICE, table_dtype=None):
    """q [3, 5, 7, 10] and k [3, 2, 7, 10] as the projections' transposed views (GQA: fewer k heads), cos and sin
    [1 or 3, 7, 10] (random: every element matters; in ``table_dtype``, by default q's), the outputs' gradients (in
    the dtype q·cos promotes to)."""
    gen = torch.Generator().manual_seed(seed)
    table_dtype = table_dtype or dtype

    def rand(*shape, scale=3.0, dtype=dtype):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    q, k = rand(3, 7, 5, 10).transpose(1, 2), rand(3, 7, 2, 10).transpose(1, 2)
    cos, sin = rand(table_batch, 7, 10, scale=1.0, dtype=table_dtype), rand(table_batch, 7, 10, scale=1.0,
                                                                            dtype=table_dtype)
    out_dtype = torch.promote_types(dtype, table_dtype)
    return q, k, cos, sin, (rand(3, 5, 7, 10, dtype=out_dtype), rand(3, 2, 7, 10, dtype=out_dtype))


def _run(rotate, q, k, cos, sin, grads):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_embed, k_embed = rotate(q, k, cos, sin)
    torch.autograd.backward((q_embed, k_embed), grads)
    return q_embed, k_embed, q.grad, k.grad


#: (q's dtype, cos's): one dtype, and the mixes of autocast on an fp32 model (a bf16/fp16 q, an fp32 cos) and back
MIXES = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("table_batch", [1, 3])
@pytest.mark.parametrize("dtypes", MIXES, ids=lambda m: "-".join(str(d)[6:] for d in m))
def test_values_and_gradients_are_autograds_bit_for_bit(backend, dtypes, table_batch):
    q, k, cos, sin, grads = _inputs(dtypes[0], table_batch, table_dtype=dtypes[1])
    expected = _run(apply_rotary_pos_emb.forward if isinstance(apply_rotary_pos_emb, torch.nn.Module)
                    else apply_rotary_pos_emb, q, k, cos, sin, grads)
    got = _run(rotary_embedding, q, k, cos, sin, grads)
    for fused, plain in zip(got, expected):
        assert fused.dtype == plain.dtype and fused.shape == plain.shape
        assert torch.equal(fused, plain)


def test_matches_float64():
    q, k, cos, sin, grads = _inputs(torch.float32)
    wide = [t.double() for t in (q, k, cos, sin)]
    expected = _run(lambda q, k, c, s: (q * c[:, None] + rotate_half(q) * s[:, None],
                                        k * c[:, None] + rotate_half(k) * s[:, None]),
                    *wide, tuple(g.double() for g in grads))
    for fused, exact in zip(_run(rotary_embedding, q, k, cos, sin, grads), expected):
        torch.testing.assert_close(fused.double(), exact, rtol=1e-6, atol=1e-5)


def test_gradcheck_and_double_backward():
    q, k, cos, sin, _ = _inputs(torch.float64)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: RotaryFunction.apply(q, k, cos, sin), (q, k))
    assert torch.autograd.gradgradcheck(lambda q, k: RotaryFunction.apply(q, k, cos, sin), (q, k))


def test_each_result_has_autograds_layout():
    """q_embed has q's layout (the transposed projection output) and ∂L/∂q autograd's (contiguous, whatever g's),
    so the reductions downstream (a Qwen3 q_norm weight's gradient) sum in autograd's order."""
    q, k, cos, sin, grads = _inputs(torch.float32)
    grads = tuple(g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads)  # g in the projection's layout
    expected = _run(apply_rotary_pos_emb, q, k, cos, sin, grads)
    for fused, plain in zip(_run(rotary_embedding, q, k, cos, sin, grads), expected):
        assert fused.stride() == plain.stride()


@pytest.mark.parametrize("case", ["qwen3 fp32", "llama fp32 under bf16 autocast"])
def test_a_patched_model_trains_as_with_the_rotary_embedding_unfused(monkeypatch, case):
    """Whole model, every parameter's gradient bit for bit against the same engine with the dispatcher covering
    nothing (transformers' function under autograd): with a norm on q and k before the embedding (Qwen3), whose
    weight gradients sum over the rotary gradient's layout; and under Trainer's ``bf16=True`` (autocast on an fp32
    model: a bf16 q meets an fp32 cos)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if case.startswith("qwen3"):
        config = Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)
        base = Qwen3ForCausalLM(config).float()
    else:
        base = BUILDERS["llama"](dtype=torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 11))
    results = []
    for covers in (rotary._covers, lambda args, kwargs: False):
        monkeypatch.setattr(rotary, "_covers", covers)
        model = bread_kernels.patch(copy.deepcopy(base))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in case):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append({name: p.grad for name, p in model.named_parameters()})
        bread_kernels.unpatch(model)
    for name, grad in results[0].items():
        assert torch.equal(grad, results[1][name]), name


@pytest.mark.parametrize("transposed", [True, False], ids=["projection-layout", "contiguous"])
@pytest.mark.parametrize("table_batch", [1, 3])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_native_pass_splits_rows_across_threads_in_either_order(transposed, table_batch, backward):
    """Rows enough for several of the op's parallel chunks (256 rows of D=64 each), each chunk starting mid-head and
    mid-sequence, walked heads-innermost (x the transposed view of a projection) or sequence-innermost: the torch
    form's values bit for bit."""
    from bread_kernels.backends.native import NativeBackend, load_native
    from bread_kernels.backends.rotary import rotated

    load_native()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 101, 7, 64, generator=gen)
    x = x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()
    cos, sin = torch.randn(table_batch, 101, 64, generator=gen), torch.randn(table_batch, 101, 64, generator=gen)
    out = torch.empty(x.shape)
    NativeBackend().rotary_(out, x, cos, sin, backward)
    assert torch.equal(out, rotated(x, cos, sin, backward))


def test_native_backend_is_one_op_per_tensor_each_way(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "native")
    q, k, cos, sin, grads = _inputs(torch.bfloat16, device="cpu")
    q, k = q.contiguous(), k.contiguous()  # leaves of the gradient's layout: their .grad is then not copied
    with AtenOps() as ops:
        _run(rotary_embedding, q, k, cos, sin, grads)
    work = [n for n in ops.names if n not in ("empty", "empty_like", "detach", "alias")]
    assert work == ["rotary_"] * 4


@pytest.mark.parametrize("call", ["unsqueeze_dim=2", "partial", "q and k of two dtypes", "cos requires grad", "3-D q",
                                  "q alone, cos and sin by keyword", "position_ids"])
def test_calls_it_does_not_cover_run_the_original(call):
    """Inside a marked forward the dispatcher computes only the calls it covers; the rest reach the function it
    replaced, with that function's values."""
    q, k, cos, sin, _ = _inputs(torch.float32)
    args, kwargs = (q, k, cos, sin), {}
    if call == "unsqueeze_dim=2":
        args, kwargs = (q.transpose(1, 2), k.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2}
    elif call == "partial":
        args = (q, k, cos[..., :4].contiguous(), sin[..., :4].contiguous())
    elif call == "q and k of two dtypes":
        args = (q.bfloat16(), k, cos, sin)
    elif call == "cos requires grad":
        args = (q, k, cos.clone().requires_grad_(), sin)
    elif call == "3-D q":
        args = (q[0], k[0], cos, sin)
    elif call == "q alone, cos and sin by keyword":  # Qwen4-exp's indexer
        args, kwargs = (q.transpose(1, 2),), {"cos": cos, "sin": sin, "unsqueeze_dim": 2}
    else:  # transformers 4.4x's signature, (q, k, cos, sin, position_ids=None, unsqueeze_dim=1)
        args = (q, k, cos, sin, torch.arange(7)[None])
    calls = []

    def original(*a, **kw):
        calls.append(1)
        return "original"

    dispatch = RotaryDispatch(original)
    rotary._marked.depth = 1
    try:
        assert dispatch(*args, **kwargs) == "original" and calls
        calls.clear()
        for covered in ((q, k, cos, sin), (q, k, cos, sin, 1)):  # fused, unsqueeze_dim=1 given or not
            assert isinstance(dispatch(*covered)[0], torch.Tensor) and not calls
        assert isinstance(dispatch(q, k, cos, sin, unsqueeze_dim=1)[0], torch.Tensor) and not calls
    finally:
        rotary._marked.depth = 0


def _fake_modeling_namespace(function):
    """An attention class whose forward calls ``apply_rotary_pos_emb`` from its own module globals."""
    namespace = {"apply_rotary_pos_emb": function, "torch": torch}
    exec("def forward(self, q, k, cos, sin):\n    return apply_rotary_pos_emb(q, k, cos, sin)\n", namespace)
    attention = type("FakeAttention", (torch.nn.Module,), {"forward": namespace["forward"]})
    return namespace, attention


def _interleaved(q, k, cos, sin):
    """GPT-J's interleaved rotary form: pairs (2i, 2i+1), not halves."""
    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return q * cos[:, None] + rotate(q) * sin[:, None], k * cos[:, None] + rotate(k) * sin[:, None]


def _rounded_once(q, k, cos, sin):
    """The rotate-half form in fp32, rounded once at the end (as Liger's kernel computes): other bf16 values."""
    out = [(x.float() * cos[:, None].float() + rotate_half(x.float()) * sin[:, None].float()).to(x.dtype)
           for x in (q, k)]
    return tuple(out)


@pytest.mark.parametrize("function", [_interleaved, _rounded_once])
def test_a_function_that_computes_otherwise_is_left_alone(function):
    namespace, attention = _fake_modeling_namespace(function)
    module = attention()
    assert rotary.uses_rotary_embedding(module)
    assert not rotary.install_fused_rotary(module)
    assert namespace["apply_rotary_pos_emb"] is function and "forward" not in module.__dict__


def test_the_last_user_puts_the_function_back_also_when_dropped_without_unpatch():
    namespace, attention = _fake_modeling_namespace(lambda q, k, cos, sin: (q * cos[:, None] + rotate_half(q) *
                                                                           sin[:, None], k * cos[:, None] +
                                                                           rotate_half(k) * sin[:, None]))
    original = namespace["apply_rotary_pos_emb"]
    first, second = attention(), attention()
    assert rotary.install_fused_rotary(first) and rotary.install_fused_rotary(second)
    assert isinstance(namespace["apply_rotary_pos_emb"], RotaryDispatch)
    q, k, cos, sin, _ = _inputs(torch.float32)
    calls = []
    namespace["apply_rotary_pos_emb"].original = lambda *a: calls.append(1) or original(*a)
    first(q, k, cos, sin)  # marked: fused, the original is not called
    assert not calls
    namespace["apply_rotary_pos_emb"](q, k, cos, sin)  # unmarked (another model): the original
    assert calls
    namespace["apply_rotary_pos_emb"].original = original
    rotary.uninstall_fused_rotary(first)
    assert isinstance(namespace["apply_rotary_pos_emb"], RotaryDispatch) and "forward" not in first.__dict__
    del second
    gc.collect()
    assert namespace["apply_rotary_pos_emb"] is original


def test_a_patched_llama_uses_it_and_an_unpatched_one_beside_it_does_not():
    """While a patched model is alive, another Llama trains through transformers' own function (counted), and the
    patched one through the fused path (one rotary_ op per tensor each way on the native backend)."""
    gc.collect()  # models earlier tests dropped in reference cycles: until collected they still use the dispatcher
    patched, plain = BUILDERS["llama"](dtype=torch.float32), BUILDERS["llama"](dtype=torch.float32)
    bread_kernels.patch(patched)
    dispatch = modeling_llama.apply_rotary_pos_emb
    assert isinstance(dispatch, RotaryDispatch)
    calls = []
    original = dispatch.original
    dispatch.original = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        ids = torch.randint(0, plain.config.vocab_size, (2, 9))
        plain(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == plain.config.num_hidden_layers
        calls.clear()
        patched(input_ids=ids, labels=ids).loss.backward()
        assert not calls
    finally:
        dispatch.original = original
        bread_kernels.unpatch(patched)
    assert modeling_llama.apply_rotary_pos_emb is original


def test_an_unpatched_model_compiles_whole_beside_a_patched_one():
    """The dispatcher in transformers' module does not break a compiled unpatched model's graph: dynamo traces it
    to the original function (``fullgraph=True`` raises at a break), with the same logits."""
    patched, plain = BUILDERS["llama"](dtype=torch.float32), BUILDERS["llama"](dtype=torch.float32)
    bread_kernels.patch(patched)
    try:
        ids = torch.randint(0, plain.config.vocab_size, (1, 5))
        expected = plain(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(plain, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(input_ids=ids).logits, expected, rtol=0, atol=0)
    finally:
        bread_kernels.unpatch(patched)
        torch._dynamo.reset()
