"""An out-of-memory error between two parts of an on-the-fly update (row chunks, vocabulary tiles, expert slices, the
torch epilogue's slices) never leaves a weight partly written: every allocation that the remaining parts need is
made before the first part writes.

Each test makes ``torch.OutOfMemoryError`` happen at the k-th aten op of the backward that allocates a tensor (not an
in-place op, a view or an ``out=`` call), for every k until the backward completes, and checks after each failure
that every weight is, bit for bit, either what it was before the backward or what an uninterrupted backward from the
same state makes it (the reference's one ``add_`` per weight leaves no third state).  This mirrors the Ctrl-C tests
of ``tests/test_interrupts.py``, with an exception that no signal handler can hold back.
"""

from __future__ import annotations

import itertools
import socket
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from bread_kernels import OnTheFlyUpdate, Role, Rounding, WeightPlan
from bread_kernels.collectives import all_reduce_update_
from bread_kernels.functions.experts import experts_gate, fused_experts
from bread_kernels.functions.head_loss import fused_head_loss
from bread_kernels.functions.linear import fused_linear
from bread_kernels.integrations.sharded_update import ShardLayout, reduce_scatter_update_
from bread_kernels.update import UpdateTarget, update_dense_, update_linear_
from tests.functions import test_experts as experts

#: an ``out=`` buffer of the wrong shape is resized (a hidden allocation, and a warning): an error here
pytestmark = pytest.mark.filterwarnings("error:An output with one or more elements was resized")

STEP = 0.05
ROLES = [Role.SGD, Role.SIGN]
#: fp32, and bf16 with its default rounding (stochastic), which the CPU backends' chunked epilogue writes
DTYPES = [torch.float32, torch.bfloat16]
#: the CPU backends, and Triton's under its interpreter (whose own allocations inside a launch are not counted:
#: :func:`launches_allocate_nothing`)
BACKENDS = ["torch", "native", "triton"]


