"""ZeRO-3 under DeepSpeed: the one module that touches DeepSpeed's internals (supported: 0.19.x).

DeepSpeed stays the distributed engine; this module plugs the fused backward into it.

* **Inactive weights** (roles SGD/SIGN) stay outside DeepSpeed's optimizer.  Their update runs inside the fused
  Linear/embedding backward (or, for parameters without a fused function such as norm weights, in the block
  optimizer's post-accumulate-grad hook) while DeepSpeed's parameter coordinator has the weight gathered:
  dX from the gathered (old) weight, then dW chunk by chunk, ``reduce_scatter`` over the parameter's own process
  group, averaged over its ranks and unscaled by the loss scale, and the SGD/sign step (fp32, rounded once) on
  this rank's shard ``param.ds_tensor`` only (padding untouched).  No ``.grad`` is left behind and the full
  gradient is never all-reduced.  The maths and the memory bound are in :mod:`.sharded_update`.
* **Persistent parameters** (``ds_persist``: small ones that stay gathered between steps) get their gathered copy
  refreshed from the updated shards at the end of the backward that updated them (one all-gather per backward for
  all of them), so the next micro-batch sees the update on every rank.
* **The active block** goes through DeepSpeed's own stage-3 optimizer.  At a block switch, after
  ``engine.step()`` has returned (so the outgoing block's last step is kept), :class:`ZeroBlockEngine` destroys
  the stage-3 optimizer, drops the backward Functions DeepSpeed caches on each module (they close over the old
  coordinator), and builds a new one for the new block: every module keeps one set of hooks.
* **Gradient accumulation** (``gradient_accumulation_steps`` = A > 1): the on-the-fly update runs in every
  micro-batch's backward, with the gradient of ``loss / A`` that DeepSpeed back-propagates — as the reference
  ``block_optim.py`` (hooks on every backward) and a single-process ``BlockOptimizer`` with accumulation do.
  SGD therefore moves an inactive weight by ``lr·s·Σ_i g_i / A`` per optimizer step (each ``g_i`` taken at the
  weight the previous micro-batch left), and SIGN by ``lr·s·Σ_i sign(g_i)`` (A sign steps).  The active block
  gets DeepSpeed's accumulated gradient and one optimizer step.  Block switches count optimizer steps.

* **Memory**: no ``.grad`` of an inactive parameter survives its backward, and no whole dW need exist: a Linear's
  dW is computed and reduced in chunks of ``S`` elements per rank (``BREAD_ZERO_CHUNK_BYTES``, default 32 MiB of
  fp32 send buffer: ``S = budget / (4·w) − 1``), so the update of one weight allocates at most
  ``4·(w·(S+1) + (S+1)) + (S + 2K)·itemsize`` bytes (send, receive, one GEMM block of dW rows; K = in features)
  beyond the collective backend's own buffers.  The embedding's row-sparse update all-gathers the batch's
  distinct rows (tokens × hidden × ranks), never a vocabulary-sized gradient.
* **Collectives** per backward: one reduce-scatter per chunk of each inactive Linear weight, one per bias and per
  inactive hook-path parameter (norms), in fp32; two all-gathers for an inactive embedding; one all-gather of the
  updated persistent parameters.  Never an all-reduce.
* **LoRA** (BREAD, peft ``lora.Linear`` layers): a patched LoRA layer computes its base layer and adapters in one
  fused function, so :func:`initialize` makes every LoRA layer a ZeRO-3 leaf module (its forward and backward
  gather base weight and adapters together; DeepSpeed reduces the adapters' gradients from the leaf's full backward
  hook).  The base weight's on-the-fly update runs in that backward like a plain Linear's.  Torch runs a full
  backward hook from the output side — before the module's backward has made the adapters' gradients — when no
  input of the module requires grad (the lowest layers with BAdam-style frozen norms), so a forward pre-hook gives
  such an input a detached copy that requires grad.  Adapters that stay active across a block switch keep their
  optimizer state (Adam's moments and step, as one process does): before the stage-3 optimizer is rebuilt their
  state slices are read from it, they get flat groups of their own (one per step count, since DeepSpeed keeps one
  state per flat group) and the slices are written into the new optimizer.  Dropout in the adapters draws its mask
  per rank, as any data-parallel run does.
* **Gradient clipping**: DeepSpeed clips the gradients it reduces (the active block's, and the adapters') to
  ``gradient_clipping``, whose default in 0.19 is **1.0**, not off; the on-the-fly updates are never clipped (as in
  the reference).  Set ``"gradient_clipping": 0`` to train like an unclipped single-process run.

Refused with a clear error (they would be silently wrong): ZeRO stages other than 3, hpZ secondary partitions
(``zero_hpz_partition_size`` > 1), quantized weights (``zero_quantized_weights`` /
``zero_quantized_nontrainable_weights``), parameter offload (``offload_param``: the frozen weights' shards would
live on the host or NVMe), and ZenFlow.

Usage::

    model = bread_kernels.patch(model)
    opt = ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), list(model.named_parameters()),
                             sgd_mode="all", ...)        # BlockOptimizer's arguments
    engine = initialize(model, opt, config=ds_config)     # deepspeed.initialize + the switching
    for batch in data:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..functions.linear import all_finite
from ..optim.block_optimizer import BlockOptimizer, is_adapter_name
from ..plan import OnTheFlyUpdate, Role, WeightPlan
from .sharded_update import (ShardLayout, all_gather_shards, allgather_rows_update_, dense_grad_fill,
                             linear_grad_fill, reduce_scatter_update_)

__all__ = ["SUPPORTED_VERSIONS", "check_version", "check_config", "internals_problems", "is_partitioned",
           "shard_layout", "partitioned_linear_update", "partitioned_embedding_update", "partitioned_dense_update",
           "ZeroBlockOptimizer", "ZeroBlockEngine", "initialize"]

#: DeepSpeed minor versions whose internals this module was written against and tested with
SUPPORTED_VERSIONS = ("0.19",)


class _Context:
    """What the update functions need from the running engine: the loss scale (fp16).  One per process: one
    ZeRO-3 engine trained by this integration at a time."""

    def __init__(self):
        self.loss_scale = lambda: 1.0


_context = _Context()


# -- versions and internals --------------------------------------------------------------------------------------
def check_version(version: str | None = None) -> bool:
    """True for a supported DeepSpeed version; otherwise warn (the internals below may have moved) and return False."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        return True
    warnings.warn(f"bread_kernels.integrations.deepspeed was written for DeepSpeed {', '.join(SUPPORTED_VERSIONS)}.x "
                  f"and this is {version}; it relies on ZeRO-3 internals (param.ds_tensor, the stage-3 optimizer's "
                  "rebuild) that may have changed. Run tests/integrations to check.", RuntimeWarning, stacklevel=2)
    return False


