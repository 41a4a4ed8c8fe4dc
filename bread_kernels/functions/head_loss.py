"""The output head and the cross-entropy loss in one Function, over chunks of tokens: the logits never exist whole.

Shapes: hidden states ``h`` [T, H] (T tokens), head weight ``W`` [V, H] (any strides), bias ``b`` [V] or None,
targets ``y`` [T] (int64; ``ignore_index`` marks a token without a loss), all floats in one dtype (fp32, bf16,
fp16) — except under ``torch.autocast``, below.  The loss is the one of transformers' ``ForCausalLMLoss`` for logits
``z = h Wᵀ + b``:

    z_t   = h_t Wᵀ + b                                 in W's dtype, then upcast to fp32 (as HF does)
    z_t  ← c · tanh(z_t / c)                           soft-capping ``c`` (Gemma2), in W's dtype before the upcast
    L     = Σ_{t: y_t ≠ ignore} (logsumexp(z_t) − z_t[y_t]) / n
    n     = the number of non-ignored tokens ("mean"), or ``num_items_in_batch`` (Trainer's gradient accumulation)

and with the scalar ``γ = ∂ℓ/∂L`` that the backward receives (``grad_output``), the chain rule gives

    δ_t   = (softmax(z_t) − onehot(y_t)) / n           [V] for a non-ignored token, 0 for an ignored one (fp32)
    δ_t  ← δ_t ⊙ (1 − tanh²(z_raw_t / c))              with soft-capping
    g_t   = γ · δ_t                                    cast to W's dtype: the gradient of the logits
    dh    = g W                                        [T, H]   always from W *before* any update (invariant 1)
    dW    = gᵀ h,   db = Σ_t g_t                       [V, H], [V]

The forward walks the tokens in chunks of ``C`` rows (so only one [C, V] fp32 block of logits exists at a time) and
computes, chunk by chunk at once, the loss, ``δ``'s contribution to ``dh`` (with γ = 1) and, for an ``ACTIVE`` head,
to ``dW`` (accumulated over the chunks).  The backward scales those by γ.  The head's Role:

* ``ACTIVE`` (and ``plan=None`` with ``W.requires_grad``: plain autograd): ``dW``/``db`` returned to autograd.
* ``SGD`` / ``SIGN``: ``W -= lr·s·f(dW)`` in the backward (lr is read then, and γ is known only then), in one of
  two ways, chosen by memory:

  - *dW fits the budget* (the fp32 dW and db, plus for a bf16/fp16 head one chunk's [V, H] product:
    :func:`_accumulated_dw_bytes`, within ``chunk_bytes`` below; with the default budget,
    also within what the model's own head and loss would hold beyond one block, ``T·V·12`` bytes at its backward's
    peak: :func:`_dw_budget`): the forward accumulates ``dW`` (γ = 1) over the chunks as for an ``ACTIVE`` head,
    and the backward hands ``γ·dW`` (``γ·db``) to the one update path,
    :func:`~bread_kernels.update.update_linear_grad_`.  The head's GEMMs are then the reference's three (logits, dh,
    dW), and the accumulator lives from the head's forward to its backward, no longer than the reference's logits
    do, and takes no more than the larger of one block's budget and what they would take beyond one block.
  - *otherwise*, never with a whole dW: the backward walks the *vocabulary* in tiles of ``R`` rows of W; for each
    tile it recomputes the logits ``z[:, tile]`` of every token from the saved ``h`` and the saved per-token
    ``logsumexp`` (so softmax needs no other tile), forms ``g[:, tile]`` [T, R] and hands the pair ``(g[:, tile],
    h)`` to :func:`~bread_kernels.update.update_linear_tiles_` for the rows ``W[tile]`` (and ``b[tile]``).  A tile's rows
    of W enter only that tile's logits, so updating them before the next tile changes nothing that is still to be
    computed, and ``dh`` was computed in the forward from the old W.  This costs one more head GEMM than the
    reference (the recomputed logits) in exchange for never holding a [T, V] or [V, H] gradient; SGD's split into
    tiles is exact (each element of W is in one tile) and SIGN takes the sign of each element's whole sum.  The
    finiteness check of invariant 3 is one device flag for the whole weight, taken before the first tile writes
    (finite ``h`` and logsumexp, and γ where a token is scored, make every tile's ``g`` finite), which gates every
    tile's write: a skip leaves all of W untouched, with no host sync.  An fp16 tile's dW can still overflow from
    finite ``g`` and ``h``: in fp16 every tile's logits and dW GEMM run once more before the first write, and a
    tile that overflows clears the flag for all of them.  Every temporary a tile and its write need is allocated
    before the first tile (one tile's worth, reused by each), so an out-of-memory error never stops the update
    between two tiles: W is updated whole or not at all.
  A plan whose target's writes are collectives (DDP's average: every rank must issue the same ones, and the
  number of tiles would follow each rank's tokens) always takes the first way, whatever the budget.
* ``FROZEN``: nothing for W.

Memory: the chunk ``C`` (and the tile ``R``) is chosen so that the fp32 block of logits and its temporaries stay
within ``chunk_bytes`` (argument) or ``BREAD_LOSS_CHUNK_BYTES`` (environment, default 256 MiB); at least one row.
The default is a measured compromise (``bench/results/head_loss_cpu_float32*.txt``): at vocab 128,256 and 2,048
tokens, 64 MiB blocks (130 tokens) made the CPU's head GEMMs ~1.7x slower than 256 MiB blocks (523 tokens), while
256 MiB is still ~1/12 of the reference's logits-sized peak there; on a GPU, Liger-Kernel's blocks are smaller (about
the size of the hidden states), so set the variable lower where memory matters more than the last percent of speed.
On a GPU with ``liger-kernel`` installed (``pip install -e ".[liger]"``) the untiled forward — a frozen, an
active, or an on-the-fly head whose dW fits the budget — runs Liger-Kernel's fused linear cross-entropy kernels
instead of the loop here (through the backend's ``linear_cross_entropy``, :mod:`bread_kernels.backends.liger`): they
compute the same loss, ``dh`` and ``dW`` for the *sum* over tokens, so the backward's γ is multiplied by ``1/n``.
Liger picks its own chunk (about the size of ``h``, at most this budget).  The vocabulary tiles, the CPU and every
other backend run the loop here.  Liger's forward reads the token count to the host once (an ``.item()``).
Beyond that the Function holds ``dh`` [T, H] from the forward to the backward (the size of ``h``), the per-token
logsumexp [T] for a tiled on-the-fly head, and ``dW`` [V, H] for an ``ACTIVE`` head (the gradient autograd would
build anyway) or an on-the-fly head whose dW fits the budget: in the compute dtype when the tokens are one chunk (the
one GEMM autograd runs), else accumulated over the chunks in fp32 and, scaled by γ in the backward, rounded once to
the compute dtype as that GEMM's output is (so it overflows where autograd's would: an fp16 head's dW under a loss
scale).

Under ``torch.autocast`` with dtype ``d`` (see :mod:`.autocast`) the unpatched model's head is an ``F.linear`` under
autocast — logits in ``d`` from ``h``, ``W``, ``b`` cast to ``d`` — and its loss upcasts them to fp32.  So here
"W's dtype" above reads ``d``: ``h``, ``W`` (each vocabulary tile's rows, in the on-the-fly backward) and ``b`` are
cast to ``d``, the logits are computed and soft-capped in ``d``, then upcast; ``g`` is cast to ``d``; ``dh = g W_d``
and ``dW = gᵀ h_d`` are ``d`` GEMMs (``dW`` accumulated over the chunks in fp32), returned in h's, W's and b's own
dtypes; an on-the-fly head takes ``(g[:, tile], h_d)`` to the update path, which writes W in its own dtype.

The head weight must be used once in the forward that contains this Function (the causal-LM forward calls it once;
a tied head never gets an on-the-fly plan: :func:`bread_kernels.patch` leaves shared weights on plain autograd).
The backward can run once (``retain_graph`` and a second backward raise): its saved gradients are handed over.
"""