@pytest.fixture(autouse=True)
def single_thread():
    """One CPU thread: a backward per allocation runs hundreds of tiny backwards, which torch's threads only slow
    (they spin against each other on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def allocates(func) -> bool:
    """Whether the aten op ``func`` returns a new tensor: it writes none of its arguments (not in-place, no
    ``out=``) and returns a tensor that aliases no input (not a view)."""
    schema = func._schema
    if any(argument.alias_info is not None and argument.alias_info.is_write for argument in schema.arguments):
        return False
    if any(result.alias_info is not None for result in schema.returns):
        return False
    return any("Tensor" in str(result.type) for result in schema.returns)


#: how many Triton launches are running under the interpreter now (nested: a launch inside a launch's hook)
_INTERPRETED_LAUNCHES = [0]


@pytest.fixture(autouse=True)
def launches_allocate_nothing(monkeypatch):
    """A Triton launch under the interpreter allocates what a GPU launch does not (an empty CPU tensor per argument,
    set to its storage, before the kernel runs): those ops are not counted, so the allocations failed in turn are
    the ones a GPU run makes too (the backend's, the autotuner's) and a launch is the GPU's one indivisible write."""
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # no triton: no launches
        return
    launch = GridExecutor.__call__

    def counted_apart(self, *args, **kwargs):
        _INTERPRETED_LAUNCHES[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            _INTERPRETED_LAUNCHES[0] -= 1

    monkeypatch.setattr(GridExecutor, "__call__", counted_apart)


class OutOfMemoryAt(TorchDispatchMode):
    """Raises ``torch.OutOfMemoryError`` at the ``at``-th op that allocates a tensor (counted from 1), outside an
    interpreted Triton launch."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.allocations, self.failed_op = at, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if allocates(func) and not _INTERPRETED_LAUNCHES[0]:
            self.allocations += 1
            if self.allocations == self.at:
                self.failed_op = str(func)
                raise torch.OutOfMemoryError(f"injected: allocation {self.at} ({func})")
        return func(*args, **(kwargs or {}))


Case = Callable[[], tuple[dict[str, torch.Tensor], Callable[[], None]]]


def assert_every_failure_leaves_each_weight_whole(case: Case) -> int:
    """``case()`` builds the same state each time (its forward done) and returns the weights the backward updates
    on the fly and the backward.  Runs the backward once uninterrupted, then once per allocation with an
    out-of-memory error there; returns how many runs failed."""
    weights, backward = case()
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    backward()
    after = {name: weight.detach().clone() for name, weight in weights.items()}
    assert all(not torch.equal(before[name], after[name]) for name in weights), "the backward moved no weight"
    for at in itertools.count(1):
        weights, backward = case()
        with OutOfMemoryAt(at) as injected:
            try:
                backward()
            except torch.OutOfMemoryError:
                pass
        if injected.failed_op is None:  # fewer allocations than ``at``: completed
            assert all(torch.equal(weights[name], after[name]) for name in weights)
            return at - 1
        partly = [name for name, weight in weights.items()
                  if not torch.equal(weight, before[name]) and not torch.equal(weight, after[name])]
        assert not partly, f"out of memory at allocation {at} ({injected.failed_op}) left {partly} partly written"


def _plan(role: Role, name: str) -> WeightPlan:
    return WeightPlan(role, OnTheFlyUpdate(lr=STEP), name=name)


def _values(dtype, *shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_a_weight_written_in_row_chunks(monkeypatch, backend, dtype, role):
    """A linear's dW (37 × 16) larger than ``BREAD_CHUNK_BYTES``: written in row chunks of a few rows, and its bias."""
    monkeypatch.setenv("BREAD_BACKEND", backend)
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(5 * 16 * 64))

    def case():
        weight, bias = _values(dtype, 37, 16, seed=0), _values(dtype, 37, seed=1)
        x = _values(dtype, 11, 16, seed=2).requires_grad_(True)
        grad = _values(dtype, 11, 37, seed=3)
        y = fused_linear(x, weight, bias, _plan(role, "linear"))
        return {"weight": weight, "bias": bias}, lambda: y.backward(grad)

    assert assert_every_failure_leaves_each_weight_whole(case) > 0


def head_in_vocabulary_tiles(monkeypatch, dtype, role) -> Case:
    """The fused head+loss whose dW (96 × 16, and a bias) does not fit ``BREAD_LOSS_CHUNK_BYTES``: its update is
    written in vocabulary tiles (the last with fewer rows), each also in row chunks on the CPU backends."""
    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(12 * 40 * 8))  # tiles of 80 and 16 rows (fp32), 40, 40, 16
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(16 * 16 * 64))

    def case():
        weight, bias = _values(dtype, 96, 16, seed=0), _values(dtype, 96, seed=1)
        hidden = _values(dtype, 12, 16, seed=2).requires_grad_(True)
        targets = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3))
        targets[4] = -100
        loss = fused_head_loss(hidden, weight, bias, targets, _plan(role, "lm_head"))
        return {"weight": weight, "bias": bias}, loss.backward

    return case


def experts_in_slices(monkeypatch, dtype, role) -> Case:
    """A 3-D expert weight: each routed expert's slice written in turn (and in row chunks on the torch backend)."""
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(12 * experts.H * 52))  # the torch backend: 2 chunks of gate_up_proj
    module = experts.experts_module(dtype, "cpu")
    index, routing_weights = experts.routing(dtype, "cpu")
    gate = experts_gate(module)

    def case():
        gate_up, down = module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()
        x, grad = experts.inputs(dtype, "cpu")
        plans = (_plan(role, "gate_up_proj"), _plan(role, "down_proj"))
        y = fused_experts(x.requires_grad_(True), index, routing_weights, gate_up, down, plans, gate)
        return {"gate_up_proj": gate_up, "down_proj": down}, lambda: y.backward(grad)

    return case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
