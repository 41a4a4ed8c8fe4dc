"""The rotary position embedding of Llama-style attention, ``q·cos + rotate_half(q)·sin`` and the same for k, as one
``autograd.Function`` whose forward and backward are one pass per tensor on the native backend (autograd's chain is
six ops forward and about ten backward, with [B, H, S, D] temporaries and zero-filled slice gradients), with the
same values bit for bit.

Shapes: ``q`` [B, H, S, D], ``k`` [B, H_kv, S, D] (D even, ``h = D/2``), ``cos``, ``sin`` [1 or B, S, D] (broadcast
over the heads: transformers' ``unsqueeze_dim=1``); q and k of one dtype, cos and sin of one (a bf16 q with an fp32
cos under autocast on an fp32 model: ``q_embed`` is then fp32, as ``q·cos`` promotes, and ``∂L/∂q`` bf16);
``rotate_half(v) = cat(−v[..., h:], v[..., :h])``.  With ``g_q = ∂L/∂q_embed`` (and ``g_k``)::

    q_embed = q·cos + rotate_half(q)·sin                [B, H, S, D]   (k alike)
    ∂L/∂q   = g_q·cos + rotate_halfᵀ(g_q·sin)           rotate_halfᵀ(v) = cat(v[..., h:], −v[..., :h])

cos and sin are constants (transformers computes them without grad); the element work is the backend's ``rotary_``
(:mod:`bread_kernels.backends.rotary`, which shows that the rounding is autograd's).  Each result has the memory
layout autograd's has — q's for ``q_embed`` (the transposed view of the projection's output), contiguous for
``∂L/∂q`` — so every reduction downstream (a Qwen3 ``q_norm`` weight's gradient) sums in autograd's order.

The model calls ``apply_rotary_pos_emb`` by name from its modeling module.  :func:`install_fused_rotary` gives an
attention module whose forward calls it an instance forward that marks the call, and puts a
:class:`RotaryDispatch` in that name's place (where the module's own function gives these values bit for bit on
probe inputs, forward and gradients, on each device type it serves): inside a marked call it computes
:func:`rotary_embedding`, everywhere else (another model, an unpatched one, a call it does not cover — other
arguments, partial rotary, q and k of two dtypes —, a trace by ``torch.compile``) the function it replaced.  The last fused
module's :func:`uninstall_fused_rotary` (or its garbage collection) puts the function back.
"""

from __future__ import annotations

import inspect
import threading
import weakref

import torch
from torch import nn

from ..backends import get_backend
from ..backends.rotary import rotated
from ..installed_forward import install_forward
from ..rounding import FLOAT_DTYPES
from .probe import REFUSALS

__all__ = ["RotaryFunction", "rotary_embedding", "RotaryDispatch", "install_fused_rotary", "share_fused_rotary",
           "uninstall_fused_rotary", "uses_rotary_embedding", "MARKED_FORWARD"]

#: the name transformers' attention forwards call the rotary embedding by
FUNCTION_NAME = "apply_rotary_pos_emb"


class RotaryFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: q, k, cos, sin; outputs ``(q_embed, k_embed)``."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_embed, k_embed = _embedded(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.set_materialize_grads(False)
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = []
        for grad, dtype in zip((grad_q, grad_k), ctx.dtypes):
            if grad is None:
                grads.append(None)
            elif torch.is_grad_enabled():  # create_graph: ops autograd records (the backward is linear in g)
                grads.append(rotated(grad, cos, sin, True, dtype=dtype))
            else:
                # contiguous, as autograd's sum of its three gradients is: the reductions below sum in its order
                out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
                get_backend(grad.device).rotary_(out, grad, cos, sin, True)
                grads.append(out)
        return grads[0], grads[1], None, None


