"""The fused entry points under ``torch.compile``: each runs eagerly there, a graph break, as
``torch.compiler.disable`` makes it (the Functions read their plans when the backward runs and mutate weights, which
a traced graph cannot do), without paying that wrapper's host time outside a compile."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["graph_break_under_compile"]

F = TypeVar("F", bound=Callable)


def graph_break_under_compile(function: F) -> F:
    """``function`` behind ``torch.compiler.disable`` while dynamo traces, and called directly otherwise: the disable
    wrapper sets and restores dynamo's frame callback on every call (several µs of host time, on every fused linear's
    forward), which an eager call does not need."""
    disabled = torch.compiler.disable(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    return call  # type: ignore[return-value]