@pytest.mark.parametrize("written_in_parts", [head_in_vocabulary_tiles, experts_in_slices],
                         ids=["head-in-vocabulary-tiles", "expert-weight-in-slices"])
def test_a_weight_written_in_parts(monkeypatch, backend, dtype, role, written_in_parts):
    monkeypatch.setenv("BREAD_BACKEND", backend)
    assert assert_every_failure_leaves_each_weight_whole(written_in_parts(monkeypatch, dtype, role)) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_a_whole_gradient_written_in_slices(monkeypatch, dtype, role):
    """A parameter whose whole gradient exists (the hook path's, a head's dW that fits the loss's budget): the torch
    backend's epilogue writes it in row slices whose temporaries fit ``BREAD_CHUNK_BYTES`` (the native backend in
    one op that allocates nothing)."""
    monkeypatch.setenv("BREAD_BACKEND", "torch")
    monkeypatch.setenv("BREAD_CHUNK_BYTES", str(7 * 16 * 48))  # slices of 7 rows

    def case():
        param, grad = _values(dtype, 30, 16, seed=0), _values(dtype, 30, 16, seed=1)
        plan = WeightPlan(role, OnTheFlyUpdate(lr=STEP), name="norm")
        return {"param": param}, lambda: update_dense_(plan, param, grad)

    assert assert_every_failure_leaves_each_weight_whole(case) > 0


# --- a GPU's autotuning of the Triton weight-update kernel, simulated under the interpreter ---


class SimulatedTuning:
    """The GPU path of :func:`bread_kernels.kernels.wgrad_update.wgrad_update_` under the interpreter: Triton's own
    autotuner over two tile configurations (the first the interpreter's tiles for the shapes here), each timed by
    two launches, in place of the GPU's.  ``log`` records ``("timing", N, parameter)`` for each timing launch and
    ``("write", N, parameter)`` for each launch that stores (``parameter``: the address of the weight's storage);
    every launch that must not store (``store=0``: the tuning's, its timing launches included) is checked to leave
    the weight as it was."""

    CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_M": 16}, {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16}]

    def __init__(self, monkeypatch):
        import triton

        from bread_kernels.kernels import wgrad_update

        self.log, self._launch = [], None
        self._tuner = triton.autotune(configs=[triton.Config(c) for c in self.CONFIGS], key=["N", "K"],
                                      do_bench=self._time)(wgrad_update._wgrad_update_kernel)
        monkeypatch.setattr(wgrad_update, "_compiled", lambda device: True)
        monkeypatch.setattr(wgrad_update, "_wgrad_update_tuned", self)
        monkeypatch.setattr(wgrad_update, "_tuned", set())
        monkeypatch.setattr(wgrad_update, "_warmed", set())

    def _time(self, kernel_call, quantiles):
        for _ in range(2):
            self.log.append(("timing", *self._launch))
            kernel_call()
        return [1.0] * len(quantiles)

    def __getitem__(self, grid):
        def launch(*args, **flags):
            weight, store = args[2], args[17]
            self._launch = (args[5], weight.untyped_storage().data_ptr())
            before = weight.clone()
            self._tuner[grid](*args, **flags)
            if store:
                self.log.append(("write", *self._launch))
            else:
                assert torch.equal(weight, before), "a launch with store=0 wrote the weight"

        return launch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", [head_in_vocabulary_tiles, experts_in_slices], ids=lambda parts: parts.__name__)