def _embedded(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's two passes, each into a tensor of its input's layout (where that input is dense)."""
    backend = get_backend(q.device)
    # an fp32 cos under autocast: q·cos is fp32, as autograd's (promote_types is an op: asked only for a mix)
    dtype = q.dtype if q.dtype == cos.dtype else torch.promote_types(q.dtype, cos.dtype)
    q_embed, k_embed = torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)
    backend.rotary_(q_embed, q, cos, sin, False)
    backend.rotary_(k_embed, k, cos, sin, False)
    return q_embed, k_embed


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin)`` (see the module docstring); the backend's pass
    without a graph where nothing needs a gradient."""
    cos, sin = cos.contiguous(), sin.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RotaryFunction.apply(q, k, cos, sin)
    return _embedded(q, k, cos, sin)


def _covers(args: tuple, kwargs: dict) -> bool:
    """Whether a call ``apply_rotary_pos_emb(*args, **kwargs)`` is one :func:`rotary_embedding` computes:
    ``(q, k, cos, sin)`` and at most ``unsqueeze_dim=1``, with 4-D q and k over the full head dimension, cos and sin
    [1 or B, S, D] without grad, q and k of one float dtype, cos and sin of one, all on one device (heads on
    dimension 1)."""
    if len(args) < 4:
        return False
    q, k, cos, sin, *rest = args
    if kwargs:
        if rest or set(kwargs) != {"unsqueeze_dim"}:
            return False
        rest = [kwargs["unsqueeze_dim"]]
    if len(rest) > 1 or (rest and not (type(rest[0]) is int and rest[0] == 1)):
        return False
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq, dim = q.shape
    if dim % 2 or k.shape[0] != batch or k.shape[2:] != (seq, dim) or cos.shape[1:] != (seq, dim) \
            or cos.shape[0] not in (1, batch):
        return False
    if q.dtype not in FLOAT_DTYPES or cos.dtype not in FLOAT_DTYPES or q.dtype != k.dtype or cos.dtype != sin.dtype:
        return False
    if not (q.device == k.device == cos.device == sin.device):
        return False
    return not (cos.requires_grad or sin.requires_grad)


class _Depth(threading.local):
    depth = 0  # a class default: no exception where a thread never set it


_marked = _Depth()  # per thread: a CUDA backward recomputes blocks on autograd's device thread


class RotaryDispatch:
    """What a modeling module's ``apply_rotary_pos_emb`` is while fused attention modules use it: the fused
    embedding inside their marked forwards, ``original`` everywhere else."""

    def __init__(self, original):
        self.original = original
        self.users = 0
        #: the device types on which ``original`` was probed to compute what the fused path computes there
        self.probed: set[str] = set()

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling() and _marked.depth and _covers(args, kwargs):
            return rotary_embedding(*args[:4])
        return self.original(*args, **kwargs)


def _marked_forward(self, *args, **kwargs):
    _marked.depth += 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _marked.depth -= 1


#: the forward :func:`install_fused_rotary` installs (patch's unpatch tells a copied one by it)
MARKED_FORWARD = _marked_forward


def _namespace(module: nn.Module) -> dict | None:
    """The globals ``type(module).forward`` resolves ``apply_rotary_pos_emb`` in, where it calls it by that name."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    if code is None or FUNCTION_NAME not in code.co_names:
        return None
    namespace = getattr(forward, "__globals__", None)
    return namespace if namespace is not None and callable(namespace.get(FUNCTION_NAME)) else None


def uses_rotary_embedding(module: nn.Module) -> bool:
    """Whether ``module``'s class forward calls a module-level ``apply_rotary_pos_emb``."""
    return _namespace(module) is not None


#: (q's dtype, cos's dtype) the probes run: each float dtype, and autocast's mixes with an fp32 model's fp32 cos
_PROBED_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                  (torch.bfloat16, torch.float32), (torch.float16, torch.float32))


