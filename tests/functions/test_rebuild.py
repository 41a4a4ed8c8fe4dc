"""Inputs rebuilt in the backward instead of saved (:mod:`bread_kernels.functions.rebuild`): the consumers of an
RMSNorm output or a SwiGLU product compute exactly what they compute from the saved tensor, save none of its
storage, share one rebuild, and are immune to a change of the norm's weight between forward and backward."""

import contextlib
import gc
import weakref

import pytest
import torch

from bread_kernels import OnTheFlyUpdate, Role, WeightPlan, fused_linear
from bread_kernels.functions.lora import fused_lora_linear
from bread_kernels.functions.rebuild import mark_rebuildable, rebuildable, rebuilding_outputs
from bread_kernels.functions.rms_norm import rms_norm
from bread_kernels.functions.swiglu import silu_mul

N_OUT, N_IN = 37, 53
TOKENS = (3, 29)
ROLES = [Role.SGD, Role.SIGN, Role.ACTIVE, "lora"]


def _weights(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(*TOKENS, N_IN, generator=gen).to(dtype),
        "norm": (torch.randn(N_IN, generator=gen) * 0.5 + 1).to(dtype),
        "linears": [torch.randn(N_OUT, N_IN, generator=gen).to(dtype) for _ in range(3)],
        "lora_a": [(torch.randn(8, N_IN, generator=gen) * 0.1).to(dtype) for _ in range(3)],
        "lora_b": [(torch.randn(N_OUT, 8, generator=gen) * 0.1).to(dtype) for _ in range(3)],
        "grad": torch.randn(*TOKENS, N_OUT, generator=gen).to(dtype),
    }


def _qkv_step(values, role, rebuild: bool, between=None):
    """Three linears of ``role`` read one RMSNorm output (as q, k and v do); one forward + backward, inside
    ``rebuilding_outputs`` or not.  Returns the tensors after the step and the storages autograd saved."""
    h = values["h"].clone().requires_grad_()
    norm = torch.nn.Parameter(values["norm"].clone())
    weights = [torch.nn.Parameter(w.clone(), requires_grad=role is Role.ACTIVE) for w in values["linears"]]
    adapters = [(torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()))
                for a, b in zip(values["lora_a"], values["lora_b"])]
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with rebuilding_outputs() if rebuild else contextlib.nullcontext():
            n = rms_norm(h, norm, 1e-6)
            outputs = []
            for i, w in enumerate(weights):
                if role == "lora":
                    a, b = adapters[i]
                    outputs.append(fused_lora_linear(n, None, w, None, a, b, 2.0, WeightPlan(Role.LORA)))
                else:
                    plan = WeightPlan(role, OnTheFlyUpdate(lr=0.05) if role.updates_on_the_fly else None)
                    outputs.append(fused_linear(n, w, None, plan))
    n_storage = n.untyped_storage().data_ptr()
    if between is not None:
        between(norm)
    (sum(outputs) * values["grad"]).sum().backward()
    result = {"h.grad": h.grad, "norm.grad": norm.grad, **{f"w{i}": w.detach() for i, w in enumerate(weights)}}
    for i, w in enumerate(weights):
        if w.grad is not None:
            result[f"w{i}.grad"] = w.grad
    for i, (a, b) in enumerate(adapters if role == "lora" else ()):
        result[f"a{i}.grad"], result[f"b{i}.grad"] = a.grad, b.grad
    return result, n_storage in saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("role", ROLES, ids=str)
def test_linears_reading_a_rebuilt_norm_output_compute_what_they_compute_from_it_saved(role, dtype):
    values = _weights(dtype)
    saved_way, saved_n = _qkv_step(values, role, rebuild=False)
    rebuilt_way, rebuilt_saved_n = _qkv_step(values, role, rebuild=True)
    assert saved_n and not rebuilt_saved_n  # the norm's output is saved by the consumers only without the rebuild
    assert saved_way.keys() == rebuilt_way.keys()
    for name in saved_way:
        assert torch.equal(rebuilt_way[name], saved_way[name]), name