def test_a_gpu_tunes_every_part_of_a_write_before_the_first_part_writes(monkeypatch, parts, dtype):
    """On a GPU the Triton backend's first launch of a shape tunes the kernel: timing launches that must not store,
    and whatever they need (compiles, module loads) or raise.  A write in parts tunes every part's shape before the
    first part writes, so none of that happens between two parts, and the tuning writes nothing: the weights end as
    the interpreter's untuned launches leave them.  Before: the head's last, 16-row vocabulary tile was tuned after
    the larger tiles had written."""
    monkeypatch.setenv("BREAD_BACKEND", "triton")
    case = parts(monkeypatch, dtype, Role.SIGN)
    weights, backward = case()
    backward()
    untuned = {name: weight.clone() for name, weight in weights.items()}
    with monkeypatch.context() as simulating:
        tuning = SimulatedTuning(simulating)
        weights, backward = case()
        backward()
    for name, weight in weights.items():
        assert torch.equal(weight, untuned[name]), name
    in_parts = [name for name in weights if name != "bias"]  # a bias is written by the bare epilogue, untuned
    for weight in (weights[name] for name in in_parts):
        launches = [(i, what, rows) for i, (what, rows, storage) in enumerate(tuning.log)
                    if storage == weight.untyped_storage().data_ptr()]
        writes = [i for i, what, _ in launches if what == "write"]
        timings = [i for i, what, _ in launches if what == "timing"]
        assert len(writes) > 1 and timings, launches  # a write in parts, tuned
        assert max(timings) < min(writes), f"tuned between two parts' writes: {launches}"
        assert {rows for _, what, rows in launches if what == "write"} <= \
            {rows for _, what, rows in launches if what == "timing"}


# --- a GPU's compile variants of the update kernels, simulated under the interpreter ---


class LaunchVariants:
    """Records each launch of the two update kernels (the GEMM's and the bare epilogue's) under the interpreter as
    ``(variant, writes, storage)``: ``variant`` is what a GPU's Triton compiles and loads the launch as — the
    specialisation that Triton's own binder (``triton.runtime.jit``, built from the kernel's signature) computes
    from the arguments, and the options (the autotuner's configuration); ``writes`` whether the launch may store
    (``store`` and the ``ok`` flag set); ``storage`` the address of the written tensor's storage.  The process
    starts with nothing compiled."""

    def __init__(self, monkeypatch):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction, create_function_from_signature

        from bread_kernels.kernels import wgrad_update

        self.log = []
        self._binders = {}
        for kernel, written in ((wgrad_update._wgrad_update_kernel, "w_ptr"),
                                (wgrad_update._apply_update_kernel, "p_ptr")):
            compiled = JITFunction(kernel.fn, **kernel.kwargs)
            binder = create_function_from_signature(compiled.signature, compiled.params, BaseBackend)
            self._binders[kernel.fn] = (binder, written)
        run = InterpretedFunction.run

        def recorded(kernel, *args, grid, warmup, **kwargs):
            if kernel.fn in self._binders:
                binder, written = self._binders[kernel.fn]
                bound, specialisation, options = binder(*args, **kwargs)
                variant = (kernel.fn.__name__, repr(specialisation), repr(sorted(options.items())))
                writes = bool(bound.get("store", 1)) and bool(bound["ok_ptr"].item())
                self.log.append((variant, writes, bound[written].untyped_storage().data_ptr()))
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", recorded)
        monkeypatch.setattr(wgrad_update, "_warmed", set(), raising=False)

    def assert_warmed_before_the_first_write(self, storages: set, what: str) -> None:
        """Every variant that a write of the update of ``storages`` (a weight's, with its bias's) launches was
        first launched by a launch that writes nothing, before the update's first write, or by that first write
        itself (whose failed compile leaves everything unwritten): no compile or module load (which can fail) falls
        between two of its parts."""
        writes = [i for i, (_, writes, storage) in enumerate(self.log) if writes and storage in storages]
        assert len(writes) > 1, f"{what}: not a write in parts ({len(writes)} writes)"
        assert len({self.log[i][0] for i in writes}) > 1, f"{what}: its parts launch a single variant"
        first_seen = {}
        for i, (variant, writes_there, _) in enumerate(self.log):
            first_seen.setdefault(variant, (i, writes_there))
        for i in writes:
            seen, by_a_write = first_seen[self.log[i][0]]
            assert (not by_a_write and seen < writes[0]) or seen == writes[0], \
                f"{what}: write {i} launches a variant first launched at {seen} by a " \
                f"{'write' if by_a_write else 'warm-up'}, after the first write ({writes[0]}): {self.log[i][0]}"