#: attributes of a ZeRO-3 parameter that this module reads
PARAM_ATTRIBUTES = ("ds_id", "ds_tensor", "ds_numel", "ds_shape", "ds_status", "ds_persist", "ds_process_group",
                    "ds_secondary_tensor", "ds_active_sub_modules")
#: private engine / optimizer members used at a block switch
ENGINE_MEMBERS = ("_configure_zero_optimizer", "_backward_post_hook", "is_gradient_accumulation_boundary",
                  "basic_optimizer", "optimizer", "module")
OPTIMIZER_MEMBERS = ("destroy", "register_grad_acc_post_hook", "loss_scale", "fp16_groups", "grad_position",
                     "fp32_partitioned_groups_flat", "get_param_id", "optimizer")
#: the Function classes DeepSpeed caches in a module's __dict__ (they close over the coordinator that made them)
CACHED_BACKWARD_FUNCTIONS = ("pre_bwd_fn", "post_bwd_fn")
MODULE_HOOK_NAMES = ("_pre_forward_module_hook", "_post_backward_module_hook", "_pre_backward_module_hook")


def internals_problems(engine=None, module: torch.nn.Module | None = None) -> list[str]:
    """Every internal this module relies on that is missing: the static ones, and with a live ``engine`` (after
    one forward and backward) those of its optimizer, parameters, and of ``module``'s hooks and cached
    Functions.  An empty list means the internals are as in 0.19."""
    problems = []
    try:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: F401
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    except ImportError as exc:
        return [f"import: {exc}"]
    for name in ("destroy", "register_grad_acc_post_hook"):
        if not hasattr(DeepSpeedZeroOptimizer_Stage3, name):
            problems.append(f"DeepSpeedZeroOptimizer_Stage3.{name} is gone")
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        if not hasattr(dist, name):
            problems.append(f"torch.distributed.{name} is gone")
    if not hasattr(torch.autograd.Variable._execution_engine, "queue_callback"):
        problems.append("torch's autograd engine has no queue_callback")
    if engine is None:
        return problems
    for name in ENGINE_MEMBERS:
        if not hasattr(engine, name):
            problems.append(f"engine.{name} is gone")
    for name in OPTIMIZER_MEMBERS:
        if not hasattr(engine.optimizer, name):
            problems.append(f"engine.optimizer.{name} is gone")
    for pname, p in engine.module.named_parameters():
        missing = [a for a in PARAM_ATTRIBUTES if not hasattr(p, a)]
        if missing:
            problems.append(f"parameter {pname} lacks {missing}")
            break
        try:
            layout = shard_layout(p)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            problems.append(f"parameter {pname}: {exc}")
            break
        if layout.shard_numel != -(-int(p.ds_numel) // layout.world):  # the flat layout of the module docstring
            problems.append(f"parameter {pname}: shard of {layout.shard_numel} elements, expected "
                            f"ceil({p.ds_numel}/{layout.world})")
            break
    if module is not None:
        names = {getattr(h, "__name__", "") for hooks in (module._forward_pre_hooks, module._forward_hooks)
                 for h in hooks.values()}
        for name in MODULE_HOOK_NAMES:
            if name not in names:
                problems.append(f"module hook {name} not found on {type(module).__name__} (found {sorted(names)})")
        for name in CACHED_BACKWARD_FUNCTIONS:
            if name not in module.__dict__:
                problems.append(f"{type(module).__name__}.__dict__ has no cached {name}")
    return problems


def _load_config(config) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, str):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"deepspeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def check_config(config) -> dict:
    """Raise ``ValueError`` for a DeepSpeed config the on-the-fly updates cannot serve; return it as a dict."""
    config = _load_config(config)
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage != 3:
        raise ValueError(f"bread_kernels ZeRO integration: zero_optimization.stage is {stage}; it serves stage 3 "
                         "(with stages 0-2 every rank holds the full weights: use BlockOptimizer directly)")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ValueError("bread_kernels ZeRO integration: zero_hpz_partition_size > 1 (ZeRO++ hpZ) is not supported: "
                         "gathers read a secondary partition that an on-the-fly update of the primary shard never "
                         "refreshes, so later forwards would use stale weights")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            raise ValueError(f"bread_kernels ZeRO integration: {key} is not supported: frozen weights are stored or "
                             "gathered quantized, so an exact in-place SGD update of their shards is not possible")
    offload = zero.get("offload_param") or {}
    if isinstance(offload, dict) and str(offload.get("device", "none")).lower() not in ("none", ""):
        raise ValueError(f"bread_kernels ZeRO integration: offload_param to {offload.get('device')!r} is not supported: "
                         "the frozen weights' shards would live on the host/NVMe, where the update does not run")
    if zero.get("zenflow"):
        raise ValueError("bread_kernels ZeRO integration: ZenFlow is not supported (it transposes param.data)")
    return config


