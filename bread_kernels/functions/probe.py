"""Whether a module's own forward computes what one of this library's Functions computes: both run on probe inputs
and must agree bit for bit, in dtype and values.  How ``patch`` recognises the modules it may give a fused forward
(RMSNorm, SwiGLU MLPs) without a list of model classes: a variant that computes anything else (another ε, another
cast, a clamp, a dropout, another activation) gives other values and keeps its own forward."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..interrupts import add_note

__all__ = ["computes_the_same"]

#: what a forward raises when it does not take a probe: it then computes something else than the fused one
REFUSALS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError, NotImplementedError, AssertionError)


def _out_of_memory(error: RuntimeError) -> bool:
    """CUDA raises ``torch.OutOfMemoryError``; the CPU allocator a plain ``RuntimeError`` that says so."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text or \
        "not enough memory" in text


def _add_remedy(error: BaseException, module: nn.Module) -> None:
    add_note(error, f"bread_kernels: raised by {type(module).__name__}.forward on a probe input, run to learn "
                    "whether it computes what the fused one does; patch(model, fused_elementwise=False) skips the "
                    "probes")


def computes_the_same(module: nn.Module, replacement: Callable[[torch.Tensor], torch.Tensor],
                      probes: Iterable[torch.Tensor]) -> bool:
    """Whether the class's own forward of ``module`` (no hooks, no patched instance forward) and ``replacement``
    give equal tensors of one dtype on every probe, without gradients, in evaluation and in training mode (each
    pair of calls from the same random state, under a forked RNG: the caller's stream is untouched; the module's
    modes are restored).  A forward that refuses a probe (another signature, a dtype it does not take, a weight it
    cannot read: a ``TypeError``, ``ValueError``, ``RuntimeError``, ``AttributeError``, ``IndexError``,
    ``NotImplementedError`` or ``AssertionError``) counts as different; anything else (out of memory, an error of
    another kind) propagates with a note naming the module and the remedy."""
    modes = {sub: sub.training for sub in module.modules()}
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            probes = list(probes)
            for training in (False, True):
                module.train(training)
                for x in probes:
                    torch.manual_seed(0)
                    expected = type(module).forward(module, x)
                    torch.manual_seed(0)
                    got = replacement(x)
                    if not (isinstance(expected, torch.Tensor) and expected.dtype == got.dtype
                            and torch.equal(expected, got)):
                        return False
    except REFUSALS as error:
        if isinstance(error, RuntimeError) and _out_of_memory(error):
            _add_remedy(error, module)
            raise
        return False
    except Exception as error:
        _add_remedy(error, module)
        raise
    finally:
        for sub, training in modes.items():
            sub.training = training
    return True