def test_the_warm_ups_tell_apart_the_arguments_triton_specialises_apart():
    """What the warm-ups remember a compiled variant by (``wgrad_update._specialisation`` of each specialised
    argument) is the same for two arguments exactly where Triton's own specialisation of them is."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from bread_kernels.kernels.wgrad_update import _specialisation

    integers = [0, 1, 2, 15, 16, 17, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32 + 1, -1, -16, -2**31,
                -2**31 - 16, -2**31 - 1]
    tensors = [torch.zeros(8, dtype=dtype)[start:] for dtype in (torch.float32, torch.bfloat16, torch.uint8)
               for start in (0, 1, 4, 8)]
    values = integers + tensors
    ours = [_specialisation(value) for value in values]
    triton_s = [native_specialize_impl(BaseBackend, value, False, True, True) for value in values]
    for (a, ours_a, theirs_a), (b, ours_b, theirs_b) in itertools.combinations(zip(values, ours, triton_s), 2):
        assert (ours_a == ours_b) == (theirs_a == theirs_b), (a, b, ours_a, ours_b, theirs_a, theirs_b)


def _head_with_odd_tiles(dtype, role) -> tuple[dict, Callable[[], None], Callable[[dict], None]]:
    """The fused head+loss (11 × 13 and a bias, 7 tokens) in vocabulary tiles of 5, 5 and 1 rows: the second tile's
    rows of W and b start off a 16-byte boundary, the last tile has one row (N = 1, which Triton compiles as a
    constant); its check: W and b against ``W − step·f(dW)`` with plain autograd's dW (and db)."""
    tokens, hidden_size, vocab = 7, 13, 11
    weight, bias = _values(dtype, vocab, hidden_size, seed=0), _values(dtype, vocab, seed=1)
    hidden = _values(dtype, tokens, hidden_size, seed=2)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(3))
    targets[2] = -100
    reference = {name: t.detach().clone().requires_grad_(True) for name, t in (("weight", weight), ("bias", bias))}
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, reference["weight"], reference["bias"])
                                      .float(), targets, ignore_index=-100).backward()
    per_logit = 4 if dtype == torch.float32 else 8  # the fp32 logits, and a bf16 GEMM's output and gradient
    loss = fused_head_loss(hidden.clone().requires_grad_(True), weight, bias, targets, _plan(role, "lm_head"),
                           chunk_bytes=5 * tokens * per_logit)  # tiles of 5 vocabulary rows
    weights = {"weight": weight, "bias": bias}

    def check(updated):
        for name, t in reference.items():
            _assert_updated_like_autograd(updated[name], t.detach(), t.grad, role, f"lm_head.{name}")

    return weights, loss.backward, check


def _experts_with_one_token_experts(dtype, role) -> tuple[dict, Callable[[], None], Callable[[dict], None]]:
    """A 3-D expert weight pair (tests/functions/test_experts.py's odd shapes) whose 17 tokens go to experts 0 and 1
    (16 each: M a multiple of 16) and one each to experts 2 and 3 (M = 1, a constant to Triton); the slices and each
    expert's rows of g and x start on and off 16-byte boundaries.  Its check: the float64 update of plain
    autograd's dW."""
    tokens = 17
    module = experts.experts_module(dtype, "cpu")
    first = torch.tensor([0] * 16 + [2])
    second = torch.tensor([1] * 15 + [3, 1])
    index = torch.stack([first, second], 1)
    routing_weights = (torch.rand(tokens, 2, generator=torch.Generator().manual_seed(4)) + 0.1).to(dtype)
    x, grad = experts.inputs(dtype, "cpu", tokens=tokens)
    roles = (role, role)
    expected, _, _ = experts.float64_updated(module, x, index, routing_weights, grad, roles)
    weights = {"gate_up_proj": module.gate_up_proj.detach().clone(), "down_proj": module.down_proj.detach().clone()}
    plans = (experts.plan(role, "gate_up_proj"), experts.plan(role, "down_proj"))
    y = fused_experts(x.clone().requires_grad_(True), index, routing_weights, weights["gate_up_proj"],
                      weights["down_proj"], plans, experts_gate(module))

    def check(updated):
        for name, (new, dw) in zip(weights, expected):
            _assert_updated_like_autograd(updated[name], None, dw, role, name, new=new)

    return weights, lambda: y.backward(grad), check