# -- parameters -----------------------------------------------------------------------------------------------------
def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter."""
    return getattr(param, "ds_id", None) is not None and getattr(param, "ds_tensor", None) is not None


def shard_layout(param: torch.Tensor) -> ShardLayout:
    """The parameter's flat sharding over its own process group (its group rank, not the global rank)."""
    if getattr(param, "ds_secondary_tensor", None) is not None:
        raise RuntimeError(f"bread_kernels: parameter {getattr(param, 'ds_id', '?')} has an hpZ secondary partition; "
                           "zero_hpz_partition_size > 1 is not supported")
    shard = param.ds_tensor
    if hasattr(shard, "ds_quant_scale"):
        raise RuntimeError("bread_kernels: the parameter's shard is stored quantized; quantized ZeRO weights are not "
                           "supported")
    group = param.ds_process_group
    return ShardLayout(group=group, world=dist.get_world_size(group), rank=dist.get_rank(group),
                       numel=int(param.ds_numel), shard_numel=int(shard.numel()))


def _check_shard_device(param: torch.Tensor, device: torch.device) -> None:
    if param.ds_tensor.device != device:
        raise RuntimeError(f"bread_kernels: parameter {param.ds_id}'s shard is on {param.ds_tensor.device} but its "
                           f"gradient on {device}; parameter offload is not supported")