def test_an_output_is_marked_only_inside_rebuilding_outputs():
    x, w = torch.randn(5, 8, requires_grad=True), torch.nn.Parameter(torch.ones(8))
    a, u = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    assert not rebuildable(rms_norm(x, w, 1e-6)) and not rebuildable(silu_mul(a, u))
    with rebuilding_outputs():
        assert rebuildable(rms_norm(x, w, 1e-6)) and rebuildable(silu_mul(a, u))
        with torch.no_grad():  # the plain path saves nothing to rebuild from: marking would keep x, a and u alive
            assert not rebuildable(rms_norm(x, w, 1e-6)) and not rebuildable(silu_mul(a, u))
    assert not rebuildable(rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("written", ["output", "norm_input"])
def test_a_write_after_marking_makes_the_consumer_save_its_input(written):
    """A marked output written in place (or a tensor its rebuild reads) before a consumer saves it: the consumer
    saves its input as it is, so dW is the one computed from the values it read."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(N_OUT, N_IN, generator=gen)
    grad = torch.randn(*TOKENS, N_OUT, generator=gen)

    def dw(rebuild):
        h = torch.randn(*TOKENS, N_IN, generator=torch.Generator().manual_seed(3)).requires_grad_()
        weight = torch.nn.Parameter(w.clone())
        norm = torch.nn.Parameter(torch.ones(N_IN))
        with rebuilding_outputs() if rebuild else contextlib.nullcontext():
            base = h * 1
            n = rms_norm(base, norm, 1e-6)
            if written == "output":
                n = n.mul_(2)
            else:
                with torch.no_grad():
                    base.add_(1)
            y = fused_linear(n, weight, None, WeightPlan(Role.ACTIVE))
        return torch.autograd.grad((y * grad).sum(), weight)[0]  # the linear's backward alone: the norm's
        # own would be refused after the write to its input

    assert torch.equal(dw(True), dw(False))


def test_a_double_backward_through_a_rebuilt_input_is_refused():
    h = torch.randn(*TOKENS, N_IN, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(N_OUT, N_IN))
    with rebuilding_outputs():
        y = fused_linear(rms_norm(h, torch.nn.Parameter(torch.ones(N_IN)), 1e-6), weight, None,
                         WeightPlan(Role.ACTIVE))
    with pytest.raises(RuntimeError, match="keep_top=0"):
        torch.autograd.grad(y.sum(), weight, create_graph=True)


def test_consumers_of_one_output_share_one_rebuild_freed_after_the_last():
    """Three SGD linears read one SwiGLU product: the rebuild runs once in the backward, and nothing keeps the
    rebuilt tensor after the last consumer's backward."""
    gen = torch.Generator().manual_seed(1)
    a, u = torch.randn(*TOKENS, N_IN, generator=gen, requires_grad=True), torch.randn(*TOKENS, N_IN, generator=gen)
    weights = [torch.randn(N_OUT, N_IN, generator=gen) for _ in range(3)]
    rebuilt = []

    def product(a, u):
        value = torch.nn.functional.silu(a) * u
        rebuilt.append(weakref.ref(value))
        return value

    with rebuilding_outputs():
        m = mark_rebuildable(product(a, u), product, a, u)
        rebuilt.clear()
        y = sum(fused_linear(m, w, None, WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.05))) for w in weights)
    y.sum().backward()
    assert len(rebuilt) == 1
    gc.collect()
    assert rebuilt[0]() is None


def test_a_changed_norm_weight_between_forward_and_backward_does_not_change_the_rebuilt_input():
    """ZeRO-3 partitions a module's parameters after its forward (``param.data`` replaced) and an optimizer may
    step a parameter in place: the rebuild reads the norm weight as the forward saw it, so the linears' updates are
    those computed from the saved output."""
    values = _weights(torch.float32)

    def replace(norm):
        norm.data = norm.data * 3  # a new tensor under the parameter, as ZeRO-3's partitioning puts one there

    saved_way, _ = _qkv_step(values, Role.SGD, rebuild=False, between=replace)
    rebuilt_way, _ = _qkv_step(values, Role.SGD, rebuild=True, between=replace)
    for i in range(3):
        assert torch.equal(rebuilt_way[f"w{i}"], saved_way[f"w{i}"])