def _linear_with_bias(dtype, role) -> tuple[dict, Callable[[], None], Callable[[dict], None]]:
    """A fused linear (11 × 13 and a bias, 7 tokens): its weight written by the GEMM kernel, then its bias by the bare
    epilogue's, a variant of its own (one row: R = 1, a constant to Triton).  Its check: W and b against
    ``W − step·f(dW)`` with plain autograd's dW (and db)."""
    tokens, features, outputs = 7, 13, 11
    weight, bias = _values(dtype, outputs, features, seed=0), _values(dtype, outputs, seed=1)
    x, grad = _values(dtype, tokens, features, seed=2), _values(dtype, tokens, outputs, seed=3)
    reference = {name: t.detach().clone().requires_grad_(True) for name, t in (("weight", weight), ("bias", bias))}
    torch.nn.functional.linear(x, reference["weight"], reference["bias"]).backward(grad)
    y = fused_linear(x.clone().requires_grad_(True), weight, bias, _plan(role, "linear"))
    weights = {"weight": weight, "bias": bias}

    def check(updated):
        for name, t in reference.items():
            _assert_updated_like_autograd(updated[name], t.detach(), t.grad, role, f"linear.{name}")

    return weights, lambda: y.backward(grad), check


def _head_with_whole_dw(dtype, role) -> tuple[dict, Callable[[], None], Callable[[dict], None]]:
    """:func:`_head_with_odd_tiles`' head and loss with a budget that holds its whole dW: the weight written from
    dW by the bare epilogue (11 rows), then its bias by the same kernel in a variant of its own (one row)."""
    tokens, hidden_size, vocab = 7, 13, 11
    weight, bias = _values(dtype, vocab, hidden_size, seed=0), _values(dtype, vocab, seed=1)
    hidden = _values(dtype, tokens, hidden_size, seed=2)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(3))
    reference = {name: t.detach().clone().requires_grad_(True) for name, t in (("weight", weight), ("bias", bias))}
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, reference["weight"], reference["bias"])
                                      .float(), targets).backward()
    loss = fused_head_loss(hidden.clone().requires_grad_(True), weight, bias, targets, _plan(role, "lm_head"),
                           chunk_bytes=2**20)
    weights = {"weight": weight, "bias": bias}

    def check(updated):
        for name, t in reference.items():
            _assert_updated_like_autograd(updated[name], t.detach(), t.grad, role, f"lm_head.{name}")

    return weights, loss.backward, check


def _assert_updated_like_autograd(actual, before, dw, role, what, new=None) -> None:
    """``actual`` within rounding of ``new`` (default ``before − STEP·f(dW)`` in float64): fp32 to 1e-5, a
    low-precision weight to one ulp of the result plus the rounding of dW; where ``role`` is SIGN, a dW within
    rounding of 0 may take either sign."""
    dw = dw.double()
    f = torch.sign if role is Role.SIGN else (lambda t: t)
    if new is None:
        new = before.double() - STEP * f(dw)
    eps = torch.finfo(actual.dtype).eps
    if actual.dtype == torch.float32:
        bound = 1e-5 + 1e-5 * new.abs() + STEP * dw.abs() * 1e-5
    else:
        bound = 1.01 * eps * new.abs() + STEP * dw.abs() * eps + 1e-6
    ok = (actual.double() - new).abs() <= bound
    if role is Role.SIGN:
        ok |= dw.abs() <= 1e-2 * dw.abs().max()
    assert ok.all(), f"{what}: {(~ok).sum().item()} of {ok.numel()} elements off the reference"