def _dense(param, fill, locally_finite: bool, update: OnTheFlyUpdate, sign: bool, device) -> bool:
    _check_shard_device(param, device)
    layout = shard_layout(param)
    draws = update.draws
    ok = reduce_scatter_update_(param.ds_tensor, layout, fill, step=update.step_size(), sign=sign,
                                rounding=update.rounding, seed=update.next_seed(),
                                divisor=layout.world * float(_context.loss_scale()), locally_finite=locally_finite)
    if not ok:
        update.draws = draws  # a skipped update draws no random stream, as on one process
        return False
    _mark_updated(param)
    return True


def partitioned_linear_update(plan: WeightPlan, role: Role, weight, bias, g: torch.Tensor, x: torch.Tensor) -> bool:
    """The SGD/SIGN update of a partitioned Linear weight (and bias) for g [M, N], x [M, K] (see the module
    docstring).  ``weight`` is the parameter [N, K], or a transposed view of a parameter stored [K, N] (GPT-2's
    ``Conv1D``), whose flat layout is then that of dWᵀ = xᵀg.  Returns False, on every rank alike, if any rank's
    g or x is not finite."""
    sign = role is Role.SIGN
    if is_partitioned(weight):
        fill = linear_grad_fill(g, x)
    elif weight._base is not None and is_partitioned(weight._base) and weight.shape == weight._base.shape[::-1] \
            and weight.stride() == (1, weight.shape[0]):
        weight, fill = weight._base, linear_grad_fill(x, g)
    else:
        raise RuntimeError(f"bread_kernels: {plan.name or 'a weight'} is a view of a ZeRO-3 parameter other than its "
                           "transpose; its shard layout is unknown")
    if not _dense(weight, fill, all_finite(g, x), plan.update, sign, g.device):
        plan.report_skip("its gradient is not finite on some rank")
        return False
    if bias is not None:
        _dense(bias, dense_grad_fill(g.sum(0, dtype=torch.float32)), True, plan.update, sign, g.device)
    return True


def partitioned_embedding_update(plan: WeightPlan, role: Role, weight, rows: torch.Tensor,
                                 summed: torch.Tensor) -> bool:
    """The row-sparse SGD/SIGN update of a partitioned embedding: ``rows`` [R] distinct ids, ``summed`` [R, H]."""
    _check_shard_device(weight, summed.device)
    layout = shard_layout(weight)
    update = plan.update
    draws = update.draws
    ok = allgather_rows_update_(weight.ds_tensor, layout, rows, summed, step=update.step_size(),
                                sign=role is Role.SIGN, rounding=update.rounding, seed=update.next_seed(),
                                divisor=layout.world * float(_context.loss_scale()))
    if not ok:
        update.draws = draws
        plan.report_skip("its gradient is not finite on some rank")
        return False
    _mark_updated(weight)
    return True


def partitioned_dense_update(param, grad: torch.Tensor, role: Role, update: OnTheFlyUpdate) -> bool:
    """The SGD/SIGN update of a partitioned parameter whose full local gradient exists (the hook path)."""
    return _dense(param, dense_grad_fill(grad), all_finite(grad), update, role is Role.SIGN, grad.device)


