"""The element work of the fused RMSNorm and SwiGLU Functions (:mod:`bread_kernels.functions.rms_norm`,
:mod:`bread_kernels.functions.swiglu`): a backend's own kernels where it has them, torch's ops otherwise.

Each backend answers four calls (``x``, ``g`` [..., K], ``w`` [K], ``r`` [..., 1] fp32; ``a``, ``u``, ``g`` [..., I])::

    rms_norm(x, w, eps) -> (y, r) | None                               # the forward, with its saved r
    rms_norm_backward(g, x, w, r, need_x, split, need_w) -> (dx, dx₂, dw) | None
    silu_mul(a, u) -> h | None                                         # h = silu(a) · u
    silu_mul_backward(g, a, u, need_a, need_u) -> (da, du) | None

None: the Function runs its torch ops (autograd's own formulas, bit for bit).  The CPU backends answer None
(:class:`TorchElementwise`): on a CPU each op is one vectorised pass already, and torch's are autograd's values bit for
bit.  The Triton backend runs one kernel each way (:mod:`bread_kernels.kernels.rms_norm`,
:mod:`bread_kernels.kernels.swiglu`) where the tensors allow it: on a GPU torch's ops are a launch each, eight to
fifteen of them per norm and four per SwiGLU backward, each a pass over the tensor.
"""

from __future__ import annotations

import os

import torch

__all__ = ["TorchElementwise", "elementwise_backend", "ELEMENTWISE_ENV"]

# Triton reads it once, when its kernels are defined: CPU tensors reach a Triton kernel only under its interpreter
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TorchElementwise:
    """The CPU backends' answers: None, torch's ops in the Functions."""

    def rms_norm(self, x, weight, eps):
        return None

    def rms_norm_backward(self, grad_output, x, weight, rstd, need_x, split, need_w):
        return None

    def silu_mul(self, a, u):
        return None

    def silu_mul_backward(self, grad_output, a, u, need_a, need_u):
        return None


#: the environment variable that turns the kernels off (``torch``: torch's ops on every backend, for an A/B
#: measurement or a GPU where a kernel misbehaves); ``kernels`` or unset: the backend's kernels where it has them
ELEMENTWISE_ENV = "BREAD_ELEMENTWISE"


def elementwise_backend(device: torch.device):
    """The backend that computes the fused Functions' element work on ``device``, or None where torch's ops do (a
    CPU tensor without Triton's interpreter: no environment read or lookup on the CPU's path; a trace by
    ``torch.compile``, which fuses torch's ops itself; ``BREAD_ELEMENTWISE=torch``)."""
    if device.type == "cpu" and not _INTERPRETED:
        return None
    if torch.compiler.is_compiling():
        return None
    choice = os.environ.get(ELEMENTWISE_ENV, "").strip().lower()
    if choice == "torch":
        return None
    if choice not in ("", "kernels"):
        raise ValueError(f"{ELEMENTWISE_ENV}={choice!r} is not a choice; use 'kernels' (the default: the backend's "
                         "kernels where it has them) or 'torch' (torch's ops everywhere)")
    from . import get_backend

    backend = get_backend(device)
    return backend if not isinstance(backend, TorchElementwise) else None
