"""What the backward does with each weight: its :class:`Role`, and for the on-the-fly roles the update rule.

A :class:`WeightPlan` is the per-weight entry the fused functions read *at backward time*; the block optimizer
rewrites it at every block switch.  Reading it at backward time (not at forward time) is what lets an LR schedule
stepped between forward and backward apply, as it would with a hook on ``.grad``.
"""

from __future__ import annotations

import enum
import math
import numbers
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .rounding import Rounding

__all__ = ["Role", "Rounding", "OnTheFlyUpdate", "WeightPlan", "FiniteChecks", "OnTheFlyWrites", "begin_forward",
           "forward_epoch", "running_backward", "PLAN_ATTR", "BACKWARD_TRIGGER", "backward_accumulates",
           "trigger_gradient"]

#: the attribute of a fused module (a patched Linear, LoRA layer or embedding) that holds its WeightPlan, or None
PLAN_ATTR = "_bread_weight_plan"

_forward_epoch = 0


@torch.compiler.disable  # a host-side counter: never traced into a graph
def begin_forward() -> None:
    """Start a new forward: uses of an on-the-fly weight registered from now on belong to it, and an update waits
    only for the backward of the uses of its own forward.  :func:`bread_kernels.patch` calls it before every forward
    of the patched model, so a graph kept alive without a backward (a logged loss, a metric forward with grad on)
    never holds back later updates."""
    global _forward_epoch
    _forward_epoch += 1


def forward_epoch() -> int:
    """The number :func:`begin_forward` gave the forward that runs now (or ran last)."""
    return _forward_epoch


class Role(enum.Enum):
    """What the backward does with one weight (and the bias that belongs to it).

    ============  =============================================  ===================================
    role          dW                                             where it goes
    ============  =============================================  ===================================
    ``ACTIVE``    computed                                       accumulated into ``.grad`` (autograd)
    ``SGD``       computed in tiles/chunks, never whole          ``W -= lr·s·dW``
    ``SIGN``      computed in tiles/chunks, never whole          ``W -= lr·s·sign(dW)``
    ``LORA``      none for the base weight                       adapters A, B get their gradients
    ``FROZEN``    not computed                                   —
    ============  =============================================  ===================================

    In every role dX is computed when the layer below needs it, from the weight *before* any update.
    """

    ACTIVE = "active"
    SGD = "sgd"
    SIGN = "sign"
    LORA = "lora"
    FROZEN = "frozen"

    #: SGD or SIGN (set on each member below the class: every fused forward and backward asks)
    updates_on_the_fly: bool


for _role in Role:
    _role.updates_on_the_fly = _role in (Role.SGD, Role.SIGN)


LrLike = Union[float, Callable[[], float]]