# -- persistent parameters: refresh the gathered copy at the end of the backward ------------------------------------
_updated_persistent: dict[int, torch.nn.Parameter] = {}
_refresh_queued = [False]


def _mark_updated(param) -> None:
    if not getattr(param, "ds_persist", False):
        return  # a non-persistent parameter is gathered afresh from its shard at its next use
    _updated_persistent[id(param)] = param
    if not _refresh_queued[0]:
        _refresh_queued[0] = True
        try:
            torch.autograd.Variable._execution_engine.queue_callback(refresh_persistent)
        except RuntimeError:  # not inside a backward
            refresh_persistent()


@torch.no_grad()
def refresh_persistent() -> None:
    """Copy the updated shards of persistent parameters into their gathered ``data`` (one all-gather per group and
    dtype).  Runs at the end of the backward that updated them: a refresh earlier in that backward could change a
    weight a later op of the same backward still needs (dX from the old weight)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(_updated_persistent.values())
    _updated_persistent.clear()
    _refresh_queued[0] = False
    groups: dict[tuple, list] = {}
    for p in params:
        groups.setdefault((id(p.ds_process_group), p.ds_tensor.dtype), []).append(p)
    for members in groups.values():
        layouts = [shard_layout(p) for p in members]
        fulls = all_gather_shards([p.ds_tensor for p in members], layouts, members[0].ds_process_group)
        for p, full in zip(members, fulls):
            if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel:
                p.data.copy_(full.view(p.ds_shape))


# -- the block optimizer and the engine ------------------------------------------------------------------------------
class ZeroBlockOptimizer(BlockOptimizer):
    """:class:`~bread_kernels.BlockOptimizer` (same arguments) for a model trained by DeepSpeed ZeRO-3.

    Differences: the hook path updates a partitioned parameter's shard through :func:`partitioned_dense_update`;
    DeepSpeed keeps the fp32 masters, so none are made here; and ``step()`` belongs to the engine returned by
    :func:`initialize` (the base optimizer is stepped by DeepSpeed).
    """

    _ds_engine = None

    def _make_hook(self, name: str):
        plain = super()._make_hook(name)

        def hook(p: torch.Tensor) -> None:
            if not is_partitioned(p):
                return plain(p)
            role = self._hook_roles.get(id(p))
            if role is None or p.grad is None:
                return
            grad, p.grad = p.grad, None
            if not partitioned_dense_update(p, grad, role, self.update):
                self._collect_skip(name, "its gradient is not finite on some rank")

        return hook

    def _activate(self, block_index: int) -> None:
        kept = self._kept_adapter_state(block_index) if self._ds_engine is not None else {}
        super()._activate(block_index)
        if self.masters:
            # DeepSpeed keeps the fp32 masters of the low-precision active block: hand it the parameters themselves
            swap = {id(master): low for low, master, _ in self.masters}
            for group in self.base_optimizer.param_groups:
                group["params"] = [swap.get(id(p), p) for p in group["params"]]
            self.masters = []
        if kept:
            # DeepSpeed keeps one optimizer state (one ``step``) per flat group: the adapters that keep their state
            # get groups of their own, one per step count, next to the fresh parameters' groups
            groups = []
            for group in self.base_optimizer.param_groups:
                fresh = [p for p in group["params"] if id(p) not in kept]
                by_step: dict = {}
                for p in group["params"]:
                    if id(p) in kept:
                        by_step.setdefault(_step_of(kept[id(p)]), []).append(p)
                parts = ([fresh] if fresh else []) + list(by_step.values())
                groups += [{**group, "params": params} for params in parts]
            self.base_optimizer.param_groups = groups
        self._kept_state = kept

    def _kept_adapter_state(self, block_index: int) -> dict:
        """This rank's optimizer state of the adapters that stay active across the switch to ``block_index``, read
        from DeepSpeed's stage-3 optimizer before it is rebuilt: ``{id(param): {key: value}}``, the element-wise
        states (Adam's moments) as this rank's slice, scalars (``step``) as they are."""
        zopt = self._ds_engine.optimizer
        roles = self._roles_for(block_index)
        kept = {}
        for name, p in self.named_parameters_list:
            if not (is_adapter_name(name) and name in self._active_names and roles[name] is Role.ACTIVE):
                continue
            position = zopt.grad_position.get(zopt.get_param_id(p))
            if position is None:
                continue
            if getattr(zopt, "swap_optimizer", False):
                raise NotImplementedError("bread_kernels: LoRA adapters keep their optimizer state across a block "
                                          "switch, which is not implemented with the optimizer state offloaded to "
                                          "NVMe (offload_optimizer.device = 'nvme')")
            index, offset, numel = position
            flat = zopt.fp32_partitioned_groups_flat[index]
            state = zopt.optimizer.state.get(flat)
            if not state:
                continue  # never stepped
            kept[id(p)] = {key: value.narrow(0, offset, numel).clone() if _elementwise(value, flat) else
                           value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
        return kept

    def state_dict(self) -> dict:
        self._refuse_checkpoint("state_dict")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._refuse_checkpoint("load_state_dict")
        super().load_state_dict(state_dict)

    def _refuse_checkpoint(self, what: str) -> None:
        if self._ds_engine is not None:
            raise NotImplementedError(f"ZeroBlockOptimizer.{what}: resuming under ZeRO-3 is not implemented (the "
                                      "active block's optimizer state lives in DeepSpeed's partitioned optimizer, "
                                      "rebuilt at every switch); engine.save_checkpoint saves the weights")

    def step(self, closure=None):
        if self._ds_engine is not None:
            raise RuntimeError("ZeroBlockOptimizer: under DeepSpeed call step() on the engine that "
                               "bread_kernels.integrations.deepspeed.initialize returned (it steps DeepSpeed and "
                               "switches blocks); the optimizer is not stepped directly")
        return super().step(closure)


class ZeroBlockEngine:
    """A DeepSpeed engine plus the block optimizer's schedule: ``engine(...)``, ``backward(loss)``, ``step()``.

    Everything else is forwarded to the DeepSpeed engine (``engine.module``, ``engine.save_checkpoint``, ...).
    """

    def __init__(self, ds_engine, optimizer: ZeroBlockOptimizer):
        self.engine = ds_engine
        self.block_optimizer = optimizer
        self.switches = 0
        optimizer._ds_engine = ds_engine
        _context.loss_scale = lambda: float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["engine"], name)

    def backward(self, loss: torch.Tensor, **kwargs: Any):
        return self.engine.backward(loss, **kwargs)

    def step(self) -> None:
        """``engine.step()``; at a gradient-accumulation boundary also the block optimizer's bookkeeping (lr with
        its after-switch warm-up, skipped-update report, step counters) and, when due, the block switch."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        opt = self.block_optimizer
        lr = opt.block_lr()
        for group in opt.base_optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if opt.after_base_step():
            self._rebuild_zero_optimizer()

    def _rebuild_zero_optimizer(self) -> None:
        """A fresh stage-3 optimizer for the block the block optimizer just activated (its base optimizer's
        groups): the old one's hooks removed, DeepSpeed's cached backward Functions dropped so the new coordinator
        makes its own, and the engine's post-backward hook registered again as ``deepspeed.initialize`` does."""
        engine, base = self.engine, self.block_optimizer.base_optimizer
        engine.optimizer.destroy()
        for module in engine.module.modules():
            for name in CACHED_BACKWARD_FUNCTIONS:
                module.__dict__.pop(name, None)
        base.param_groups[:] = [g for g in base.param_groups if g["params"]]
        engine.basic_optimizer = base
        engine.optimizer = engine._configure_zero_optimizer(base)
        _restore_kept_state(engine.optimizer, getattr(self.block_optimizer, "_kept_state", {}))
        if getattr(engine, "_support_torch_style_backward", False):
            engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)
        self.switches += 1

    def destroy(self) -> None:
        _context.loss_scale = lambda: 1.0
        self.block_optimizer._ds_engine = None
        self.engine.destroy()


