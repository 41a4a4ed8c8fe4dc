"""The on-the-fly update of one weight: the one place that checks, reports, reads the step, draws the seed and writes.

Every SGD/SIGN update in the library goes through one of six entry points, by the shape of its gradient:

===========================  ====================================================  ===================================
entry point                  gradient                                              callers
===========================  ====================================================  ===================================
:func:`update_linear_`       ``dW = gᵀx`` from (g [M, N], x [M, K]) pairs, summed  the fused linear and LoRA functions
:func:`update_linear_grad_`  a linear's whole summed dW [N, K] (and db [N])        the head+loss where dW fits, DDP's
:func:`update_linear_tiles_` row tiles of dW, ``dW[a:b] = gᵀx`` per tile             the fused head+loss's vocabulary tiles
:func:`update_experts_`      expert e of a 3-D weight [E, N, K]: ``dW_e = gₑᵀxₑ``  the fused experts function
:func:`update_rows_`         the summed rows ``G`` [R, H] of the distinct ids [R]  the fused embedding
:func:`update_dense_`        a materialised gradient of the parameter's shape      the hook path (norms, small linears)
===========================  ====================================================  ===================================

Each does, in this order: read ``lr·s`` (:meth:`OnTheFlyUpdate.step_size`), hand the write to the plan's
:class:`UpdateTarget` with the update's seed stream, and give the target's finiteness answer to the plan, which
reports a skip (design invariant 3).  The local target answers with a device flag: the backend computes it from
what it uses (the dW it builds, which is autograd's ``.grad``, or where none exists the gradient's operands) and
gates its own write on it, so a non-finite gradient leaves the weight untouched and the
backward never reads a tensor on the host; a plan with ``checks`` (the optimizer's) keeps the flag until its owner
reads all of a step's flags at once, as ``GradScaler``'s ``found_inf``.  A skipped update consumes its seed like an
applied one (the host cannot know, at that point, that it was skipped).

*Where the bytes go* is the target's job: a :class:`LocalTarget` (the default, ``plan.target is None``: the plan's
own, which chooses the backend of its weight's device once) writes the tensor itself through that backend; the
DeepSpeed integration supplies a target that reduce-scatters dW and writes this rank's ZeRO-3 shard.  Nothing here
knows which; that is what keeps ``functions/`` free of DeepSpeed.  A target checks finiteness itself because a
sharded one must agree across ranks (a flag rides in its collective).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Union

import torch

from .backends import get_backend
from .backends.chunked import chunk_budget_bytes
from .backends.epilogue import dw_finite_flag
from .interrupts import add_note, partly_written, whole_write
from .plan import OnTheFlyUpdate, Role, WeightPlan

__all__ = ["UpdateTarget", "LocalTarget", "LOCAL", "Finite", "all_finite", "dw_finite", "dw_all_finite",
           "writes_collectively", "update_linear_", "update_experts_", "update_linear_grad_", "update_linear_tiles_",
           "update_rows_", "update_dense_"]

#: a target's answer: a 0-dim bool tensor on the device (decided without the host), or a bool it already read
Finite = Union[torch.Tensor, bool]


def dw_finite(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Whether ``dW = gᵀx`` computed in g's dtype is finite (a 0-dim bool on the device), for a caller that builds dW
    itself: non-finite where g or x is, and where an fp16 dW overflows at 65,504 from finite operands
    (:func:`~bread_kernels.backends.epilogue.dw_finite_flag`, with the CPU backends' chunk budget of dW rows)."""
    rows = max(1, chunk_budget_bytes() // max(1, x.shape[1] * x.element_size()))
    return dw_finite_flag(g, x, rows, get_backend(g.device).finite_flag)


def dw_all_finite(g: torch.Tensor, x: torch.Tensor) -> bool:
    """:func:`dw_finite` read on the host, for a caller that decides there (a sharded target whose ranks agree
    through a collective)."""
    return bool(dw_finite(g, x))


def all_finite(*tensors: torch.Tensor) -> bool:
    """True if no element is inf or nan (read on the host: for callers that must decide there, as a sharded target
    whose ranks agree through a collective)."""
    if not tensors:
        return True
    return bool(get_backend(tensors[0].device).finite_flag(*tensors))


class UpdateTarget:
    """Where an on-the-fly update writes (a strategy a :class:`~bread_kernels.plan.WeightPlan` carries).

    Each method applies ``P -= step · f(gradient)`` (``f`` the identity, or ``sign`` when ``sign``), rounding with
    ``update.rounding`` and drawing seeds with ``update.next_seed()``, and returns whether the gradient was
    finite (:data:`Finite`: a device flag or a bool) — having written nothing where it was not.  ``skip_reason``
    is what the plan reports then.
    """

    skip_reason = "its gradient is not finite"

    #: whether each write is a collective that every rank issues (the DDP target's all-reduces): a caller must then
    #: make the same calls on every rank whatever its tokens — an expert weight that no token reached still calls
    #: :meth:`experts_` (with no pairs), and the fused head+loss hands its whole dW to :meth:`linear_grad_` rather
    #: than tiles sized by its tokens, so such a target implements both
    collective_calls = False

    def check_forward(self, under_deepspeed: bool) -> None:
        """Before each forward with grad of a model whose plans carry this target: raise, naming the remedy, where
        this target cannot write what the plans ask (``under_deepspeed``: a DeepSpeed engine wraps the model).
        Nothing by default."""

    def ranks_group(self):
        """The process group whose ranks must all train the same parameters the same way for this target's writes
        to be right (a target whose writes are collectives pairing each rank's gradient of a weight with the other
        ranks' of the same weight), checked before the first forward with grad after the roles change; None (the
        default): none."""
        return None

    def ranks_fingerprint(self) -> list[str]:
        """This target's own settings that every rank of :meth:`ranks_group` must share (ranks that differ would
        issue different collectives); none by default."""
        return []

    def settle(self) -> None:
        """Complete the writes this target still has in progress, after which every flag it returned holds its
        answer (a target that lets its collectives travel while the backward goes on fills them later; the
        others have nothing to do)."""

    def linear_(self, weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor, x: torch.Tensor,
                step: float, sign: bool, update: OnTheFlyUpdate) -> Finite:
        """``weight`` [N, K] with ``dW = gᵀx`` (g [M, N], x [M, K]); ``bias`` [N] with ``db = Σ_m g``."""
        raise NotImplementedError

    def experts_(self, weight: torch.Tensor, per_expert: dict[int, tuple[torch.Tensor, torch.Tensor]], step: float,
                 sign: bool, update: OnTheFlyUpdate) -> Finite:
        """A 3-D expert weight [E, N, K]: each expert ``e`` in ``per_expert`` with ``dW_e = gᵀx`` (g [M_e, N],
        x [M_e, K]); the other experts' gradient is zero (a local target leaves them untouched; ``per_expert`` may
        be empty only for a target with :attr:`collective_calls`)."""
        raise NotImplementedError(
            f"bread_kernels: the update target {type(self).__name__} cannot write 3-D expert weights (mixture-of-"
            "experts); train the experts with Role.ACTIVE or FROZEN there"
        )

    def rows_(self, weight: torch.Tensor, rows: torch.Tensor, summed: torch.Tensor, step: float, sign: bool,
              update: OnTheFlyUpdate) -> Finite:
        """Rows ``rows`` [R] of ``weight`` [V, H] with their summed fp32 gradients ``summed`` [R, H]."""
        raise NotImplementedError

    def linear_grad_(self, weight: torch.Tensor, bias: torch.Tensor | None, grad_weight: torch.Tensor,
                     grad_bias: torch.Tensor | None, step: float, sign: bool, update: OnTheFlyUpdate) -> Finite:
        raise NotImplementedError(f"{type(self).__name__} cannot write a linear weight from its whole gradient; "
                                  "its callers (the fused head+loss) refuse custom targets")

    def linear_tiles_(self, weight: torch.Tensor, bias: torch.Tensor | None, tiles, ok: torch.Tensor, step: float,
                      sign: bool, update: OnTheFlyUpdate) -> Finite:
        """Row tiles ``(start, stop, g, x)`` of a linear weight's dW, each gated on ``ok``
        (:func:`update_linear_tiles_`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write a linear weight by row tiles; its caller (the "
                                  "fused head+loss) refuses custom targets")

    def dense_(self, param: torch.Tensor, grad: torch.Tensor, step: float, sign: bool,
               update: OnTheFlyUpdate) -> Finite:
        """``param`` (any shape) with ``grad`` of its shape."""
        raise NotImplementedError


class LocalTarget(UpdateTarget):
    """The tensor itself, through the backend of its device (no dW tensor for a linear weight).  Every write is
    gated on the device by the gradient's finiteness flag, which is what it returns.

    Args:
        keep_backend: keep the backend chosen for a device (:func:`~bread_kernels.backends.get_backend`) for later
            writes there, rather than asking again at each write (two environment reads and a lookup: ~10 µs of a
            fused backward's host time).  A plan's own target keeps it (the backend is chosen once per weight: a
            ``BREAD_BACKEND`` set later applies to plans written after, as an optimizer does at each switch);
            :data:`LOCAL`, shared by every caller, asks each time.
    """

    def __init__(self, keep_backend: bool = False):
        self.keep_backend = keep_backend
        self._kept = None  # (device, backend)

    def __getstate__(self):
        """Copied or pickled without the backend it kept: a backend is a process's shared object (the Triton one
        holds modules, which cannot be copied); the copy chooses again at its first write."""
        return {"keep_backend": self.keep_backend, "_kept": None}

    def backend(self, device: torch.device):
        """The backend that writes tensors on ``device``."""
        if not self.keep_backend:
            return get_backend(device)
        kept = self._kept
        if kept is None or kept[0] != device:
            kept = self._kept = (device, get_backend(device))
        return kept[1]

    def linear_(self, weight, bias, g, x, step, sign, update) -> torch.Tensor:
        backend = self.backend(weight.device)
        grad_bias = g.sum(0, dtype=torch.float32) if bias is not None else None
        _prepare_bias(backend, bias, grad_bias, sign, update.rounding)
        # the backend checks what it uses (the dW it builds: an fp16 one overflows from finite g and x) and db in
        # the same check, so one flag gates both
        ok = backend.update_weight_(weight, g, x, step, sign, update.rounding, update.next_seed(),
                                    also=() if bias is None else (grad_bias,))
        if bias is not None:
            backend.apply_update_(bias, grad_bias, step, sign, update.rounding, update.next_seed(), ok=ok)
        return ok

    def linear_grad_(self, weight, bias, grad_weight, grad_bias, step, sign, update) -> torch.Tensor:
        """As :meth:`linear_` (one flag over weight and bias gates both; weight's seed first), from dW and db."""
        backend = self.backend(weight.device)
        _prepare_bias(backend, bias, grad_bias, sign, update.rounding)
        ok = backend.apply_update_if_finite_(weight, grad_weight, step, sign, update.rounding, update.next_seed(),
                                             checked=(grad_weight, *(() if grad_bias is None else (grad_bias,))))
        if bias is not None:
            backend.apply_update_(bias, grad_bias, step, sign, update.rounding, update.next_seed(), ok=ok)
        return ok

    def experts_(self, weight, per_expert, step, sign, update) -> torch.Tensor:
        """One seed for the whole parameter, and expert ``e``'s slice ``weight[e]`` (a 2-D view) written through the
        backend with ``offset = e·N·K``: every element draws the random bits of its logical index in [E, N, K], as
        :meth:`dense_` of the whole tensor would.  One flag over every expert's operands gates every write: a
        non-finite one skips the whole parameter, as the reference's hook skips its whole gradient (and a Ctrl-C
        between two slices comes after the last: :func:`~bread_kernels.interrupts.whole_write`); so does an fp16
        expert's dW that overflows from finite operands (each expert's GEMM run once more, before any write).  A
        bf16/fp32 dW past 3.4·10³⁸ from finite operands is not checked here (as on the ``addmm_`` path)."""
        backend = self.backend(weight.device)
        seed = update.next_seed()
        per_slice = weight.shape[1] * weight.shape[2]
        if len(per_expert) == 1:  # the backend checks the dW it builds, as for a linear
            (e, (g, x)), = per_expert.items()
            return backend.update_weight_(weight[e], g, x, step, sign, update.rounding, seed, offset=e * per_slice)
        ok = backend.finite_flag(*(t for pair in per_expert.values() for t in pair))
        if any(g.dtype == torch.float16 for g, _ in per_expert.values()):
            for e, (g, x) in per_expert.items():  # an fp16 dW overflows from finite operands: decided up front
                flag = backend.dw_finite_flag(weight[e], g, x, sign, update.rounding)
                ok = ok if flag is None else ok & flag
        # every allocation the slices need, before the first writes: an out-of-memory error stops none halfway
        tokens = max(g.shape[0] for g, _ in per_expert.values())
        work = backend.part_buffers(weight[0], tokens, next(iter(per_expert.values()))[0].dtype, sign,
                                    update.rounding)
        for e, (g, x) in per_expert.items():  # and no kernel tuned or compiled between two slices
            backend.prepare_update_(weight[e], g, x, sign, update.rounding, ok, offset=e * per_slice)
        with whole_write():  # every expert's slice of the one tensor, or none
            for e in sorted(per_expert):
                backend.update_weight_(weight[e], *per_expert[e], step, sign, update.rounding, seed, ok,
                                       offset=e * per_slice, check=False, work=work)
        return ok

    def linear_tiles_(self, weight, bias, tiles, ok, step, sign, update) -> torch.Tensor:
        """Row tiles of ``weight`` (and ``bias``), the first the largest (see :func:`update_linear_tiles_`), each
        written as :meth:`linear_` writes a linear, gated on ``ok`` alone (decided before the first tile), with the
        buffers the first tile's write needs allocated before it writes and reused by every tile, and every tile's
        writes prepared (:func:`_prepare_tiles`), so nothing is allocated, tuned or compiled between two tiles'
        writes."""
        backend = self.backend(weight.device)
        bounds = tiles.bounds
        tiles = iter(tiles)
        first = next(tiles, None)
        if first is None:
            return ok
        start, stop, g, x = first
        work = backend.part_buffers(weight[start:stop], g.shape[0], g.dtype, sign, update.rounding)
        bias_grad = bias_work = None
        if bias is not None:
            bias_grad = torch.empty(stop - start, dtype=torch.float32, device=bias.device)
            bias_work = backend.epilogue_buffers(stop - start, bias.dtype, update.rounding, bias.device)
        _prepare_tiles(backend, weight, bias, bounds, g, x, bias_grad, ok, sign, update.rounding)
        del g, x
        with whole_write():  # every tile, or Ctrl-C before the first: never the rows of some tiles alone
            for start, stop, g, x in itertools.chain((first,), tiles):
                backend.update_weight_(weight[start:stop], g, x, step, sign, update.rounding, update.next_seed(), ok,
                                       check=False, work=work)
                if bias is not None:
                    summed = torch.sum(g, 0, dtype=torch.float32, out=bias_grad[: stop - start])
                    backend.apply_update_(bias[start:stop], summed, step, sign, update.rounding, update.next_seed(),
                                          ok=ok, buffers=bias_work)
                del g  # before the next tile is computed: a caller's tiles are one at a time
        return ok

    def rows_(self, weight, rows, summed, step, sign, update) -> torch.Tensor:
        backend = self.backend(weight.device)
        selected = weight.index_select(0, rows)
        ok = backend.apply_update_if_finite_(selected, summed, step, sign, update.rounding, update.next_seed(),
                                             checked=(summed,))
        weight.index_copy_(0, rows, selected)
        return ok

    def dense_(self, param, grad, step, sign, update) -> torch.Tensor:
        """The backends' epilogues write 1-D or 2-D tensors: any other shape is written through its flat view, a
        scalar parameter (a learned loss scale or temperature) as one element."""
        backend = self.backend(param.device)
        target = param.detach()
        flat = target if target.dim() in (1, 2) else target.view(-1)
        if flat.shape != grad.shape:
            grad = grad.reshape(flat.shape)
        # every backend's epilogue widens a bf16/fp16 gradient to fp32 itself
        return backend.apply_update_if_finite_(flat, grad, step, sign, update.rounding, update.next_seed(),
                                               checked=(grad,))


def _prepare_bias(backend, bias: torch.Tensor | None, grad_bias: torch.Tensor | None, sign: bool, rounding) -> None:
    """``backend.prepare_apply_`` for the write of a linear's ``bias`` that follows its weight's (:meth:`LocalTarget.
    linear_`, :meth:`~LocalTarget.linear_grad_`), before the weight writes: on a GPU the bias's write launches an
    epilogue variant of its own (one row), whose compile or module load could otherwise fail between the two
    writes, leaving the weight updated and the bias not.  With the write's own ``grad_bias``; its flag is the
    weight's write's answer, a fresh allocation, which Triton specialises as it does the one-byte True that
    ``ok=None`` stands for (both 16-byte aligned), so None warms the same variant without allocating a flag.  Once
    per variant: later steps cost the backend's lookup of a key."""
    if bias is not None:
        backend.prepare_apply_(bias, grad_bias, sign, rounding)


def _prepare_tiles(backend, weight: torch.Tensor, bias: torch.Tensor | None, bounds, g: torch.Tensor,
                   x: torch.Tensor, bias_grad: torch.Tensor | None, ok: torch.Tensor, sign: bool, rounding) -> None:
    """``backend.prepare_update_`` for each tile's write, and ``backend.prepare_apply_`` for its bias's, before the
    first tile writes, with the arguments each write will have: the tile's rows of ``weight``, the first tile's
    ``g`` [M, R] viewed as the tile's [M, rows] (its first elements where it is contiguous, as each tile's g is in
    its caller's one buffer; its first columns otherwise), ``x`` and ``ok``; the tile's rows of ``bias`` and of
    the fp32 ``bias_grad`` buffer.  On a GPU a tile can launch a kernel variant that no earlier tile did (the last
    tile's fewer rows, a tile that starts off a 16-byte boundary): the backend compiles and tunes each variant once,
    now, rather than between two tiles' writes."""
    like = {}
    for start, stop in bounds:
        rows = stop - start
        if rows not in like:
            like[rows] = g.reshape(-1)[: g.shape[0] * rows].view(g.shape[0], rows) if g.is_contiguous() \
                else g[:, :rows]
        backend.prepare_update_(weight[start:stop], like[rows], x, sign, rounding, ok)
        if bias is not None:
            backend.prepare_apply_(bias[start:stop], bias_grad[:rows], sign, rounding, ok)


def writes_collectively(plan: WeightPlan | None) -> bool:
    """Whether ``plan``'s on-the-fly writes are collectives every rank issues
    (:attr:`UpdateTarget.collective_calls`): its caller must make the same calls on every rank whatever its tokens."""
    return plan is not None and plan.role.updates_on_the_fly and \
        bool(getattr(plan.target, "collective_calls", False))


LOCAL = LocalTarget()
_NO_CONTEXT = contextlib.nullcontext()  # reusable


def _apply(plan: WeightPlan, role: Role,
           write: Callable[[UpdateTarget, float, bool, OnTheFlyUpdate], Finite]) -> Finite:
    update = plan.update
    if update is None or not role.updates_on_the_fly:
        raise ValueError(f"bread_kernels: {plan.name or 'a weight'} has role {role.name}, which takes no on-the-fly "
                         "update")
    target = plan.target
    if target is None:
        target = plan.local_target
        if target is None:
            target = plan.local_target = LocalTarget(keep_backend=True)
    try:
        # a backward runs with grad mode off unless it builds a graph (create_graph=True): the writes are no
        # part of one, and the out= ops of a write in parts refuse operands that require grad
        with torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT:
            finite = write(target, update.step_size(sign=role is Role.SIGN), role is Role.SIGN, update)
    except BaseException as exc:
        if partly_written(exc) is not None:  # a write in parts between collectives (interrupts.py)
            add_note(exc, f"bread_kernels: raised while writing the on-the-fly update of {plan.name or 'a weight'} "
                          f"through {type(target).__name__}")
        raise
    if plan.writes is not None:
        plan.writes.record()
    if plan.checks is None and isinstance(finite, torch.Tensor):
        target.settle()  # the flag is read now
    plan.record_finite(finite, target.skip_reason)
    return finite


def update_linear_(plan: WeightPlan, role: Role, weight: torch.Tensor, bias: torch.Tensor | None,
                   contributions: list[tuple[torch.Tensor, torch.Tensor]]) -> Finite:
    """``plan``'s update of a linear weight (and bias) for the summed gradient of the (g [M, N], x [M, K]) pairs,
    one per use of the weight in the forward.  Returns the finiteness answer (where False: skipped, nothing
    written, reported through the plan)."""
    if len(contributions) == 1:
        g, x = contributions[0]
    else:
        g = torch.cat([c[0] for c in contributions])
        x = torch.cat([c[1] for c in contributions])
    return _apply(plan, role, lambda target, step, sign, update: target.linear_(weight, bias, g, x, step, sign,
                                                                                update))


def update_experts_(plan: WeightPlan, role: Role, weight: torch.Tensor,
                    contributions: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> Finite:
    """``plan``'s update of a 3-D expert weight ``weight`` [E, N, K] (``gate_up_proj``, ``down_proj``): expert ``e``
    takes the update for ``dW_e = Σ gᵀx`` over its (g [M_e, N], x [M_e, K]) pairs — the tokens routed to it, one
    pair per use of the weight in the forward.  Experts absent from ``contributions`` received no token: their gradient
    is zero and a local target does not write them (SGD: ``-lr·0``; SIGN: ``sign(0) = 0``); a collective one
    (DDP's) sends zeros for them and writes the ranks' average.  No [E, N, K] gradient exists.
    Returns the finiteness answer (where False: skipped, nothing written, reported through the plan)."""
    per_expert = {}  # empty only where the target's calls are collective (see experts.py)
    for e, pairs in contributions.items():
        per_expert[e] = pairs[0] if len(pairs) == 1 else (torch.cat([g for g, _ in pairs]),
                                                          torch.cat([x for _, x in pairs]))
    return _apply(plan, role, lambda target, step, sign, update: target.experts_(weight, per_expert, step, sign,
                                                                                 update))


def update_linear_tiles_(plan: WeightPlan, role: Role, weight: torch.Tensor, bias: torch.Tensor | None,
                         tiles: Iterable[tuple[int, int, torch.Tensor, torch.Tensor]], finite: torch.Tensor) -> Finite:
    """``plan``'s update of a linear weight (and bias) whose summed gradient only exists row tile by row tile: ``tiles``
    yields ``(start, stop, g [M, stop − start], x [M, K])`` with ``dW[start:stop] = gᵀx`` (the fused head+loss's
    vocabulary tiles, whose g is computed one tile at a time), the first tile with the most rows, and ``tiles.bounds``
    lists every tile's ``(start, stop)`` before the first is computed.  One step size, and one finiteness answer for the
    whole weight: ``finite``, a 0-dim bool the caller decided before the first tile (the head+loss: its hidden states',
    logsumexp's and loss scale's finiteness, which every tile's g follows, and in fp16 every tile's dW), which gates
    every tile's write; a dW past fp32's or bf16's range from finite operands (3.4·10³⁸) is not checked (as on the
    ``addmm_`` path).  Whole or not at all: a Ctrl-C while the tiles are written comes after the last
    (:func:`~bread_kernels.interrupts.whole_write`), and every buffer the writes need is allocated (and every tile's
    kernel tuned) before the first tile writes, so running out of memory stops none halfway (a tile's own temporaries
    are the caller's to allocate up front).  A local target only (the head+loss refuses others)."""
    return _apply(plan, role, lambda target, step, sign, update: target.linear_tiles_(weight, bias, tiles, finite,
                                                                                      step, sign, update))


def update_linear_grad_(plan: WeightPlan, role: Role, weight: torch.Tensor, bias: torch.Tensor | None,
                        grad_weight: torch.Tensor, grad_bias: torch.Tensor | None) -> Finite:
    """``plan``'s update of a linear weight (and bias) whose whole summed gradient ``grad_weight`` [N, K]
    (``grad_bias`` [N]) already exists — where a caller had to build it anyway, as the fused head+loss does when dW
    fits its memory budget.  Returns the finiteness answer, as :func:`update_linear_`."""
    if (bias is None) != (grad_bias is None):
        raise ValueError("update_linear_grad_: give grad_bias exactly when there is a bias")
    return _apply(plan, role, lambda target, step, sign, update: target.linear_grad_(weight, bias, grad_weight,
                                                                                     grad_bias, step, sign, update))


def update_rows_(plan: WeightPlan, role: Role, weight: torch.Tensor, rows: torch.Tensor,
                 summed: torch.Tensor) -> Finite:
    """``plan``'s row-sparse update of an embedding table: ``rows`` [R] distinct ids, ``summed`` [R, H] fp32."""
    return _apply(plan, role, lambda target, step, sign, update: target.rows_(weight, rows, summed, step, sign,
                                                                              update))


def update_dense_(plan: WeightPlan, param: torch.Tensor, grad: torch.Tensor) -> Finite:
    """``plan``'s update of a parameter whose whole gradient ``grad`` exists (the hook path)."""
    return _apply(plan, plan.role, lambda target, step, sign, update: target.dense_(param, grad, step, sign,
                                                                                    update))