class _CastsOf(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the casts to fp32 of bf16 tensors holding ``values``."""

    def __init__(self, values):
        super().__init__()
        self.values, self.count = values, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                and out.dtype == torch.float32 and args[0].shape == self.values.shape \
                and torch.equal(args[0], self.values):
            self.count += 1
        return out


@pytest.mark.parametrize("rebuild", [False, True], ids=["saved", "rebuilt"])
@pytest.mark.parametrize("backend_name, casts", [("torch", (1, 3)), ("native", (0, 0))])
def test_lora_adapters_reading_one_input_cast_it_once_in_their_backward(rebuild, backend_name, casts, monkeypatch):
    """q, k and v's fp32 adapters (peft's default on a bf16 model) read one bf16 input: their backward casts it to
    fp32 once (three times where each reads its own copy), and every gradient and update is the one each computes
    from its own copy, bit for bit.  The native backend reads the bf16 input as it is: no cast at all."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    values = _weights(torch.bfloat16)
    values["lora_a"] = [a.float() for a in values["lora_a"]]
    values["lora_b"] = [b.float() for b in values["lora_b"]]

    def step(shared: bool):
        h = values["h"].clone().requires_grad_()
        norm = torch.nn.Parameter(values["norm"].clone())
        weights = [torch.nn.Parameter(w.clone(), requires_grad=False) for w in values["linears"]]
        adapters = [(torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()))
                    for a, b in zip(values["lora_a"], values["lora_b"])]
        with rebuilding_outputs() if rebuild else contextlib.nullcontext():
            n = rms_norm(h, norm, 1e-6)
            inputs = [n] * 3 if shared else [n * 1 for _ in range(3)]  # n·1: a copy of the same values
            y = sum(fused_lora_linear(x, None, w, None, a, b, 2.0,
                                      WeightPlan(Role.SGD, OnTheFlyUpdate(lr=0.05)))
                    for x, w, (a, b) in zip(inputs, weights, adapters))
        with _CastsOf(n.detach().clone()) as casts:
            (y * values["grad"]).sum().backward()
        grads = [h.grad, norm.grad, *weights, *(t.grad for pair in adapters for t in pair)]
        return casts.count, grads

    shared_casts, shared = step(True)
    own_casts, own = step(False)
    assert (shared_casts, own_casts) == casts
    for a, b in zip(shared, own):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", ["torch", "native"])  # the torch backend casts x; native reads it
def test_a_shared_cast_is_not_reused_for_an_input_changed_since(backend_name, monkeypatch):
    """A forward whose graph is dropped without its backward leaves its consumers counted, so a shared cast can
    outlive a backward; an input written in place since is cast again: each step's gradients are those of a
    fresh input holding the same values."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    values = _weights(torch.bfloat16)
    adapters = [(torch.nn.Parameter(a.float()), torch.nn.Parameter(b.float()))
                for a, b in zip(values["lora_a"], values["lora_b"])]

    def layers(x):
        return sum(fused_lora_linear(x, None, w, None, a, b, 2.0, WeightPlan(Role.LORA))
                   for w, (a, b) in zip(values["linears"], adapters))

    def adapter_grads(x):
        for a, b in adapters:
            a.grad = b.grad = None
        (layers(x) * values["grad"]).sum().backward()
        return [t.grad.clone() for pair in adapters for t in pair]

    x = values["h"].clone().requires_grad_()  # one tensor object through every step
    layers(x)  # dropped without a backward
    for step in range(2):
        with torch.no_grad():
            x.mul_(1.5)
        expected = adapter_grads(x.detach().clone().requires_grad_())
        for got, want in zip(adapter_grads(x), expected):
            assert torch.equal(got, want), step


@pytest.mark.parametrize("backend_name", ["torch", "native"])  # the torch backend casts x; native reads it
def test_consumers_reading_an_input_at_different_versions_get_casts_of_their_own(backend_name, monkeypatch):
    """Under saved-tensor hooks that copy what they save (as offloading does), autograd does not check versions:
    x written between two LoRA layers' forwards gives each layer the cast of the x it read."""
    monkeypatch.setenv("BREAD_BACKEND", backend_name)
    values = _weights(torch.bfloat16)
    adapters = [(torch.nn.Parameter(a.float()), torch.nn.Parameter(b.float()))
                for a, b in zip(values["lora_a"], values["lora_b"])][:2]

    def adapter_grads(shared):
        x = values["h"].clone().requires_grad_()
        for a, b in adapters:
            a.grad = b.grad = None
        outputs = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            for i, (w, (a, b)) in enumerate(zip(values["linears"], adapters)):
                source = x if shared else x.detach().clone()
                outputs.append(fused_lora_linear(source, None, w, None, a, b, 2.0, WeightPlan(Role.LORA)))
                with torch.no_grad():
                    x.mul_(3)
        (sum(outputs) * values["grad"]).sum().backward()
        return [t.grad.clone() for pair in adapters for t in pair]

    for got, want in zip(adapter_grads(True), adapter_grads(False)):
        assert torch.equal(got, want)