def _is_number(value) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class OnTheFlyUpdate:
    """The update an ``SGD``/``SIGN`` weight receives inside the backward: ``W -= lr · scale · f(dW)``.

    ``lr`` is a float or a zero-argument callable (e.g. ``lambda: optimizer.param_groups[0]["lr"]``), read when
    the backward runs.  ``scale`` is BlockOptimizers' ``sgd_lr_scaling``.  ``loss_scale`` undoes a loss scaler's
    factor (``torch.amp.GradScaler``): the SGD step is ``lr·scale / loss_scale`` (SIGN needs none); an overflowed gradient is not finite
    and skips its weight's update, as every non-finite gradient does.  ``seed`` seeds stochastic rounding;
    every application draws a fresh stream from ``(seed, draw)`` so successive steps use different bits while a
    rerun from the same state reproduces them exactly.
    """

    lr: LrLike
    scale: float = 1.0
    rounding: Rounding = Rounding.AUTO
    seed: int = 0
    draws: int = 0
    #: the factor the loss was multiplied by before ``backward()`` (fp16 loss scaling; a float or a zero-argument
    #: callable, read when the backward runs): the step is divided by it, so the update is of the true gradient
    loss_scale: LrLike = 1.0

    def __post_init__(self):
        if isinstance(self.rounding, str):
            try:
                self.rounding = Rounding(self.rounding)
            except ValueError:
                raise ValueError(
                    f"OnTheFlyUpdate: unknown rounding {self.rounding!r}; use one of "
                    f"{[r.value for r in Rounding]}"
                ) from None
        if not callable(self.lr) and not _is_number(self.lr):
            raise TypeError(f"OnTheFlyUpdate: lr must be a number or a zero-argument callable, got {type(self.lr)}")
        if not callable(self.loss_scale) and not _is_number(self.loss_scale):
            raise TypeError("OnTheFlyUpdate: loss_scale must be a number or a zero-argument callable, got "
                            f"{type(self.loss_scale)}")
        if not _is_number(self.scale):
            raise TypeError(f"OnTheFlyUpdate: scale must be a number (sgd_lr_scaling), got {type(self.scale)}")
        # numbers are checked now, as torch.optim checks its lr; a callable's value when the backward reads it
        for what, value in (("lr", self.lr), ("scale", self.scale)):
            if not callable(value) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"OnTheFlyUpdate: {what} must be finite and >= 0, got {value!r}")
        if not callable(self.loss_scale) and not (math.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise ValueError(f"OnTheFlyUpdate: loss_scale must be finite and > 0, got {self.loss_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"OnTheFlyUpdate: seed must be an int >= 0, got {self.seed!r}")

    def step_size(self, sign: bool = False) -> float:
        """lr · scale / loss_scale (a SIGN step: lr · scale, sign(S·g) being sign(g)), read now.  Raises if it is
        not a finite non-negative number."""
        lr = self.lr() if callable(self.lr) else self.lr
        try:
            value = float(lr) * float(self.scale)
        except (TypeError, ValueError):
            raise TypeError(f"OnTheFlyUpdate: the lr read for the on-the-fly update must be a number, got {lr!r} "
                            "(from the callable given as lr)") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"OnTheFlyUpdate: lr·scale must be finite and >= 0, got lr={lr}, scale={self.scale}")
        if sign:
            return value
        loss_scale = float(self.loss_scale() if callable(self.loss_scale) else self.loss_scale)
        if not math.isfinite(loss_scale) or loss_scale <= 0:
            raise ValueError(f"OnTheFlyUpdate: the loss scale must be finite and > 0, got {loss_scale}")
        return value / loss_scale if loss_scale != 1.0 else value

    def next_seed(self) -> int:
        """A 64-bit seed for one application of the update; advances the draw counter."""
        seed = (self.seed * 0x9E3779B97F4A7C15 + self.draws * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
        self.draws += 1
        return seed


@dataclass
class WeightPlan:
    """The current Role of one weight (and its bias) and, for ``SGD``/``SIGN``, its update rule.

    ``target`` says where the update's bytes go: None (the weight tensor itself) unless an integration that shards
    the weights (ZeRO-3) supplies its own :class:`~bread_kernels.update.UpdateTarget`.

    ``checks`` says when a skip is found: an update's finiteness is a flag on the device (the write was gated on
    it there).  With ``checks`` None the plan reads it at once (a host sync per update: for plans used on their
    own); an optimizer gives its plans one :class:`FiniteChecks`, which keeps the flags and reads them all once per
    step, so the backward itself never waits for the device.

    It also keeps the bookkeeping that makes a weight used several times in one forward correct (design invariant
    2): the on-the-fly update waits until the backward of every use *of that forward* (see :func:`begin_forward`)
    has run, then applies the update for the summed gradient once.  Uses whose graph was dropped without a backward
    are forgotten automatically.
    """

    role: Role = Role.FROZEN
    update: OnTheFlyUpdate | None = None
    name: str = ""
    skipped_updates: int = 0
    #: called with (name, reason) instead of warning, when set
    reporter: Callable[[str, str], None] | None = field(default=None, repr=False)
    #: where the on-the-fly update writes (a :class:`bread_kernels.update.UpdateTarget`); None: the tensor itself
    target: object | None = field(default=None, repr=False)
    #: where the finiteness flags of this plan's updates wait to be read (None: read at once)
    checks: "FiniteChecks | None" = field(default=None, repr=False)
    #: where this plan's writes are recorded, for the graphs they make stale (None: not recorded)
    writes: "OnTheFlyWrites | None" = field(default=None, repr=False)
    _uses: "weakref.WeakSet[_UseToken]" = field(default_factory=weakref.WeakSet, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    #: with ``target`` None, the writer of the weight's own tensor that :mod:`bread_kernels.update` made at this
    #: plan's first update (it keeps the backend it chose: one choice per weight, not one per update)
    local_target: object | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.role, str):
            try:
                self.role = Role(self.role)
            except ValueError:
                raise ValueError(f"WeightPlan: unknown role {self.role!r}; use one of {[r.value for r in Role]}") from None
        self.check()

    def __deepcopy__(self, memo: dict) -> None:
        """None: a plan is its optimizer's instruction for one weight, so a deep copy of a model it sits on (the
        whole model, a submodule, a block) is driven by no optimizer and its fused modules run plain autograd — not
        the original optimizer's updates in the copy's backward, with finiteness flags nobody reads."""
        return None

    def __getstate__(self):
        raise TypeError(f"bread_kernels: the plan of {self.name or 'a weight'} belongs to the optimizer driving its "
                        "model and does not pickle; save model.state_dict() or save_pretrained() (and the optimizer's "
                        "state_dict()), or bread_kernels.unpatch(model) first")

    def check(self) -> None:
        """Raise if the role cannot run as configured (no Role, an update rule of another type, an on-the-fly role
        with none)."""
        if not isinstance(self.role, Role):
            raise TypeError(f"WeightPlan{' ' + self.name if self.name else ''}: role must be a bread_kernels.Role or "
                            f"its name ({[r.value for r in Role]}), got {self.role!r}")
        if self.update is not None and not isinstance(self.update, OnTheFlyUpdate):
            raise TypeError(f"WeightPlan{' ' + self.name if self.name else ''}: update must be a "
                            f"bread_kernels.OnTheFlyUpdate or None, got {type(self.update).__name__}")
        if self.role.updates_on_the_fly and self.update is None:
            raise ValueError(
                f"WeightPlan{' ' + self.name if self.name else ''}: role {self.role.name} updates the weight inside "
                "the backward and needs an lr: pass update=OnTheFlyUpdate(lr=...)"
            )

    # -- multi-use bookkeeping (used by the fused functions) ---------------------------------------------------
    def register_use(self, node=None) -> "_UseToken":
        """A use of the weight in the forward that runs now; ``node``: the autograd node of that use (the fused
        Function's ``ctx``), which tells whether a backward that runs later reaches it."""
        if self._pending:
            self._drop_abandoned()
        token = _UseToken(_forward_epoch, node)
        self._uses.add(token)
        return token

    def finish_use(self, token: "_UseToken", contribution) -> list | None:
        """Record one use's contribution (a fused function's (grad_output, input) pair, or what it hands the update);
        return every contribution that ends with it once the last of them is done: the uses of its forward, and
        the uses of other forwards that the same backward reaches (two forwards' losses summed into one backward).
        So a weight takes one update for the gradient summed over them, after every use's dX, as autograd's
        accumulation gives the reference's post-accumulate-grad hook one call.  None: wait, or no update at all in
        a backward that accumulates no gradient (``torch.autograd.grad``: :func:`backward_accumulates`)."""
        if not backward_accumulates():  # the use stays unfinished: a full backward of the same graph may follow
            return None
        self._uses.discard(token)
        if not self._pending and not self._uses:  # the common case: a weight used once per forward
            return [contribution]
        backward = running_backward()
        self._pending.append((token.epoch, backward, contribution))
        if any(self._awaited(use, token) for use in self._uses):
            return None
        live = {use.epoch for use in self._uses}
        released = [epoch not in live or (backward is not None and task == backward)
                    for epoch, task, _ in self._pending]
        ready = [entry[2] for entry, out in zip(self._pending, released) if out]
        self._pending = [entry for entry, out in zip(self._pending, released) if not out]
        return ready

    @staticmethod
    def _awaited(use: "_UseToken", token: "_UseToken") -> bool:
        """Whether the update that ``token``'s backward finishes must wait for the unfinished ``use``: one the running
        backward will execute (another use of this forward, or of another forward whose loss it sums).  A use of the
        same forward that the running backward does not reach — an output the loss never read (the logits of a
        forward whose hidden states alone feed the loss, through the head called again), whose graph the caller
        still holds — contributes no gradient to this backward, as autograd gives the reference's hook none from
        it: the update is not held back for it (before, it waited for a backward that never came, and the next
        forward dropped the update as abandoned).  A use whose node is unknown (no autograd node was registered)
        is waited for where it shares the forward, or where torch cannot say which backward runs."""
        if use.runs_in_this_backward():
            return True
        if use.epoch != token.epoch:
            return False
        return use.node is None or _CURRENT_GRAPH_TASK_ID is None or _WILL_ENGINE_EXECUTE_NODE is None

    def shares_its_forward(self, token: "_UseToken") -> bool:
        """Whether another use of the weight in ``token``'s forward is not finished yet and is waited for (the running
        backward reaches it, or it cannot tell: :meth:`_awaited`); a use whose output the loss never read is not."""
        return any(use is not token and use.epoch == token.epoch and self._awaited(use, token) for use in self._uses)

    def has_other_use_in_this_backward(self, token: "_UseToken") -> bool:
        """Whether a use of the weight other than ``token``'s, not yet finished (another forward's summed into this
        backward, or this forward's), is reached by the backward that runs now: a caller that cannot merge
        contributions refuses before anything is written."""
        return any(use is not token and use.runs_in_this_backward() for use in self._uses)

    def _drop_abandoned(self) -> None:
        """Forget the contributions of a forward that used this weight several times and whose other uses were
        dropped without a backward (their tokens died with their graph): the update of an incomplete gradient is
        skipped and reported."""
        live = {use.epoch for use in self._uses}
        if any(epoch not in live for epoch, _, _ in self._pending):
            self._pending = [entry for entry in self._pending if entry[0] in live]
            self.report_skip("not every use of an earlier forward ran its backward (a graph dropped, or a backward "
                             "that failed partway)")

    def record_finite(self, finite, reason: str) -> None:
        """The answer of one update's target: a bool already read, or a 0-dim bool device tensor (kept in
        ``checks`` when set, read now otherwise).  A False answer is reported as a skip with ``reason``."""
        if isinstance(finite, torch.Tensor):
            if self.checks is not None:
                self.checks.add(self, finite, reason)
                return
            finite = bool(finite)
        if not finite:
            self.report_skip(reason)

    def report_skip(self, reason: str) -> None:
        self.skipped_updates += 1
        if self.reporter is not None:  # an optimizer collects the step's skips and reports them once
            self.reporter(self.name, reason)
            return
        warnings.warn(
            f"bread_kernels: skipped the on-the-fly {self.role.name} update of {self.name or 'a weight'}: {reason}. "
            "The weight is unchanged.",
            RuntimeWarning,
            stacklevel=3,
        )


class FiniteChecks:
    """The finiteness flags of on-the-fly updates, kept on their devices until :meth:`resolve` reads them all with
    one host sync per device (as ``GradScaler`` reads ``found_inf`` once per step); each False flag is reported as
    a skip on its plan then.  An optimizer owns one and resolves it when it steps."""

    def __init__(self):
        self._entries: list[tuple[WeightPlan, torch.Tensor, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, plan: WeightPlan, finite: torch.Tensor, reason: str) -> None:
        self._entries.append((plan, finite, reason))

    def resolve(self) -> int:
        """Read every pending flag, report the skips on their plans, and return how many were skipped."""
        entries, self._entries = self._entries, []
        by_device: dict[torch.device, list] = {}
        for entry in entries:
            by_device.setdefault(entry[1].device, []).append(entry)
        skipped = 0
        for group in by_device.values():
            flags = torch.stack([finite.reshape(()) for _, finite, _ in group]).tolist()
            for (plan, _, reason), finite in zip(group, flags):
                if not finite:
                    plan.report_skip(reason)
                    skipped += 1
        return skipped

    def clear(self) -> None:
        self._entries = []


class OnTheFlyWrites:
    """The forwards whose graphs an on-the-fly write has made stale: one per optimizer, shared by its plans.

    A graph saves the weights its forward used, and an on-the-fly update writes them in place inside a backward.
    A backward through a graph built before such a write — two forwards with grad and then their two backwards,
    or a second backward of one graph (``retain_graph=True``) — would compute every dX from weights its forward
    never used (or meet autograd's in-place error partway, some weights already written), so the owner refuses it
    before anything is written: its forward guards the outputs with the forward's number, and :meth:`made_stale`
    answers at the first output a backward reaches, which no node of the model's graph precedes (the loss, the
    logits); the outputs reached later in the same backward (hidden states, router logits: their graph's upper part
    has run, and written) pass with it (:func:`running_backward`).  A write of the backward that runs now makes
    nothing stale for that backward: a weight written before one of its uses' nodes that backward reaches has run
    is held back until they have (:meth:`WeightPlan.finish_use`), so what it wrote is what no node of it still reads
    — the head a loss calls again on the forward's hidden states writes before the backward reaches them.
    """

    __slots__ = ("stale_through", "stale_before", "backward")

    def __init__(self):
        #: every forward numbered up to this one (:func:`forward_epoch`) ran before a write
        self.stale_through = 0
        #: every forward numbered up to this one ran before a write of a backward other than :attr:`backward`
        self.stale_before = 0
        #: the backward that wrote last (:func:`running_backward`)
        self.backward = None

    def record(self) -> None:
        """An on-the-fly update wrote now: every forward that has begun saw the weights before it.  (The forward whose
        backward writes is among them, but its first output's guard ran already, and let this backward through.)"""
        backward = running_backward()
        if backward is None or backward != self.backward:
            self.stale_before, self.backward = self.stale_through, backward
        self.stale_through = _forward_epoch

    def made_stale(self, epoch: int) -> bool:
        """Whether an on-the-fly write of an earlier backward came after the forward numbered ``epoch`` had begun
        (asked inside a backward; outside one, any write)."""
        backward = running_backward()
        if backward is not None and backward == self.backward:
            return epoch <= self.stale_before
        return epoch <= self.stale_through


class _UseToken:
    """Lives as long as one forward use's autograd node (it is stored on the ctx, which it holds weakly)."""

    __slots__ = ("epoch", "node", "__weakref__")

    def __init__(self, epoch: int, node=None):
        self.epoch = epoch
        self.node = weakref.ref(node) if node is not None else None

    def runs_in_this_backward(self) -> bool:
        """Whether the backward that runs now will execute this use's node (False outside a backward)."""
        node = self.node() if self.node is not None else None
        if node is None or _WILL_ENGINE_EXECUTE_NODE is None:
            return False
        try:
            return bool(_WILL_ENGINE_EXECUTE_NODE(node))
        except RuntimeError:  # asked outside a backward
            return False


def running_backward() -> int | None:
    """An id of the backward that runs now (autograd's graph task; -1 outside a backward), None where torch lacks
    the private ``_current_graph_task_id`` (``tests/test_plan.py`` fails on its absence)."""
    return _CURRENT_GRAPH_TASK_ID() if _CURRENT_GRAPH_TASK_ID is not None else None


_CURRENT_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)

#: autograd's answer to "does the running backward execute this node" — private (``register_multi_grad_hook`` uses
#: it; there is no public query).  Where a torch lacks it, two forwards summed into one backward update once per
#: forward again, and ``torch.autograd.grad`` makes the on-the-fly updates; ``tests/test_plan.py`` fails on its
#: absence.
_WILL_ENGINE_EXECUTE_NODE = getattr(torch._C, "_will_engine_execute_node", None)

#: a leaf that requires grad, which every fused function with an on-the-fly role takes as an input and returns no
#: gradient for (:func:`trigger_gradient`; so it never gets a ``.grad`` in an eager backward): the function's backward
#: then runs even where none of its real inputs requires grad (a frozen weight whose input comes from a frozen
#: embedding), and :func:`backward_accumulates` asks whether the running backward executes the leaf's gradient
#: accumulator
BACKWARD_TRIGGER = torch.zeros((), requires_grad=True)
#: its accumulator node, held so that every graph's edge to the trigger leads to this one node
_TRIGGER_NODE = torch.autograd.graph.get_gradient_edge(BACKWARD_TRIGGER).node


def trigger_gradient(given: bool) -> torch.Tensor | None:
    """What a fused function's backward returns for :data:`BACKWARD_TRIGGER` (``given``: whether its forward took
    the trigger, ``ctx.needs_input_grad`` at its place; an input that was None takes None): None, except while
    compiled autograd runs its graph (which calls the fused backwards eagerly: :func:`backward_accumulates`), whose
    sum of the gradients that reach a leaf cannot add a None (``add(): argument 'input' must be Tensor, not
    NoneType`` over a whole BREAD-SGD model): a zero there, which leaves the trigger a ``.grad`` of 0.  Compiled
    autograd's running flag is private (``torch._dynamo.compiled_autograd.in_compiled_autograd_region``); it is read
    only where that module was imported, so an eager run pays one dictionary lookup, and ``tests/test_compile.py``
    fails if it moves."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    if given and compiled_autograd is not None and getattr(compiled_autograd, "in_compiled_autograd_region", False):
        return torch.zeros_like(BACKWARD_TRIGGER)
    return None


def backward_accumulates() -> bool:
    """Inside a fused function's backward: whether the running backward is a full one (``loss.backward()``,
    ``torch.autograd.backward`` without ``inputs``), which executes every node it reaches, the trigger's accumulator
    included — not ``torch.autograd.grad`` or a backward given ``inputs=``, which execute only the paths to the
    tensors they name.  The on-the-fly updates run in a full backward only: the reference's post-accumulate-grad
    hooks fire only where a ``.grad`` accumulates, which ``torch.autograd.grad`` never does (a gradient probe, a
    penalty) and a backward with ``inputs=`` does only for the tensors it names, among which a fused weight, which
    requires no grad, is not.  True outside a backward (a caller that hands contributions over itself).

    Where dynamo traces the backward (compiled autograd) it raises instead: dynamo then stops tracing the fused
    function's backward and runs it eagerly (a graph break), where the answer is the running backward's — a traced
    answer would be fixed into the graph, whose replay then wrote no update."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "bread_kernels: a fused function's backward cannot be traced into a graph (compiled autograd); it must "
            "run eagerly, where its on-the-fly update is made")
    if _WILL_ENGINE_EXECUTE_NODE is None:
        return True
    try:
        return _WILL_ENGINE_EXECUTE_NODE(_TRIGGER_NODE)
    except RuntimeError:  # asked outside a backward
        return True
