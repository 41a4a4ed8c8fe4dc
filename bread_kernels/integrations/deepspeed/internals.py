"""The DeepSpeed internals this integration relies on (0.19.x): the version gate, the attributes of a ZeRO-3
parameter it reads, and :func:`internals_problems`, the canary that lists what moved.  Every ``ds_*`` attribute
read by the integration goes through a function of this module or is listed in :data:`PARAM_ATTRIBUTES`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings

import torch
import torch.distributed as dist

from ..sharded_update import ShardLayout

__all__ = ["SUPPORTED_VERSIONS", "PARAM_ATTRIBUTES", "ENGINE_MEMBERS", "OPTIMIZER_MEMBERS",
           "CACHED_BACKWARD_FUNCTIONS", "MODULE_HOOK_NAMES", "check_version", "internals_problems", "is_partitioned",
           "shard_layout", "check_shard_device", "is_persistent", "forward_module_stack", "module_stack_restored",
           "forget_modules", "clear_release_cache", "default_checkpoint_tag", "latest_checkpoint_tag",
           "checkpointed_as_frozen", "engine_of_module", "remove_module_hooks", "whole_shape",
           "any_partitioned", "micro_batches_of_the_coming_step", "inside_engine_forward", "gathered_state_dict"]

#: DeepSpeed minor versions whose internals this module was written against and tested with
SUPPORTED_VERSIONS = ("0.19",)


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
                  "basic_optimizer", "optimizer", "module", "config", "global_steps", "global_rank", "local_rank",
                  "use_node_local_storage", "load_universal_checkpoint", "micro_steps", "gradient_accumulation_steps",
                  "module_forward_pre_hook", "module_forward_post_hook", "_is_gradient_accumulation_boundary")
OPTIMIZER_MEMBERS = ("destroy", "register_grad_acc_post_hook", "loss_scale", "loss_scaler", "overflow",
                     "fp16_groups", "grad_position", "fp32_partitioned_groups_flat", "get_param_id", "optimizer",
                     "custom_loss_scaler", "external_loss_scale", "override_loss_scale")
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
    try:  # config.check_config reads the ZeRO section as DeepSpeed does
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        fields = getattr(DeepSpeedZeroConfig, "model_fields", {})
        for name in ("offload_param", "cpu_offload_param", "zenflow"):  # the deprecated spelling maps to the first
            if name not in fields:
                problems.append(f"DeepSpeedZeroConfig has no {name} field")
    except ImportError as exc:
        problems.append(f"DeepSpeedZeroConfig: {exc}")
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        if not hasattr(dist, name):
            problems.append(f"torch.distributed.{name} is gone")
    if not isinstance(getattr(_parameter_offload(), "FWD_MODULE_STACK", None), list):
        problems.append("deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK is gone or not a list")
    if _release_cache() is None:
        problems.append("PartitionedParameterCoordinator.__params_to_release is no longer an lru_cache")
    try:  # checkpointed_as_frozen: DeepSpeed tells the parameters its optimizer owns by requires_grad
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.utils import is_optimized_parameter

        if "requires_grad" not in inspect.getsource(is_optimized_parameter):
            problems.append("deepspeed.runtime.utils.is_optimized_parameter no longer reads requires_grad")
        for name in ("_get_zero_frozen_param_attributes", "load_universal_checkpoint",
                     "_create_module_forward_pre_hook", "_zero3_consolidated_16bit_state_dict"):
            if not hasattr(DeepSpeedEngine, name):
                problems.append(f"DeepSpeedEngine.{name} is gone")
        forward = _engine_forward()
        if forward.__qualname__ != "DeepSpeedEngine.forward" or "_backward_prologue" not in inspect.getsource(forward):
            problems.append("DeepSpeedEngine.forward no longer hooks the backward prologue on its outputs "
                            "(inside_engine_forward)")
        hook_maker = getattr(DeepSpeedEngine, "_create_module_forward_pre_hook", None)
        if hook_maker is not None and "register_forward_pre_hook" not in inspect.getsource(hook_maker):
            problems.append("DeepSpeedEngine no longer registers a forward pre-hook on its module (engine_of_module)")
    except ImportError as exc:
        problems.append(f"checkpoints: {exc}")
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


def engine_of_module(module: torch.nn.Module):
    """The DeepSpeed engine that wraps ``module`` (None where none does), for a caller handed only the model while
    another library made the engine (the Hugging Face Trainer's callbacks, through accelerate).  DeepSpeed 0.19's
    engine registers a forward pre-hook on its module that closes over the engine
    (``DeepSpeedEngine._create_module_forward_pre_hook``); where several engines wrapped it in turn, the last one."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    found = None
    for hook in list(module._forward_pre_hooks.values()):
        for cell in getattr(hook, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, DeepSpeedEngine) and value.module is module:
                found = value
    return found


def remove_module_hooks(engine) -> None:
    """Remove the forward pre- and post-hooks DeepSpeed 0.19's engine registers on its module, which its
    ``destroy`` leaves: they close over the engine (its stage-3 optimizer, fp32 partitions, the block optimizer
    it was handed), so a model kept after the engine would keep all of it alive, and run them at every forward."""
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter."""
    return getattr(param, "ds_id", None) is not None and getattr(param, "ds_tensor", None) is not None


def any_partitioned(params) -> bool:
    """Whether any of ``params`` is ZeRO-3 partitioned (a model DeepSpeed built or wrapped)."""
    return any(is_partitioned(p) for p in params)


def whole_shape(param: torch.Tensor) -> tuple[int, ...] | None:
    """A ZeRO-3 partitioned parameter's whole shape (its tensor is empty until gathered), None for any other
    parameter: registered with :func:`bread_kernels.patch.register_whole_shape` when this package loads."""
    return tuple(param.ds_shape) if is_partitioned(param) else None


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


def check_shard_device(param: torch.Tensor, device: torch.device) -> None:
    if param.ds_tensor.device != device:
        raise RuntimeError(f"bread_kernels: parameter {param.ds_id}'s shard is on {param.ds_tensor.device} but its "
                           f"gradient on {device}; parameter offload is not supported")




def is_persistent(param: torch.Tensor) -> bool:
    """A ZeRO-3 persistent parameter (small; stays gathered between steps)."""
    return bool(getattr(param, "ds_persist", False))


def _parameter_offload():
    from deepspeed.runtime.zero import parameter_offload

    return parameter_offload


def forward_module_stack() -> list:
    """ZeRO-3's global stack of the modules in their forward (``parameter_offload.FWD_MODULE_STACK``): each module's
    pre-forward hook pushes it and its post-forward hook pops it; building a stage-3 optimizer pushes the root module
    and nothing pops it."""
    return _parameter_offload().FWD_MODULE_STACK


@contextlib.contextmanager
def module_stack_restored():
    """The module stack as deep on leaving as on entering: around a recompute, whose early stop unwinds the block's
    forward from inside its last Linear past the post-forward hooks of that Linear and of the module around it (two
    entries per recomputed block that would stay for good, keeping their modules alive after ``destroy``)."""
    stack = forward_module_stack()
    depth = len(stack)
    try:
        yield
    finally:
        del stack[depth:]


def forget_modules(root: torch.nn.Module, keep: int = 0) -> None:
    """Drop the stack's entries of ``root``'s modules beyond the first ``keep``: the root that each rebuilt stage-3
    optimizer pushes once more (``keep=1``), or all of them when the engine is destroyed (``keep=0``)."""
    ours = {id(m) for m in root.modules()}
    stack = forward_module_stack()
    kept, remaining = 0, []
    for module in stack:
        if id(module) in ours:
            if kept >= keep:
                continue
            kept += 1
        remaining.append(module)
    stack[:] = remaining


def _release_cache():
    """The process-wide ``functools.lru_cache`` behind ``PartitionedParameterCoordinator.__params_to_release``
    (under DeepSpeed's NVTX wrapper), keyed by (coordinator, module, step); None where that moved."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    if method is not None and not hasattr(method, "cache_clear"):
        method = inspect.getclosurevars(method).nonlocals.get("func")
    return method if hasattr(method, "cache_clear") else None


def clear_release_cache() -> None:
    """Empty that cache, which nothing in DeepSpeed clears: it keeps every coordinator it has seen, with the modules
    of its model.  A rebuilt stage-3 optimizer (every block switch) brings a new coordinator, so without this the
    old ones pile up for the whole run and a destroyed engine's model is never freed.  Other engines in the process
    only recompute their entries."""
    _release_cache().cache_clear()


def default_checkpoint_tag(engine) -> str:
    """The tag DeepSpeed 0.19's ``save_checkpoint`` gives a checkpoint saved without one (its docstring: "global
    step is used"), so that a file saved beside it lands in the same folder."""
    return f"global_step{engine.global_steps}"


def micro_batches_of_the_coming_step(engine) -> int | None:
    """How many micro-batches of the optimizer step to come have run their backward in DeepSpeed 0.19: 0 at a step
    boundary, None for some (how many is not known).  Where DeepSpeed tells the boundary itself (the caller calls
    ``step()`` after every micro-batch) ``micro_steps`` counts micro-batches.  Where the caller sets it
    (``set_gradient_accumulation_boundary`` before each backward and ``step()`` at the boundary only, as accelerate
    does under the Hugging Face Trainer) ``micro_steps`` counts optimizer steps, and the flag says whether the last
    backward was a step's last (the backward of a step's last micro-batch before its ``step()`` reads as 0: the
    Trainer saves after the step).  ``managed_gradient_accumulation: false`` is refused (:mod:`.config`)."""
    boundary = engine._is_gradient_accumulation_boundary
    if boundary is not None:
        return 0 if boundary else None
    return engine.micro_steps % engine.gradient_accumulation_steps()


def _engine_forward():
    """``DeepSpeedEngine.forward`` itself, from under its ``instrument_w_nvtx`` wrapper (which holds it in a closure,
    without ``functools.wraps``)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    forward = DeepSpeedEngine.forward
    for cell in forward.__closure__ or ():
        contents = cell.cell_contents
        if getattr(contents, "__qualname__", "") == "DeepSpeedEngine.forward":
            return inspect.unwrap(contents)
    return inspect.unwrap(forward)


def _engine_forward_code():
    return _engine_forward().__code__


def inside_engine_forward() -> bool:
    """Whether the caller runs inside a DeepSpeed engine's ``forward`` (``engine(...)``), which hooks on its outputs
    the backward prologue that tells DeepSpeed 0.19's stage-3 optimizer where a gradient-accumulation step begins
    and ends; a forward called on ``engine.module`` or below it (``engine.module.model(...)``) gets none.  Walks the
    caller's frames: once per forward, a few microseconds."""
    code = _engine_forward_code()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def gathered_state_dict(engine) -> dict | None:
    """The whole model's state dict in its 16-bit dtype (fp32 where it trains in fp32), gathered onto global rank 0
    (None elsewhere) as the Hugging Face Trainer's ``save_model`` gathers it: DeepSpeed 0.19's
    ``_zero3_consolidated_16bit_state_dict``, every parameter included.  Every rank calls it."""
    return type(engine)._zero3_consolidated_16bit_state_dict(engine, exclude_frozen_parameters=False)


def latest_checkpoint_tag(engine, load_dir) -> str | None:
    """The tag DeepSpeed 0.19's ``load_checkpoint`` loads when given none: the ``latest`` file's (``latest_universal``
    for a universal checkpoint), or None where there is none (DeepSpeed then warns and loads nothing)."""
    path = os.path.join(load_dir, "latest_universal" if engine.load_universal_checkpoint() else "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


@contextlib.contextmanager
def checkpointed_as_frozen(params):
    """Inside this context ``params`` do not require grad, so that DeepSpeed 0.19 checkpoints them.

    DeepSpeed saves the parameters its optimizer does not own as "frozen" fragments (each rank its shard) and loads
    them back by name, telling them by ``requires_grad`` (``deepspeed.runtime.utils.is_optimized_parameter``).  A
    parameter that a hook updates on the fly (a norm under BREAD-SGD) requires grad without being in its optimizer,
    so its checkpoint would hold it neither way.  ``requires_grad`` comes back as it was, whatever happens inside."""
    changed = [p for p in params if p.requires_grad]
    try:
        for p in changed:
            p.requires_grad_(False)
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)