def _computes_the_same(function, device: torch.device) -> bool:
    """Whether ``function(q, k, cos, sin)`` gives :func:`rotary_embedding`'s values and autograd through it the
    gradients of :class:`RotaryFunction`, bit for bit, on probe inputs of :data:`_PROBED_DTYPES` (q with 3 heads,
    k with 1, head dimension 8, one cos/sin for the batch and one per sequence)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def probe(dtype, *shape):
        return (torch.randn(shape, generator=generator) * 4).to(device=device, dtype=dtype)

    try:
        with torch.enable_grad():
            for dtype, table_dtype in _PROBED_DTYPES:
                for table_batch in (1, 2):
                    q, k = probe(dtype, 2, 5, 3, 8).transpose(1, 2), probe(dtype, 2, 5, 1, 8).transpose(1, 2)
                    cos, sin = probe(table_dtype, table_batch, 5, 8), probe(table_dtype, table_batch, 5, 8)
                    output_dtype = torch.promote_types(dtype, table_dtype)
                    grads = probe(output_dtype, 2, 3, 5, 8), probe(output_dtype, 2, 1, 5, 8)
                    results = []
                    for rotate in (function, rotary_embedding):
                        q_, k_ = q.detach().requires_grad_(), k.detach().requires_grad_()
                        outputs = rotate(q_, k_, cos, sin)
                        if not (isinstance(outputs, tuple) and len(outputs) == 2):
                            return False
                        torch.autograd.backward(outputs, grads)
                        results.append((*outputs, q_.grad, k_.grad))
                    if not all(isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
                               for a, b in zip(*results)):
                        return False
    except REFUSALS:
        return False
    return True


_releases: "weakref.WeakKeyDictionary[nn.Module, weakref.finalize]" = weakref.WeakKeyDictionary()


def install_fused_rotary(module: nn.Module) -> bool:
    """Give ``module`` (an attention module whose forward calls ``apply_rotary_pos_emb``) the fused rotary
    embedding: its marked instance forward and a :class:`RotaryDispatch` in its modeling module, where that module's
    own function computes the same (probed on the device of ``module``'s parameters).  Returns whether it did."""
    namespace = _namespace(module)
    if namespace is None or "forward" in module.__dict__:
        return False
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if device.type == "meta":
        return False
    dispatch = namespace[FUNCTION_NAME]
    original = dispatch.original if isinstance(dispatch, RotaryDispatch) else dispatch
    probed = dispatch.probed if isinstance(dispatch, RotaryDispatch) else set()
    if device.type not in probed:  # each device type's backend computes the fused path: probed there
        if not _computes_the_same(original, device):
            return False
        probed.add(device.type)
    if not isinstance(dispatch, RotaryDispatch):
        dispatch = namespace[FUNCTION_NAME] = RotaryDispatch(original)
        dispatch.probed = probed
    dispatch.users += 1
    _releases[module] = weakref.finalize(module, _release, namespace, dispatch)
    install_forward(module, _marked_forward)
    return True


def share_fused_rotary(module: nn.Module, duplicate: nn.Module) -> None:
    """``duplicate``, a deep copy of ``module``, holds the fused rotary embedding's dispatcher as ``module`` does (the
    modeling module's function comes back after the last of them is gone); nothing where ``module`` has none."""
    release = _releases.get(module)
    if release is None or not release.alive or duplicate in _releases:
        return
    namespace, dispatch = release.peek()[2]
    dispatch.users += 1
    _releases[duplicate] = weakref.finalize(duplicate, _release, namespace, dispatch)


def uninstall_fused_rotary(module: nn.Module) -> None:
    """Undo :func:`install_fused_rotary` for ``module``; the last one puts the modeling module's function back."""
    module.__dict__.pop("forward", None)
    release = _releases.pop(module, None)
    if release is not None:
        release()


def _release(namespace: dict, dispatch: RotaryDispatch) -> None:
    dispatch.users -= 1
    if dispatch.users == 0 and namespace.get(FUNCTION_NAME) is dispatch:
        namespace[FUNCTION_NAME] = dispatch.original
