"""Whether a module's own forward computes what one of this library's Functions computes: both run on probe inputs
and must agree bit for bit.  How ``patch`` recognises the modules it may give a fused forward (RMSNorm, SwiGLU MLPs)
without a list of model classes: a variant that computes anything else (another ε, another cast, another
activation) gives other values and keeps its own forward."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["computes_the_same"]


def computes_the_same(module: nn.Module, replacement: Callable[[torch.Tensor], torch.Tensor],
                      probes: Iterable[torch.Tensor]) -> bool:
    """Whether the class's own forward of ``module`` (no hooks, no patched instance forward) and
    ``replacement`` give equal tensors on every probe, without gradients.  A forward that refuses a probe (another
    signature, a dtype it does not take, a weight it cannot read) counts as different."""
    try:
        with torch.no_grad():
            for x in probes:
                expected = type(module).forward(module, x)
                if not isinstance(expected, torch.Tensor) or not torch.equal(expected, replacement(x)):
                    return False
    except Exception:
        return False
    return True
