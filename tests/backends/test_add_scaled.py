"""``add_scaled_`` (target += alpha·other across dtypes, rounded once) through every backend, bit for bit against
torch's own mixed-dtype add, on odd shapes; and the native backend's one pass makes none of torch's fp32 copies."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bread_kernels.backends import add_scaled as add_scaled_module
from bread_kernels.backends import get_backend
from bread_kernels.functions.lora import lora_output

from ..aten_ops import AtenOps
from ..conftest import DTYPES

SHAPE = (37, 53)


def torch_reference(target, other, alpha, round_term):
    """What autograd and peft compute: ``other * alpha`` in other's dtype, optionally cast to target's, then
    torch's add (summed in fp32, rounded once to target's dtype)."""
    term = other * alpha if alpha != 1.0 else other
    if round_term:
        term = term.to(target.dtype)
    return (target.float() + term.float()).to(target.dtype)


def bits(t):
    """The bit patterns (so infs and signed zeros compare exactly too; the operands hold no NaN, whose payload
    torch's vectorised add and the C++ conversion write differently)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def operands(target_dtype, other_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = (torch.randn(SHAPE, generator=gen) * 3).to(target_dtype)
    other = (torch.randn(SHAPE, generator=gen) * 1e-2).to(other_dtype)
    other[0, :5] = torch.tensor([1e-3, -7.0, 65000.0, 3.0e38, -0.0]).to(other_dtype)  # ties, overflow, signed zero
    target[0, 2] = 60000.0  # an fp16 sum past 65504 is inf, as torch's
    return target.to(device), other.to(device)


@pytest.mark.parametrize("target_dtype", DTYPES)
@pytest.mark.parametrize("other_dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.37])
@pytest.mark.parametrize("round_term", [False, True])
def test_every_backend_sums_as_torch_does(backend, device, target_dtype, other_dtype, alpha, round_term):
    target, other = operands(target_dtype, other_dtype, device)
    expected = torch_reference(target, other, alpha, round_term)
    other_before = other.clone()
    get_backend(target.device).add_scaled_(target, other, alpha, round_term)
    assert target.dtype == target_dtype
    assert torch.equal(bits(target), bits(expected))
    assert torch.equal(other, other_before)


def test_the_torch_form_slices_a_cpu_sum_to_bound_its_fp32_copy(monkeypatch):
    target, other = operands(torch.bfloat16, torch.float32, "cpu")
    whole = target.clone()
    add_scaled_module.add_scaled_(whole, other, 0.37)
    monkeypatch.setattr(add_scaled_module, "SLICE_ELEMENTS", 3 * SHAPE[1] + 1)  # 4 slices of 3 rows, one of 1
    sliced = target.clone()
    summed = []  # the elements of each mixed-dtype add, which torch casts to fp32 whole

    class Adds(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.add_.Tensor:
                summed.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    with Adds():
        add_scaled_module.add_scaled_(sliced, other, 0.37)
    assert torch.equal(bits(sliced), bits(whole))
    assert summed == [3 * SHAPE[1]] * 12 + [SHAPE[1]]


def test_bad_shapes_are_refused(backend, device):
    with pytest.raises(ValueError, match="shape"):
        get_backend(device).add_scaled_(torch.zeros(3, 4, device=device), torch.zeros(4, 3, device=device))


def test_native_lora_output_makes_no_fp32_copy_of_the_output(monkeypatch):
    """peft's fp32 adapters on a bf16 layer: the native backend sums the adapter output into the layer's in one pass
    (torch's add would cast the [M, N] output to fp32 and round the sum back), and y is peft's bit for bit."""
    monkeypatch.setenv("BREAD_BACKEND", "native")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 29, generator=gen).bfloat16()
    weight = torch.randn(41, 29, generator=gen).bfloat16()
    lora_a, lora_b = torch.randn(4, 29, generator=gen), torch.randn(41, 4, generator=gen)
    u = torch.nn.functional.linear(x.float(), lora_a)
    peft = (torch.nn.functional.linear(x, weight) + torch.nn.functional.linear(u, lora_b) * 2.5).to(torch.bfloat16)
    with AtenOps() as ops, torch.no_grad():  # as inside the LoRA Function's forward
        y = lora_output(x, weight, None, u, lora_b, 2.5)
    assert torch.equal(y, peft)
    assert "add_scaled_" in ops.names
    assert not [op for op in ops.names if "copy" in op or op in ("add", "add_") or op.startswith("mul")], ops.names


@pytest.mark.parametrize("target_dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.37])
@pytest.mark.parametrize("round_term", [False, True])
@pytest.mark.parametrize("rank", [1, 7, 16])
def test_every_backend_adds_a_rank_r_product_as_torch_sums_it(backend, device, target_dtype, alpha, round_term, rank):
    """``add_product_(T, v, a)`` is ``add_scaled_(T, v a)``; the native backend sums ``v a`` per element in its
    own order (no [M, K] product), so the result is torch's to one rounding of the target's dtype."""
    gen = torch.Generator().manual_seed(rank)
    target = (torch.randn(SHAPE, generator=gen) * 3).to(target_dtype).to(device)
    v = torch.randn(SHAPE[0], rank, generator=gen).to(device)
    a = (torch.randn(rank, SHAPE[1], generator=gen) * 0.5).to(device)
    product = (v.double() @ a.double()).float()
    expected = torch_reference(target, product, alpha, round_term)
    got = target.clone()
    get_backend(got.device).add_product_(got, v, a, alpha, round_term)
    assert got.dtype == target_dtype
    # one rounding of the target's dtype, plus the fp32 sums' own order (relative to what was summed)
    summed = target.float().abs() + alpha * (v.abs() @ a.abs())
    bound = torch.finfo(target_dtype).eps * expected.float().abs() + 4 * torch.finfo(torch.float32).eps * summed
    assert ((got.float() - expected.float()).abs() <= bound).all()
    if rank == 1:  # one product per element: no order to differ, so bit for bit torch's
        assert torch.equal(bits(got), bits(torch_reference(target, v @ a, alpha, round_term)))
    elif target_dtype != torch.float32:  # the sums' order shows in an fp32 target's last bit, rarely in a bf16's
        assert (got == expected).float().mean() > 0.9