from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch

from ..backends import get_backend
from ..backends.chunked import env_bytes
from ..backends.epilogue import FlatBuffers, dw_finite_flag
from ..plan import Role, WeightPlan, trigger_gradient
from ..rounding import FLOAT_DTYPES
from ..update import update_linear_grad_, update_linear_tiles_, writes_collectively
from .autocast import autocast_dtype, outside_autocast
from .linear import check_plan_for_weight, trigger_for

__all__ = ["FusedHeadLossFunction", "fused_head_loss", "check_head_loss_inputs", "head_plan_refusal",
           "head_dtype_refusal", "chunk_budget_bytes", "DEFAULT_LOSS_CHUNK_BYTES", "forward_dw_bytes",
           "unfused_loss_bytes", "hidden_sized_blocks", "hidden_sized_block_bytes", "dw_bytes_beside_hidden_sized",
           "loss_bytes_beside_kept", "MAX_DW_BLOCKS_BESIDE_KEPT"]

DEFAULT_LOSS_CHUNK_BYTES = 256 << 20
#: a head whose dW the loss accumulates in the forward (an Adam-trained head, or an on-the-fly one whose dW fits) runs
#: at most this many blocks of logits when the loss is bounded beside kept blocks: larger blocks than the hidden
#: states' size where those would be more (about V/H of them), up to the loss's chunk budget, which the unbounded
#: loss runs anyway.  Each block adds a [V, H] product into the fp32 dW; measured on a CPU: 8 blocks cost 1.1x the
#: default chunks' loss, 62 blocks 5x (:func:`hidden_sized_blocks`)
MAX_DW_BLOCKS_BESIDE_KEPT = 8


def _budget_given(chunk_bytes: int | None) -> bool:
    """Whether the caller or the environment set the loss's budget (else the default applies)."""
    return chunk_bytes is not None or os.environ.get("BREAD_LOSS_CHUNK_BYTES") is not None


def chunk_budget_bytes(chunk_bytes: int | None = None) -> int:
    """The bytes one block of logits (and its temporaries) may take: ``chunk_bytes``, else the environment's
    ``BREAD_LOSS_CHUNK_BYTES``, else 256 MiB."""
    if chunk_bytes is None:
        chunk_bytes = env_bytes("BREAD_LOSS_CHUNK_BYTES", DEFAULT_LOSS_CHUNK_BYTES)
    _check_chunk_bytes(chunk_bytes)
    return chunk_bytes


def _check_chunk_bytes(chunk_bytes) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Integral) or chunk_bytes <= 0:
        raise ValueError(f"fused_head_loss: chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}")


def _check_budget_arguments(chunk_bytes, hidden_sized, room_bytes, dw_bytes) -> None:
    """Refuse budget arguments of the wrong type before anything is computed (``room_bytes`` may be negative: no
    room beyond the hidden states' size)."""
    if chunk_bytes is not None:
        _check_chunk_bytes(chunk_bytes)
    if not isinstance(hidden_sized, bool):
        raise TypeError(f"fused_head_loss: hidden_sized must be True or False, got {hidden_sized!r}")
    if isinstance(room_bytes, bool) or not isinstance(room_bytes, numbers.Integral):
        raise TypeError(f"fused_head_loss: room_bytes must be a number of bytes (an int), got {room_bytes!r}")
    if dw_bytes is not None and (isinstance(dw_bytes, bool) or not isinstance(dw_bytes, numbers.Integral)
                                 or dw_bytes < 0):
        raise ValueError(f"fused_head_loss: dw_bytes must be None or a number of bytes >= 0, got {dw_bytes!r}")


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's GEMMs: autocast's where it is on, else W's."""
    return autocast_dtype(weight.device) or weight.dtype


def _bytes_per_logit(compute_dtype: torch.dtype, softcap: float | None) -> int:
    """What one block of logits allocates per element: the fp32 logits (4 bytes; softmax and the gradient are done
    in place), the fp32 tanh when soft-capping (4), and for a bf16/fp16 head GEMM (W's dtype, or autocast's) its
    output and the cast of the gradient (2 + 2)."""
    return 4 + (4 if softcap is not None else 0) + (4 if compute_dtype != torch.float32 else 0)