@pytest.mark.parametrize("dtype,role", [(torch.float32, Role.SGD), (torch.bfloat16, Role.SIGN)],
                         ids=["fp32-sgd", "bf16-sign"])
@pytest.mark.parametrize("case,updates", [(_head_with_odd_tiles, [{"weight", "bias"}]),
                                          (_experts_with_one_token_experts, [{"gate_up_proj"}, {"down_proj"}]),
                                          (_linear_with_bias, [{"weight", "bias"}]),
                                          (_head_with_whole_dw, [{"weight", "bias"}])],
                         ids=["head-tiles", "expert-slices", "linear-bias", "head-whole-dw"])
def test_a_gpu_compiles_every_variant_of_a_write_in_parts_before_the_first_part_writes(monkeypatch, case, updates,
                                                                                       dtype, role):
    """On a GPU, Triton compiles and loads a kernel at the first launch of each variant (its specialisation on the
    tensors' alignment and the integers' size class, and its constexprs), and that can fail (out of memory) — after
    the earlier parts of a write wrote, where a later part launches a variant of its own (the head's last tile of
    one row, a tile that starts off a 16-byte boundary, its bias's tiles; an expert with one token; a linear's bias,
    or the head's written from its whole dW, written after the weight by the bare epilogue's one-row variant).
    Every variant of an update's writes is launched first by a launch that writes nothing, before its first write
    (or by that first write, whose failure leaves everything unwritten); a second step of the same shapes launches
    nothing more (what was warmed is remembered), and the weights end as the reference's plain-autograd update makes
    them.  Before: the parts were tuned per shape only (the head's tiles per row count, its bias's not at all), never
    compiled per variant, and the seeds' 32-bit keys, passed as integers, made a 64-bit variant of each kernel for
    every key past 2³¹ (half the seeds: a tile's seed could pick a variant of its own); a linear's bias (and a
    whole-dW head's) was compiled between the weight's write and its own."""
    monkeypatch.setenv("BREAD_BACKEND", "triton")
    with monkeypatch.context() as simulating:
        SimulatedTuning(simulating)
        launches = LaunchVariants(simulating)
        for step in range(2):
            weights, backward, check = case(dtype, role)
            first = len(launches.log)
            backward()
            check(weights)
            if step == 0:
                for update in updates:
                    storages = {weights[name].untyped_storage().data_ptr() for name in update}
                    launches.assert_warmed_before_the_first_write(storages, "/".join(sorted(update)))
            else:
                warm_ups = [variant for variant, writes, _ in launches.log[first:] if not writes]
                assert not warm_ups, f"the second step warmed again: {warm_ups}"


# --- the data-parallel writes: each part waits for a collective, so a failure between two parts is reported ---