def _elementwise(value, flat: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() == flat.numel()


def _step_of(state: dict):
    step = state.get("step")
    return float(step) if step is not None else None


@torch.no_grad()
def _restore_kept_state(zopt, kept: dict) -> None:
    """Write the kept adapters' optimizer state (see ``ZeroBlockOptimizer._kept_adapter_state``) into the freshly
    built stage-3 optimizer, whose flat groups keep them apart from fresh parameters."""
    if not kept:
        return
    for group in zopt.fp16_groups:
        for p in group:
            entry = kept.get(id(p))
            if entry is None:
                continue
            index, offset, numel = zopt.grad_position[zopt.get_param_id(p)]
            flat = zopt.fp32_partitioned_groups_flat[index]
            state = zopt.optimizer.state[flat]
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == 1:
                    if key not in state:
                        state[key] = torch.zeros_like(flat)
                    state[key].narrow(0, offset, numel).copy_(value)
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else value


def _mark_lora_leaves(model: torch.nn.Module) -> list:
    """Make every peft LoRA layer a ZeRO-3 leaf module.  A patched LoRA layer computes its base layer and adapters
    in one fused function, so their own forwards (where ZeRO-3's hooks would gather their parameters) never run;
    as a leaf, the LoRA layer's forward gathers all of them."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    leaves = set_z3_leaf_modules(model, [LoraLinear], raise_if_not_found=False)
    for module in leaves:
        if "_bread_input_hook" not in module.__dict__:  # registered before DeepSpeed's own hooks, so it runs first
            module._bread_input_hook = module.register_forward_pre_hook(_input_requires_grad)
    return leaves


def _input_requires_grad(module: torch.nn.Module, args: tuple):
    """Forward pre-hook of a LoRA leaf module: an input that does not require grad is replaced by a detached copy
    that does.  DeepSpeed reduces a leaf module's gradients from a full backward hook, which torch runs once the
    module's input gradients exist — or, when no input requires grad, from the output side, *before* the module's
    backward has produced the adapters' gradients (they would be reduced as zeros and left in ``.grad``)."""
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor) or args[0].requires_grad:
        return None
    if not any(p.requires_grad for p in module.parameters()):
        return None
    return (args[0].detach().requires_grad_(True),) + tuple(args[1:])