def _rows_per_block(budget: int, row_elements: int, compute_dtype: torch.dtype, softcap: float | None) -> int:
    """How many rows of a [rows, row_elements] block of logits fit ``budget`` bytes."""
    return max(1, budget // (row_elements * _bytes_per_logit(compute_dtype, softcap)))


def _balanced_rows(rows: int, tokens: int) -> int:
    """The rows of each block when ``tokens`` rows are split into blocks of at most ``rows``: as many blocks, of
    equal size but the last (fewer rows than there are blocks short), so that no block runs a GEMM on a sliver of
    rows."""
    if tokens <= 0 or rows >= tokens:
        return max(1, rows)
    blocks = -(-tokens // rows)
    return -(-tokens // blocks)


def _loss_budget(chunk_bytes: int | None, tokens: int, weight: torch.Tensor, compute_dtype: torch.dtype,
                 softcap: float | None, hidden_sized: bool, room_bytes: int = 0, dw_in_forward: bool = False) -> int:
    """The bytes the loss may hold besides its inputs: ``chunk_budget_bytes(chunk_bytes)``, and with
    ``hidden_sized`` no more than the largest of the ``tokens × H`` hidden states' elements as logits,
    ``room_bytes`` and, for a head whose dW is accumulated in the forward (``dw_in_forward``), a block of
    ``⌈tokens / MAX_DW_BLOCKS_BESIDE_KEPT⌉`` rows."""
    budget = chunk_budget_bytes(chunk_bytes)
    if hidden_sized:
        per_logit = _bytes_per_logit(compute_dtype, softcap)
        bound = max(tokens * weight.shape[1] * per_logit, room_bytes)
        if dw_in_forward:
            bound = max(bound, -(-tokens // MAX_DW_BLOCKS_BESIDE_KEPT) * weight.shape[0] * per_logit)
        budget = min(budget, bound)
    return budget


def _dw_budget(chunk_bytes: int | None, tokens: int, weight: torch.Tensor, compute_dtype: torch.dtype,
               softcap: float | None, hidden_sized: bool) -> int:
    """The bytes an on-the-fly head's fp32 dW may take, accumulated in the forward beside one block of logits: the
    loss's budget; with the default budget (neither ``chunk_bytes`` nor ``BREAD_LOSS_CHUNK_BYTES`` given) and no
    hidden-size bound, also whatever the model's own head and loss would hold beyond that block
    (:func:`unfused_loss_bytes`): the loss then holds no more than the unfused model's would (the dW counted with
    each chunk's bf16/fp16 product, :func:`_dw_fits`), and the head runs the reference's three GEMMs instead of the
    vocabulary tiles' four (at hidden 4096 and vocab 128,256 the fp32 dW is 2 GiB, 3 GiB with a bf16 chunk's
    product; 4,096 tokens' unfused loss peaks at 6 GiB).  A budget given bounds the dW too; the room a
    ``hidden_sized`` caller gives its blocks of logits does not (a dW held beside it is the caller's ``dw_bytes``)."""
    budget = _loss_budget(chunk_bytes, tokens, weight, compute_dtype, softcap, hidden_sized)
    if hidden_sized or _budget_given(chunk_bytes):
        return budget
    return max(budget, unfused_loss_bytes(tokens, weight) - budget)


def _accumulated_dw_bytes(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> int:
    """What a head's dW accumulated in the forward over the chunks holds: the fp32 dW (and db) and, with a
    bf16/fp16 head GEMM, each chunk's [V, H] product before it is added in fp32 (the backend's ``add_scaled_``)."""
    product = weight.numel() * compute_dtype.itemsize if compute_dtype != torch.float32 else 0
    return 4 * (weight.numel() + (bias.numel() if bias is not None else 0)) + product


def _dw_fits(weight: torch.Tensor, bias: torch.Tensor | None, budget: int, compute_dtype: torch.dtype) -> bool:
    """Whether the head's dW accumulated in the forward (:func:`_accumulated_dw_bytes`) fits ``budget``: an
    on-the-fly head then accumulates it there."""
    return _accumulated_dw_bytes(weight, bias, compute_dtype) <= budget


def forward_dw_bytes(tokens: int, weight: torch.Tensor, bias: torch.Tensor | None, plan: WeightPlan | None,
                     softcap: float | None = None) -> int:
    """What the head holds in the forward for its dW (:func:`_accumulated_dw_bytes`): an Adam-trained head (ACTIVE,
    or no plan and a weight that requires grad) always; an on-the-fly head (SGD/SIGN) where its dW fits the default
    budget (:func:`_dw_budget`: the reference's three head GEMMs, no vocabulary tiles); 0 otherwise.  A caller that
    bounds the logits to the hidden states' size passes it as ``fused_head_loss(dw_bytes=...)`` to keep that path,
    and counts it against what else it holds."""
    dtype = _compute_dtype(weight)
    trained = plan.role is Role.ACTIVE if plan is not None else \
        weight.requires_grad or (bias is not None and bias.requires_grad)
    if trained:
        return _accumulated_dw_bytes(weight, bias, dtype)
    if plan is None or not plan.role.updates_on_the_fly:
        return 0
    if not _dw_fits(weight, bias, _dw_budget(None, tokens, weight, dtype, softcap, hidden_sized=False), dtype) \
            and not writes_collectively(plan):
        return 0
    return _accumulated_dw_bytes(weight, bias, dtype)


def unfused_loss_bytes(tokens: int, weight: torch.Tensor) -> int:
    """A lower bound of the peak the model's own head and loss hold at once for ``tokens`` rows and the head
    ``weight`` [V, H]: ``tokens · V · 12`` bytes, reached in the loss's backward, where the log-softmax's backward
    holds its saved fp32 output, the fp32 gradient nll_loss hands it and its own fp32 result (the forward holds
    less: the logits in the compute dtype, transformers' fp32 upcast of them, none when they are fp32, and the fp32
    log-softmax — ``tokens · V · (b + 4·[b ≠ 4] + 4)`` bytes for b-byte logits).  Measured with the allocator:
    48.0 MiB at the bench model's 1,024 tokens and vocabulary of 4,096, in fp32 and in bf16;
    ``tests/functions/test_head_loss.py`` checks the bound at 97 tokens and a vocabulary of 301, in fp32 and bf16.
    The fused loss holds none of it, so this is the memory it frees for kept activations
    (:meth:`~bread_kernels.stream.StreamConfig.fused_loss_follows`)."""
    return tokens * weight.shape[0] * 12


def _hidden_sized_rows(tokens: int, weight: torch.Tensor, softcap: float | None, dw_in_forward: bool) -> int:
    """The token rows of one block of logits of ``fused_head_loss(hidden_sized=True)`` (at least one)."""
    dtype = _compute_dtype(weight)
    budget = _loss_budget(None, tokens, weight, dtype, softcap, hidden_sized=True, dw_in_forward=dw_in_forward)
    return _balanced_rows(_rows_per_block(budget, weight.shape[0], dtype, softcap), tokens)


def hidden_sized_blocks(tokens: int, weight: torch.Tensor, softcap: float | None = None,
                        dw_in_forward: bool = False) -> int:
    """How many blocks of logits ``fused_head_loss(hidden_sized=True)`` runs over ``tokens`` rows: about V/H, and
    for a head whose dW it accumulates in the forward (``dw_in_forward``) at most
    :data:`MAX_DW_BLOCKS_BESIDE_KEPT`, unless the chunk budget takes more (as the unbounded loss then does)."""
    return -(-tokens // _hidden_sized_rows(tokens, weight, softcap, dw_in_forward))


def hidden_sized_block_bytes(tokens: int, weight: torch.Tensor, softcap: float | None = None,
                             dw_in_forward: bool = False) -> int:
    """What one block of logits of ``fused_head_loss(hidden_sized=True)`` and its temporaries take: the rows that fit
    the ``tokens × H`` hidden states' elements as logits (for a head whose dW the loss accumulates in the forward,
    enough rows for at most :data:`MAX_DW_BLOCKS_BESIDE_KEPT` blocks) within the chunk budget, at least one and at
    most ``tokens``."""
    rows = min(max(1, tokens), _hidden_sized_rows(tokens, weight, softcap, dw_in_forward))
    return rows * weight.shape[0] * _bytes_per_logit(_compute_dtype(weight), softcap)


def dw_bytes_beside_hidden_sized(tokens: int, weight: torch.Tensor, bias: torch.Tensor | None,
                                 plan: WeightPlan | None, softcap: float | None = None) -> int | None:
    """What the loss holds in the forward besides a block of logits when a caller bounds it to keep something else
    alive through it (``fused_head_loss(hidden_sized=True, dw_bytes=...)``): 0 for a head with no dW in the forward
    (frozen, or on-the-fly with a dW that does not fit); the head's :func:`forward_dw_bytes` (Adam-trained or
    on-the-fly), whose blocks of logits are then those of ``hidden_sized_block_bytes(dw_in_forward=True)``; None
    where the dW alone holds more than the unfused loss would: keep nothing beside it then."""
    held = forward_dw_bytes(tokens, weight, bias, plan, softcap)
    if held > unfused_loss_bytes(tokens, weight):
        return None
    return held


def loss_bytes_beside_kept(tokens: int, weight: torch.Tensor, bias: torch.Tensor | None, plan: WeightPlan | None,
                           held: int | None, softcap: float | None = None) -> int:
    """What the bounded loss (``fused_head_loss(hidden_sized=True)``) holds beside kept blocks at its peak: the dW
    it accumulates in the forward (``held``: :func:`dw_bytes_beside_hidden_sized`), and the larger of its largest
    block of logits (in the forward: :func:`hidden_sized_block_bytes`) and, for an on-the-fly head, the temporaries
    its backend's update of that whole dW allocates (in the backward; the torch backend's fp32 epilogue, none for
    the native and Triton kernels, which write in place)."""
    held = held or 0
    block = hidden_sized_block_bytes(tokens, weight, softcap, dw_in_forward=held > 0)
    update = 0
    if held and plan is not None and plan.role.updates_on_the_fly:
        update = get_backend(weight.device).update_temporary_bytes(weight)
    return held + max(block, update)


def check_head_loss_inputs(hidden, weight, bias, targets, plan, ignore_index, num_items_in_batch, softcap) -> None:
    """Raise a clear error for anything the fused head+loss cannot do correctly."""
    if plan is not None and not isinstance(plan, WeightPlan):
        raise TypeError(f"fused_head_loss: plan must be a bread_kernels.WeightPlan or None, got {type(plan).__name__}")
    for what, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_head_loss: {what} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_head_loss: {what} has dtype {t.dtype}; float32, bfloat16 and float16 are "
                            "supported (a patched model cast to it after patch: cast it back with model.float(), or "
                            "train it unpatched)")
        if t.dtype != weight.dtype and autocast_dtype(weight.device) is None:  # autocast casts all to its dtype
            raise TypeError(f"fused_head_loss: {what} is {t.dtype} but the weight is {weight.dtype}; cast them to one "
                            "dtype")
        if t.device != weight.device:
            raise ValueError(f"fused_head_loss: {what} is on {t.device} but the weight is on {weight.device}")
    if weight.dim() != 2:
        raise ValueError(f"fused_head_loss: weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_head_loss: hidden must be [tokens, {weight.shape[1]}] for a weight "
                         f"{tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_head_loss: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("fused_head_loss: targets must be an int64 tensor of token ids (ignore_index for none), got "
                        f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_head_loss: targets must be [tokens] = [{hidden.shape[0]}] (one per row of hidden), "
                         f"got {tuple(targets.shape)}")
    if targets.device != weight.device:
        raise ValueError(f"fused_head_loss: targets are on {targets.device} but the weight is on {weight.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"fused_head_loss: ignore_index must be an int, got {ignore_index!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("fused_head_loss: num_items_in_batch must be a number or a one-element tensor, got "
                                 f"shape {tuple(num_items_in_batch.shape)}")
        # numbers.Real: Python's int and float, and numpy's scalars, which the unpatched model divides by too
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
            raise TypeError(f"fused_head_loss: num_items_in_batch must be a number or a tensor, got "
                            f"{type(num_items_in_batch).__name__}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or
                                not 0 < softcap < float("inf")):
        raise ValueError(f"fused_head_loss: softcap must be a positive finite number or None, got {softcap!r}")
    valid = targets != ignore_index
    vocab = weight.shape[0]
    # read on the host only where that is free; on a GPU an out-of-range target fails the logits' gather on the
    # device instead (fused_head_loss maps every one, negative ones included, past the vocabulary)
    if targets.device.type == "cpu" and targets.numel() and bool(((targets < 0) | (targets >= vocab))[valid].any()):
        bad = targets[valid & ((targets < 0) | (targets >= vocab))][0].item()
        raise ValueError(f"fused_head_loss: target {bad} is outside the vocabulary [0, {vocab}) and is not "
                         f"ignore_index={ignore_index}; fix the labels (use {ignore_index} for tokens without a loss)")
    if plan is not None:
        refusal = head_plan_refusal(plan)
        if refusal is not None:
            raise NotImplementedError(f"fused_head_loss: {refusal}; patch(model, fused_loss=False) for this model")
        check_plan_for_weight("fused_head_loss", plan, weight, "the head")


def head_dtype_refusal(weight: torch.Tensor) -> str | None:
    """Why the fused head+loss cannot compute a head in its compute dtype as the model's own loss does (None: it
    can).  float16 (an fp16 head, or fp16 autocast): the fused loss computes the gradients of the loss in the forward,
    and a loss scaler's factor reaches them only in the backward; the model's own loss casts the already scaled
    gradient to fp16, so its small entries survive, where the fused loss's underflow (and a factor of 65,520 or more
    overflows fp16 at once).  bf16 has fp32's range."""
    if _compute_dtype(weight) is torch.float16:
        return ("the head computes in float16 (an fp16 head, or fp16 autocast), where the fused loss's gradients, "
                "computed before a loss scaler's factor is applied, underflow fp16 (or overflow it at a scale of "
                "65,520 or more)")
    return None


def head_plan_refusal(plan: WeightPlan | None) -> str | None:
    """Why the fused head+loss cannot carry out the head's ``plan`` (None: it can)."""
    if plan is None:
        return None
    if plan.role is Role.LORA:
        return f"{plan.name or 'the head'} has role LORA; a LoRA head is not supported by the fused loss"
    if plan.role.updates_on_the_fly and plan.target is not None and not writes_collectively(plan):
        return (f"{plan.name or 'the head'} writes its on-the-fly update through a custom target "
                f"({type(plan.target).__name__}, e.g. ZeRO-3 shards), which the fused loss does not drive")
    return None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            buffers: FlatBuffers | None = None):
    """(z fp32 [rows, cols], t = tanh(z_raw / c) fp32 or None): the logits of the rows ``h`` for the rows of
    ``weight``, computed in their (compute) dtype, soft-capped in it, then upcast — HF's order of operations.
    ``buffers``: where every result and temporary goes (:class:`_VocabularyTiles`'s, [rows, cols] each: ``linear``
    in the compute dtype; ``logits`` fp32, unless the compute dtype is fp32 without a cap; ``compute``, the capped
    logits before their upcast, and ``tanh`` fp32, below fp32); None: allocated."""
    shape = torch.Size((h.shape[0], weight.shape[0]))

    def out(name: str) -> torch.Tensor | None:
        return None if buffers is None else buffers.take(name, shape)

    # F.linear's own ops on 2-D operands: addmm with a bias, mm without
    z = torch.mm(h, weight.t(), out=out("linear")) if bias is None else \
        torch.addmm(bias, h, weight.t(), out=out("linear"))
    if softcap is None:
        return _in_fp32(z, out("logits")), None
    z = z.div_(softcap).tanh_()
    capped = torch.mul(z, softcap, out=out("logits" if z.dtype == torch.float32 else "compute"))
    return _in_fp32(capped, out("logits")), _in_fp32(z, out("tanh"))


def _in_fp32(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``t.float()``, into ``out`` where given (``t`` itself where it is fp32)."""
    if t.dtype == torch.float32:
        return t
    return t.float() if out is None else out.copy_(t)


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of the fp32 block ``z`` in place; returns the rows' logsumexp [rows] (no other block)."""
    top = z.amax(dim=1)
    z.sub_(top[:, None]).exp_()
    total = z.sum(dim=1)
    z.div_(total[:, None])
    return top + total.log()


def _delta_terms(targets: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor | None, cols: int,
                 first_col: int = 0, buffers: "_TermBuffers | None" = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`_delta_` applies to each token's row of probabilities for the vocabulary columns ``first_col`` …
    ``first_col + cols − 1``, [T, 1] each: the column of its target (clamped into the block), −1 where the target is
    one of them and the token is scored (else 0; a scatter, not an index by nonzero: no host sync), and
    ``scale`` on valid rows, exactly 0 on ignored ones (``scale`` a 0-d fp32 tensor: 1/n, times γ in the backward;
    inf where no token counts, n = 0, whose ignored rows must still give 0, as ``F.cross_entropy``'s gradient is,
    not 0·inf).  Computed once for every block of a loop over tokens, whose rows are slices of it.  ``buffers``:
    where they go (a vocabulary tile's, with the row scale computed once; ``scale`` is then not read); None:
    allocated."""
    o = buffers
    local = torch.sub(targets, first_col, out=None if o is None else o.local)
    hit = torch.ge(local, 0, out=None if o is None else o.hit).bitwise_and_(valid)
    hit.bitwise_and_(torch.lt(local, cols, out=None if o is None else o.in_tile))
    column = torch.clamp(local, 0, cols - 1, out=None if o is None else o.column)
    minus_hit = (hit.to(torch.float32) if o is None else o.minus_hit.copy_(hit)).neg_()
    row_scale = torch.where(valid, scale, 0.0) if o is None else o.row_scale
    return column[:, None], minus_hit[:, None], row_scale[:, None]


class _TermBuffers:
    """Where :func:`_delta_terms` puts a vocabulary tile's terms ([T] each), and the row scale, computed once."""

    def __init__(self, valid: torch.Tensor, scale: torch.Tensor):
        tokens, device = valid.shape[0], valid.device
        self.local = torch.empty(tokens, dtype=torch.int64, device=device)
        self.hit = torch.empty(tokens, dtype=torch.bool, device=device)
        self.in_tile = torch.empty(tokens, dtype=torch.bool, device=device)
        self.column = torch.empty(tokens, dtype=torch.int64, device=device)
        self.minus_hit = torch.empty(tokens, dtype=torch.float32, device=device)
        self.row_scale = torch.where(valid, scale, 0.0)  # the same for every tile


def _delta_(p: torch.Tensor, t: torch.Tensor | None, terms: tuple) -> torch.Tensor:
    """Turn the fp32 probabilities ``p`` [rows, cols] into the gradient of the loss w.r.t. the raw logits, in place:
    ``(p − onehot(y)) · scale`` on valid rows, 0 on ignored ones, times ``1 − t²`` when soft-capped; ``terms``:
    :func:`_delta_terms` of these rows and columns."""
    column, minus_hit, row_scale = terms
    p.scatter_add_(1, column, minus_hit)
    p.mul_(row_scale)
    if t is not None:
        p.mul_(t.mul_(t).neg_().add_(1.0))
    return p


class FusedHeadLossFunction(torch.autograd.Function):
    """See the module docstring for the maths.  Inputs: hidden [T, H], weight [V, H], bias [V] or None, targets [T]
    (a negative target is an ignored token), inverse count (0-d fp32: 1/n), plan (or None), role, softcap (or
    None), token chunk C, vocabulary tile R (None: an on-the-fly head's dW is accumulated in the forward), whether
    grad is enabled (no gradient work without it), the compute dtype (W's, or autocast's), trigger (or None).
    Output: the loss, a 0-d fp32 tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_count, plan, role: Role, softcap, chunk, tile, grad_enabled,
                dtype, trigger):
        tokens = hidden.shape[0]
        ctx.hidden_dtype, ctx.bias_dtype, ctx.compute_dtype = hidden.dtype, getattr(bias, "dtype", None), dtype
        hidden = hidden.to(dtype)  # no-ops without autocast
        weight_c, bias_c = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        needs_dh, needs_dw, needs_db = (needs and grad_enabled for needs in ctx.needs_input_grad[:3])
        on_the_fly = role.updates_on_the_fly and grad_enabled
        tiled = on_the_fly and tile is not None
        accumulate = (role is Role.ACTIVE and grad_enabled) or (on_the_fly and not tiled)
        want_dw = accumulate and (needs_dw or on_the_fly)
        want_db = accumulate and bias is not None and (needs_db or on_the_fly)
        served = None
        if not tiled and tokens:  # a backend with kernels of its own for the whole loop (Liger's, on a GPU)
            served = get_backend(weight.device).linear_cross_entropy(
                hidden, weight_c, bias_c, targets, softcap, chunk, needs_dh or want_dw or want_db, want_dw)
        if served is not None:  # the sums' gradients: scaled by 1/n with γ in the backward
            total, grad_hidden, grad_weight, grad_bias = served
            grad_hidden = grad_hidden if needs_dh else None
            grad_weight = grad_weight if want_dw else None
            grad_bias = grad_bias if want_db else None
            # 1/n, or 0 where no token counts (n = 0): the sums' gradients are exactly 0 then, as F.cross_entropy's
            ctx.grad_scale, lse_all = torch.where(inv_count.isinf(), 0.0, inv_count), None
        else:
            total, grad_hidden, grad_weight, grad_bias, lse_all = _chunk_loop(
                hidden, weight_c, bias_c, targets, inv_count, softcap, chunk, needs_dh, want_dw, want_db, tiled)
            ctx.grad_scale = None
        ctx.role, ctx.plan, ctx.softcap, ctx.tile, ctx.dtype = role, plan, softcap, tile, weight.dtype
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.lse = lse_all
        ctx.use = plan.register_use(ctx) if on_the_fly else None
        # what the update writes, the head's own weight and bias: a saved-tensor hook may hand copies back
        # (linear.start_weight_role)
        ctx.written = (weight, bias) if on_the_fly else None
        if tiled:
            ctx.save_for_backward(hidden, weight, bias, targets, inv_count)
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_output):
        with outside_autocast(grad_output.device):
            return _head_loss_backward(ctx, grad_output)


def _chunk_loop(hidden, weight, bias, targets, inv_count, softcap, chunk, needs_dh, want_dw, want_db, keep_lse):
    """This library's own loop over chunks of ``chunk`` tokens (all in the compute dtype): ``(Σ loss, dh, dW, db,
    the per-token logsumexp or None)``, the gradients of the loss divided by n (``inv_count``) with γ = 1."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = _balanced_rows(chunk, tokens)
    dtype = hidden.dtype
    valid = targets >= 0
    safe = targets.clamp(min=0)[:, None]
    grad_hidden = torch.empty_like(hidden) if needs_dh else None
    single = tokens <= chunk  # one chunk: dW is that chunk's GEMM, in the compute dtype as autograd's
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if want_dw and not single else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_db else None
    lse_all = torch.empty(tokens, dtype=torch.float32, device=hidden.device) if keep_lse else None
    row_loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)  # summed once, after the blocks
    terms = _delta_terms(targets, valid, inv_count, vocab) if needs_dh or want_dw or want_db else None
    for start in range(0, tokens, chunk):
        stop = min(tokens, start + chunk)
        h = hidden[start:stop]
        z, t = _logits(h, weight, bias, softcap)
        picked = z.gather(1, safe[start:stop]).squeeze(1)
        lse = _softmax_(z)  # z now holds the probabilities
        torch.sub(lse, picked, out=row_loss[start:stop])
        if lse_all is not None:
            lse_all[start:stop] = lse
        if grad_hidden is None and not want_dw and grad_bias is None:
            del z, t  # before the next block of logits is allocated, not after: one block at a time
            continue
        g = _delta_(z, t, tuple(term[start:stop] for term in terms)).to(dtype)
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:stop])  # from W before any update (invariant 1)
        if single and want_dw:
            grad_weight = g.t() @ h
        elif want_dw:
            if g.dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)
            else:  # fp32 accumulation over the chunks; each chunk's GEMM in the compute dtype, as autograd's
                get_backend(grad_weight.device).add_scaled_(grad_weight, g.t() @ h)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=torch.float32)
        del z, t, g  # before the next block of logits is allocated, not after: one block at a time
    if want_dw and grad_weight is None:  # no tokens
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    total = torch.where(valid, row_loss, 0.0).sum()
    return total, grad_hidden, grad_weight, grad_bias, lse_all


def _head_loss_backward(ctx, grad_output):
    if ctx.grads is None:
        raise RuntimeError("fused_head_loss: the backward ran twice; its saved gradients were handed to the first "
                           "backward (retain_graph and a second backward are not supported by the fused loss)")
    grad_hidden, grad_weight, grad_bias = ctx.grads
    ctx.grads = None  # handed over: autograd may keep them as .grad without a copy
    gamma = grad_output.float()
    if ctx.grad_scale is not None:  # a backend's loop handed the summed loss's gradients
        gamma = gamma * ctx.grad_scale
    if grad_hidden is not None:
        grad_hidden = grad_hidden.mul_(gamma.to(grad_hidden.dtype)).to(ctx.hidden_dtype)
    on_the_fly = ctx.use is not None  # its update takes the sums as they are; autograd's come in the dtypes
    if grad_weight is not None:
        grad_weight = grad_weight.mul_(gamma)
        # summed in fp32 over the chunks: rounded once to the compute dtype, as autograd's one GEMM rounds it (and
        # as it overflows: an fp16 dW beyond 65504 under a loss scale is inf, so its update is skipped)
        grad_weight = grad_weight.to(ctx.compute_dtype)
        grad_weight = grad_weight if on_the_fly else grad_weight.to(ctx.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.mul_(gamma)
        grad_bias = grad_bias if on_the_fly else grad_bias.to(ctx.bias_dtype)
    if on_the_fly:
        if ctx.tile is None:  # dW was accumulated in the forward: one update for the dW summed over the uses
            pending = _finish_head_use(ctx, _HeadGrads(grad_weight, grad_bias))
            if pending is not None:
                update_linear_grad_(ctx.plan, ctx.role, *ctx.written, *_summed(pending))
            grad_weight = grad_bias = None
        else:
            if _finish_head_use(ctx, None, single=True) is not None:
                hidden, weight, bias, targets, inv_count = ctx.saved_tensors
                _update_by_tiles(ctx, hidden, weight, bias, targets, inv_count * gamma)
    trigger = trigger_gradient(ctx.needs_input_grad[12])
    return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, trigger


class _HeadGrads(NamedTuple):
    """One use's contribution to an on-the-fly head's update: the dW (and db) it accumulated in the forward."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _finish_head_use(ctx, grads: _HeadGrads | None, single: bool = False) -> list[_HeadGrads] | None:
    """The head's use bookkeeping: the contributions of every use of the head that ends with this one (another
    forward's loss summed into this backward: ``_HeadGrads`` each), or None while one is still to come.  The head's
    backward runs first in a backward, so a refusal here comes before anything is written: a use of the head weight
    by another fused function of the same forward is refused, and ``single`` (the vocabulary tiles, which rebuild
    the logits of one use) refuses a second use reached by this backward."""
    if ctx.plan.shares_its_forward(ctx.use):
        raise RuntimeError(
            f"fused_head_loss: the head weight {ctx.plan.name or ''} was also used by another fused function in the "
            "same forward; the fused loss cannot share its on-the-fly update with another use: patch(model, "
            "fused_loss=False) for this model")
    if single and ctx.plan.has_other_use_in_this_backward(ctx.use):
        raise RuntimeError(
            f"fused_head_loss: the on-the-fly head {ctx.plan.name or ''} is updated by vocabulary tiles (its dW does "
            "not fit the loss's budget) and takes one update per forward: a backward of several forwards' summed "
            "losses needs one forward (concatenate the batches), or patch(model, fused_loss=False)")
    pending = ctx.plan.finish_use(ctx.use, grads)
    if pending is not None and not all(isinstance(c, _HeadGrads) or (single and c is None) for c in pending):
        raise RuntimeError(
            f"fused_head_loss: the head weight {ctx.plan.name or ''} was also used by another fused function in "
            "another forward summed into this backward; its update cannot be shared: patch(model, fused_loss=False) "
            "for this model")
    return pending


def _summed(pending: list[_HeadGrads]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dW and db summed over the uses' contributions (the first's buffers, in place)."""
    weight, bias = pending[0]
    for other in pending[1:]:
        weight = weight.add_(other.weight)
        bias = bias.add_(other.bias) if bias is not None else None
    return weight, bias


def _update_by_tiles(ctx, hidden, weight, bias, targets, scale) -> None:
    """The on-the-fly update of the head, vocabulary tile by tile (see the module docstring).  No host sync: one
    flag, decided before the first tile writes, gates every tile's write on the device — the hidden states' and the
    logsumexp's finiteness and, where a token is scored, the loss scale's (every tile's gradient is finite where
    they are), and in fp16 every tile's dW (one skip reported).  Every tile's temporaries are allocated before the
    first tile (:class:`_VocabularyTiles`), so running out of memory never stops the update between two tiles.
    The logits are recomputed from the saved ``weight``; the update writes the head's own (``ctx.written``)."""
    backend = get_backend(hidden.device)
    lse, ctx.lse = ctx.lse, None
    tiles = _VocabularyTiles(hidden, weight, bias, targets, scale, lse, ctx.compute_dtype, ctx.softcap, ctx.tile)
    # the scale reaches the scored rows only: with none (n = 0, scale inf) every g is exactly 0, a null step
    finite = backend.finite_flag(hidden, lse) & (torch.isfinite(scale) | ~tiles.valid.any())
    if ctx.compute_dtype == torch.float16:
        # an fp16 tile's dW overflows from finite g and h (a loss-scaled backward) on its own: every tile is
        # checked before the first writes (its logits and GEMM once more)
        flags = [dw_finite_flag(g, h, stop - start, backend.finite_flag) for start, stop, g, h in tiles]
        if flags:
            finite = finite & torch.stack(flags).all()
    update_linear_tiles_(ctx.plan, ctx.role, *ctx.written, tiles, finite)


class _VocabularyTiles:
    """The tiles ``(start, stop, g[:, start:stop], hidden)`` of the head's on-the-fly update, in order, the first
    with the most rows: each tile's logits are recomputed from ``hidden`` (in the compute dtype) and the forward's
    logsumexp ``lse`` [T], and turned into the gradient of the logits (``scale``: 1/n times γ) by the forward's own
    functions.  Every temporary a tile needs is allocated here, once, and reused by each tile through ``out=`` and
    in-place ops, so a tile allocates nothing (as many bytes per logit as :func:`_bytes_per_logit` counts, for one
    tile).  Each ``g`` is overwritten by the next tile's."""

    def __init__(self, hidden, weight, bias, targets, scale, lse, dtype, softcap, tile):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        self.hidden, self.weight, self.bias, self.dtype, self.softcap = hidden, weight, bias, dtype, softcap
        self.tile = max(1, min(tile, vocab))
        self.targets, self.valid = targets, targets >= 0
        self.terms = _TermBuffers(self.valid, scale)
        self.lse = lse[:, None]
        device, elements = hidden.device, tokens * self.tile
        buffers = {"linear": dtype}  # the tile's GEMM output: fp32 logits, and their tanh when soft-capped
        if dtype != torch.float32 or softcap is not None:
            buffers["logits"] = torch.float32
        if dtype != torch.float32:
            buffers["compute"] = dtype  # the soft-capped logits before their upcast, then the tile's gradient
            if softcap is not None:
                buffers["tanh"] = torch.float32
        self.buffers = FlatBuffers(device, elements, **buffers)
        self.weight_c = FlatBuffers(device, self.tile * weight.shape[1], w=dtype) if weight.dtype != dtype else None
        self.bias_c = FlatBuffers(device, self.tile, b=dtype) if bias is not None and bias.dtype != dtype else None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Every tile's rows ``(start, stop)``, in order: ``tile`` rows each, the last what remains."""
        vocab = self.weight.shape[0]
        return [(start, min(vocab, start + self.tile)) for start in range(0, vocab, self.tile)]

    def __iter__(self):
        for start, stop in self.bounds:
            yield start, stop, self._gradient(start, stop), self.hidden

    def _gradient(self, start: int, stop: int) -> torch.Tensor:
        """g[:, start:stop] in the compute dtype: :func:`_logits`, :func:`_delta_terms` and :func:`_delta_`, into
        the buffers."""
        weight, bias = self.weight[start:stop], None if self.bias is None else self.bias[start:stop]
        if self.weight_c is not None:
            weight = self.weight_c.take("w", weight.shape).copy_(weight)
        if self.bias_c is not None:
            bias = self.bias_c.take("b", bias.shape).copy_(bias)
        logits, tanh = _logits(self.hidden, weight, bias, self.softcap, self.buffers)
        p = logits.sub_(self.lse).exp_()  # this tile's probabilities, from the forward's logsumexp
        g = _delta_(p, tanh, _delta_terms(self.targets, self.valid, None, stop - start, start, self.terms))
        return g if self.dtype == torch.float32 else self.buffers.take("compute", g.shape).copy_(g)


@torch.compiler.disable  # under torch.compile: a graph break (see fused_linear)
def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    plan: WeightPlan | None = None, *, ignore_index: int = -100, num_items_in_batch=None,
                    softcap: float | None = None, chunk_bytes: int | None = None,
                    hidden_sized: bool = False, room_bytes: int = 0, dw_bytes: int | None = None) -> torch.Tensor:
    """The mean (or ``/ num_items_in_batch``) cross-entropy of the logits ``hidden Wᵀ + b`` against ``targets``,
    without a [tokens, vocab] tensor; the head's backward follows ``plan`` (see the module docstring).

    Args:
        hidden: [T, H] the hidden states whose logits are scored (already flattened; any rows may be ignored).
        weight, bias: the head, [V, H] and [V] or None.
        targets: [T] the token each row must predict, or ``ignore_index``.
        plan: the head's :class:`~bread_kernels.WeightPlan`; None: plain autograd (dW if ``weight.requires_grad``).
        ignore_index: the target of a row that is not scored (default -100, transformers' padding label).
        num_items_in_batch: divide the summed loss by this (a number or a one-element tensor) instead of the count
            of non-ignored tokens, as transformers does for Trainer's gradient accumulation.
        softcap: Gemma2's ``final_logit_softcapping``: the logits are ``c · tanh(z / c)``.
        chunk_bytes: the bytes one block of logits may take (default ``BREAD_LOSS_CHUNK_BYTES`` or 256 MiB).
        hidden_sized: bound the blocks of logits (and an on-the-fly head's fp32 dW accumulated in the forward,
            unless ``dw_bytes`` is given) by the bytes of ``hidden``'s elements as logits: blocks of about
            ``T·H/V`` rows (Liger-Kernel's chunk) — for a head whose dW is accumulated in the forward (an
            Adam-trained head, or an on-the-fly one whose ``dw_bytes`` it fits) larger ones where those would be
            more than :data:`MAX_DW_BLOCKS_BESIDE_KEPT`, within the chunk budget (:func:`hidden_sized_blocks`).  For
            a step whose peak must not grow while something else is alive during the loss (the stream's kept top
            block, ``patch(keep_top=...)``).
        room_bytes: with ``hidden_sized``, the bytes a block of logits may take where that is more than
            ``hidden``'s size: what the caller counted beside the loss anyway (the kept top block's backward,
            counted at its activations' size, :meth:`~bread_kernels.stream.StreamConfig.room_beside_kept`).  It does
            not raise the dW budget: a dW held beside the block is ``dw_bytes``, counted by the caller.
            Larger blocks of logits run the head's GEMMs on more rows at once (on a CPU, at 1,024 tokens, vocab
            4,096 and hidden 512 in fp32, 128-row blocks took 1.2x the time of 512-row ones).
        dw_bytes: the bytes an on-the-fly head's fp32 dW accumulated in the forward may take instead (the caller
            counts them against what else it holds: :func:`forward_dw_bytes`); where dW does not fit, the
            vocabulary tiles compute it in the backward.  None: the budget's own rule (above).

    Returns a 0-d fp32 tensor.  With no non-ignored token and no ``num_items_in_batch`` the loss is nan, as
    ``torch.nn.functional.cross_entropy``'s mean is.
    """
    check_head_loss_inputs(hidden, weight, bias, targets, plan, ignore_index, num_items_in_batch, softcap)
    _check_budget_arguments(chunk_bytes, hidden_sized, room_bytes, dw_bytes)
    targets = targets.long()
    valid = targets != ignore_index
    # inside the Function a negative target is an ignored token; a bad one goes past the vocabulary (see the check)
    targets = torch.where(valid, torch.where(targets < 0, weight.shape[0], targets), -1)
    if num_items_in_batch is None:
        count = valid.sum().float()
    elif isinstance(num_items_in_batch, torch.Tensor):
        count = num_items_in_batch.detach().to(device=hidden.device, dtype=torch.float32).reshape(())
    else:
        count = torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=hidden.device)
    inv_count = 1.0 / count
    if plan is not None:
        role = plan.role
    else:
        role = Role.ACTIVE if weight.requires_grad or (bias is not None and bias.requires_grad) else Role.FROZEN
    float_softcap = float(softcap) if softcap is not None else None
    dtype = _compute_dtype(weight)
    if dw_bytes is None:
        dw_bytes = _dw_budget(chunk_bytes, hidden.shape[0], weight, dtype, float_softcap, hidden_sized)
    # a target whose writes are collectives (DDP's average) takes the whole dW: the number of tiles sized by each
    # rank's tokens would differ between the ranks
    dw_fits = _dw_fits(weight, bias, dw_bytes, dtype) or writes_collectively(plan)
    dw_in_forward = torch.is_grad_enabled() and (
        (role is Role.ACTIVE and (weight.requires_grad or (bias is not None and bias.requires_grad))) or
        (role.updates_on_the_fly and dw_fits))
    budget = _loss_budget(chunk_bytes, hidden.shape[0], weight, dtype, float_softcap, hidden_sized, room_bytes,
                          dw_in_forward)
    chunk = _rows_per_block(budget, weight.shape[0], dtype, float_softcap)  # the torch loop balances its blocks
    # where an on-the-fly head's fp32 dW fits, it is accumulated in the forward: no vocabulary tiles
    tile = None if dw_fits else _rows_per_block(budget, max(1, hidden.shape[0]), dtype, float_softcap)
    trigger = trigger_for(plan) if plan is not None else None
    return FusedHeadLossFunction.apply(hidden, weight, bias, targets, inv_count, plan, role, float_softcap, chunk,
                                       tile, torch.is_grad_enabled(), dtype, trigger)
