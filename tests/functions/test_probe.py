"""``computes_the_same``: how patch recognises a module it may give a fused forward, against modules whose forward is
known to agree, to differ, to refuse the probe, or to fail for another reason."""

import pytest
import torch
from torch import nn

from bread_kernels.functions.probe import computes_the_same

PROBES = [torch.randn(3, 5, generator=torch.Generator().manual_seed(0))]


class Doubles(nn.Module):
    def forward(self, x):
        return x * 2


class NeedsAMask(nn.Module):
    def forward(self, x, mask):
        return x * mask


class Raises(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


def test_agreeing_differing_and_refusing_forwards():
    assert computes_the_same(Doubles(), lambda x: x + x, PROBES)
    assert not computes_the_same(Doubles(), lambda x: x * 3, PROBES)
    assert not computes_the_same(Doubles(), lambda x: (x * 2).double(), PROBES)  # equal values, another dtype
    assert not computes_the_same(NeedsAMask(), lambda x: x, PROBES)  # TypeError: another signature
    assert not computes_the_same(Raises(RuntimeError("expected scalar type BFloat16")), lambda x: x, PROBES)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CPU out of memory"), ZeroDivisionError("a bug")],
                         ids=["out-of-memory", "another-error"])
def test_an_error_that_is_not_a_refusal_propagates_naming_the_remedy(error):
    """An out-of-memory during patch would otherwise leave every module unfused without a word."""
    module = Raises(error).train()
    with pytest.raises(type(error)) as raised:
        computes_the_same(module, lambda x: x, PROBES)
    assert any("fused_elementwise=False" in note and "Raises" in note for note in raised.value.__notes__)
    assert module.training  # modes restored


class AllocatesTooMuch(nn.Module):
    def forward(self, x):
        return x + torch.empty(2**50, dtype=torch.uint8).sum()  # the CPU allocator refuses: a RuntimeError


def test_the_cpu_allocators_out_of_memory_propagates_too():
    """The CPU allocator raises a plain RuntimeError, not torch.OutOfMemoryError: still not a refusal."""
    with pytest.raises(RuntimeError, match="allocate") as raised:
        computes_the_same(AllocatesTooMuch(), lambda x: x, PROBES)
    assert any("fused_elementwise=False" in note for note in raised.value.__notes__)
