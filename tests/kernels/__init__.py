"""Triton kernels under the interpreter (on a CPU) or on a GPU, against torch's ops and float64."""

import torch


def assert_rarely_differs(actual: torch.Tensor, expected: torch.Tensor, fraction: float = 0.01) -> None:
    """For a bf16/fp16 result: at most ``fraction`` of its elements differ from torch's (nan equal to nan)."""
    if expected.dtype not in (torch.bfloat16, torch.float16) or not expected.numel():
        return
    differs = (actual != expected) & ~(actual.isnan() & expected.isnan())
    assert differs.float().mean().item() <= fraction, (
        f"{int(differs.sum())} of {expected.numel()} {expected.dtype} elements differ from torch's")