def initialize(model: torch.nn.Module, optimizer: ZeroBlockOptimizer, config, **kwargs: Any) -> ZeroBlockEngine:
    """``deepspeed.initialize`` for a patched model trained by a :class:`ZeroBlockOptimizer`.

    ``config`` is the DeepSpeed config (dict or JSON path), checked by :func:`check_config`;
    ``zero_allow_untested_optimizer`` is set (the base optimizer is whatever the user chose).  Extra keyword
    arguments go to ``deepspeed.initialize``.  Returns the :class:`ZeroBlockEngine` to train with.
    """
    import deepspeed

    if not isinstance(optimizer, ZeroBlockOptimizer):
        raise TypeError(f"initialize: optimizer must be a bread_kernels.integrations.deepspeed.ZeroBlockOptimizer "
                        f"(BlockOptimizer's arguments), got {type(optimizer).__name__}")
    if "model_parameters" in kwargs or "lr_scheduler" in kwargs:
        raise ValueError("initialize: the block optimizer chooses the trained parameters; schedule the lr with a "
                         "torch scheduler on the ZeroBlockOptimizer instead of DeepSpeed's lr_scheduler")
    check_version()
    config = dict(check_config(config))
    config.setdefault("zero_allow_untested_optimizer", True)
    problems = internals_problems()
    if problems:
        raise RuntimeError(f"bread_kernels: this DeepSpeed lacks internals the integration needs: {problems}")
    base = optimizer.base_optimizer
    base.param_groups[:] = [g for g in base.param_groups if g["params"]]
    _mark_lora_leaves(model)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=config, **kwargs)
    return ZeroBlockEngine(ds_engine, optimizer)