@pytest.fixture
def one_rank():
    """A gloo process group of one rank (the collectives then sum one term)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _fill_failing_at(call: int, gradient: torch.Tensor):
    """A ``fill`` of the flat ``gradient`` whose ``call``-th call runs out of memory."""
    calls = [0]

    def fill(start, stop, out):
        calls[0] += 1
        if calls[0] == call:
            raise torch.OutOfMemoryError("injected")
        out.copy_(gradient.view(-1)[start:stop])

    return fill


class _AllReduceTarget(UpdateTarget):
    """A data-parallel target that writes a linear weight in chunks of two rows, as the DDP target does."""

    def __init__(self, group, fail_at: int):
        self.group, self.fail_at = group, fail_at

    def linear_(self, weight, bias, g, x, step, sign, update):
        return all_reduce_update_(weight, _fill_failing_at(self.fail_at, g.t() @ x), step=step, sign=sign,
                                  rounding=update.rounding, seed=update.next_seed(), divisor=1.0,
                                  locally_finite=torch.ones((), dtype=torch.bool), group=self.group, rows_per_chunk=2)


def test_a_data_parallel_write_stopped_between_chunks_names_the_partly_written_weight(one_rank):
    """DDP's chunked all-reduce and update: out of memory at the second chunk's gradient leaves the first two rows
    written; the error says so and names the weight (before: a bare out-of-memory error, the weight silently
    half-updated)."""
    weight, g, x = _values(torch.float32, 6, 4, seed=0), _values(torch.float32, 5, 6, seed=1), _values(
        torch.float32, 5, 4, seed=2)
    plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=STEP), name="layers.0.mlp.up_proj",
                      target=_AllReduceTarget(one_rank, fail_at=2))
    with pytest.raises(torch.OutOfMemoryError) as raised:
        update_linear_(plan, Role.SGD, weight, None, [(g, x)])
    notes = "\n".join(raised.value.__notes__)
    assert "first 2 of 6 rows written" in notes and "layers.0.mlp.up_proj" in notes, notes
    plan.target = _AllReduceTarget(one_rank, fail_at=1)  # before any part: nothing written, nothing to say
    with pytest.raises(torch.OutOfMemoryError) as raised:
        update_linear_(plan, Role.SGD, weight, None, [(g, x)])
    assert not getattr(raised.value, "__notes__", None)


def test_a_zero3_shard_write_stopped_between_chunks_says_it_is_partly_written(one_rank):
    """ZeRO-3's chunked reduce-scatter and update of this rank's shard: out of memory at the second chunk."""
    shard, gradient = _values(torch.float32, 24, seed=0), _values(torch.float32, 24, seed=1)
    before = shard.clone()
    layout = ShardLayout(one_rank, 1, 0, 24, 24)
    with pytest.raises(torch.OutOfMemoryError) as raised:  # 8 bytes: chunks of one element
        reduce_scatter_update_(shard, layout, _fill_failing_at(2, gradient), step=STEP, sign=True,
                               rounding=Rounding.NEAREST, seed=0, divisor=1.0, locally_finite=True, budget_bytes=8)
    assert "first 1 of 24 elements written" in "\n".join(raised.value.__notes__)
    assert not torch.equal(shard[:1], before[:1]) and torch.equal(shard[1:], before[1:])


@pytest.mark.parametrize("dtype,role", [(torch.float32, Role.SIGN), (torch.bfloat16, Role.SGD),
                                        (torch.bfloat16, Role.SIGN)])
def test_writes_in_parts_under_a_backward_that_builds_a_graph(dtype, role):
    """``loss.backward(create_graph=True)`` runs the backward with grad mode on: the writes in parts (here an MoE
    model's expert slices, through the buffers allocated before the first) are no part of the graph and must not
    record (an ``out=`` op refuses operands that require grad), so they move the weights as a plain backward does."""
    import bread_kernels
    from tests.model_zoo import loss_of, qwen3_moe

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    trained = []
    for create_graph in (False, True):
        model = bread_kernels.patch(qwen3_moe(dtype=dtype, layers=2))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), list(model.named_parameters()),
                                           switch_block_every=10, sgd_mode="all", sgd_use_sign=role is Role.SIGN,
                                           sgd_lr_scaling=5.0, rounding=Rounding.NEAREST)
        loss_of(model, ids).backward(create_graph=create_graph)
        trained.append({name: p.detach().clone() for name, p in model.named_parameters()})
        opt.close()
    moved = [name for name, p in trained[0].items() if not torch.equal(p, before[name])]
    assert any("experts" in name for name in moved), moved
    for name, plain in trained[0].items():
        torch.testing.assert_close(trained[1][name], plain, rtol=0, atol=0, msg=name)
