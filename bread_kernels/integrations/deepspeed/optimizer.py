"""The block optimizer under ZeRO-3: :class:`ZeroBlockOptimizer`, and the adapters' optimizer state that it
carries across the rebuild of DeepSpeed's stage-3 optimizer at a block switch."""

from __future__ import annotations

import weakref

import torch

from ...optim.block_optimizer import BlockOptimizer
from ...peft_lora import is_adapter_name
from ...plan import Role
from .internals import engine_of_module
from .shards import ZeroShards

__all__ = ["ZeroBlockOptimizer"]


class ZeroBlockOptimizer(BlockOptimizer):
    """:class:`~bread_kernels.BlockOptimizer` (same arguments) for a model trained by DeepSpeed ZeRO-3.

    Differences: every plan it writes carries a :class:`~.shards.ZeroShards` target, so the on-the-fly updates
    (fused or through the hook path) write this rank's shard of a partitioned parameter; DeepSpeed keeps the fp32
    masters, so none are made here; and ``step()`` belongs to the engine returned by :func:`initialize` (the base
    optimizer is stepped by DeepSpeed).
    """

    makes_fp32_masters = False  # DeepSpeed keeps the fp32 masters of the low-precision active block

    def __init__(self, *args, **kwargs):
        if kwargs.get("loss_scaler") is not None:
            raise ValueError("ZeroBlockOptimizer: leave loss_scaler out; under ZeRO-3 the on-the-fly updates undo "
                             "DeepSpeed's own loss scale (the shards divide it out)")
        self._ds_engine = None
        self.update_target = ZeroShards()
        super().__init__(*args, **kwargs)
        # the groups as given: DeepSpeed empties them when it is handed this optimizer itself (the HF Trainer)
        self._given_groups = [(group, list(group["params"])) for group in self.param_groups]
        self._load_guard = None
        if self.model is not None:
            self._load_guard = self.model.register_load_state_dict_pre_hook(_UnconnectedLoadGuard(self))
            weakref.finalize(self, self._load_guard.remove)

    def close(self) -> None:
        if self._load_guard is not None:
            self._load_guard.remove()
            self._load_guard = None
        super().close()

    def handed_to_deepspeed(self) -> bool:
        """Whether a DeepSpeed engine around the model holds this optimizer as its own (``deepspeed.initialize``
        was handed it, as the Hugging Face Trainer does) while it is not connected to that engine yet."""
        if self._ds_engine is not None or self.model is None:
            return False
        ds_engine = engine_of_module(self.model)
        return ds_engine is not None and ds_engine.basic_optimizer is self

    def restore_given_groups(self) -> None:
        """Give this optimizer's groups back the parameters DeepSpeed took from them when it was handed this
        optimizer as its own (``deepspeed.initialize(optimizer=...)``, as the Hugging Face Trainer does through
        accelerate): its stage-3 optimizer replaces each group's parameters by its flat partition.  A group that
        DeepSpeed dropped for having none stays dropped (a scheduler built since counts the groups left)."""
        for group, params in self._given_groups:
            group["params"] = list(params)

    def _roles(self, block_index: int, block: list[str]) -> dict[str, Role]:
        """BlockOptimizer's roles, refusing (before the model is touched: the constructor checks every block) an
        on-the-fly update of a fused MoE expert weight, which the sharded update does not implement."""
        roles = super()._roles(block_index, block)
        if self.engine is not None:
            on_the_fly = [name for name, _ in self.engine.expert_weights()
                          if name in roles and roles[name].updates_on_the_fly]
            if on_the_fly:
                raise NotImplementedError(
                    f"ZeroBlockOptimizer: block {block_index} gives the MoE expert weights {on_the_fly[:2]}"
                    f"{' ...' if len(on_the_fly) > 2 else ''} an on-the-fly {roles[on_the_fly[0]].name} update, "
                    "which is not implemented under ZeRO-3: the fused experts update one expert's slice W[e] of a "
                    "3-D parameter at a time, while ZeroShards reduce-scatters and writes whole parameters (a ZeRO-3 "
                    "shard is a flat range of the [E, N, K] tensor that cuts across experts). Use "
                    "sgd_mode='disabled' (BAdam: expert weights trained by the active block or frozen) or train the "
                    "MoE model without ZeRO-3"
                )
        return roles

    def _activate(self, block_index: int) -> None:
        kept = self._kept_adapter_state(block_index) if self._ds_engine is not None else {}
        super()._activate(block_index)
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
        self._record_group_layout()

    def _kept_adapter_state(self, block_index: int) -> dict:
        """This rank's optimizer state of the adapters that stay active across the switch to ``block_index``, read
        from DeepSpeed's stage-3 optimizer before it is rebuilt: ``{id(param): {key: value}}``, the element-wise
        states (Adam's moments) as this rank's slice, scalars (``step``) as they are."""
        zopt = self._ds_engine.optimizer
        roles = self.roles_for(block_index)
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

    def _record_group_layout(self) -> None:
        """Keep the names of the base optimizer's parameters group by group (``group_layout``), before DeepSpeed
        replaces each group's parameters by its flat partition: a checkpoint of DeepSpeed's optimizer state fits
        only an optimizer built with the same groups, which the kept adapters split by step count
        (:meth:`_activate`)."""
        names = {id(p): n for n, p in self.named_parameters_list}
        self.group_layout = [[names[id(p)] for p in group["params"]] for group in self.base_optimizer.param_groups]

    def activate_as_saved(self, block_index: int, layout: list[list[str]]) -> None:
        """Activate ``block_index`` with the base optimizer's groups of ``layout`` (the saved run's
        ``group_layout``), each group's settings from the group its parameters fall in now, and no adapter state kept
        (the checkpoint holds it).  Raises ``ValueError`` when ``layout`` does not hold exactly the parameters this
        block trains; the caller then activates the previous block again."""
        BlockOptimizer._activate(self, block_index)
        self._kept_state = {}
        by_name = dict(self.named_parameters_list)
        owner = {id(p): group for group in self.base_optimizer.param_groups for p in group["params"]}
        wanted = [name for names in layout for name in names]
        unknown = [n for n in wanted if n not in by_name or id(by_name[n]) not in owner]
        if unknown or len(set(wanted)) != len(wanted) or len(wanted) != len(owner):
            trained = sorted(n for n, p in self.named_parameters_list if id(p) in owner)
            raise ValueError(f"the saved optimizer groups hold {len(wanted)} parameters ({(unknown or wanted)[:2]}, "
                             f"...), not the {len(trained)} that block {block_index} trains here ({trained[:2]}, ...)")
        self.base_optimizer.param_groups = [{**owner[id(by_name[names[0]])], "params": [by_name[n] for n in names]}
                                            for names in layout if names]
        self._record_group_layout()

    def state_dict(self) -> dict:
        self._refuse_checkpoint("state_dict")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._refuse_checkpoint("load_state_dict")
        if isinstance(state_dict, dict) and {"state", "param_groups"} <= state_dict.keys() and \
                self.handed_to_deepspeed():
            raise NotImplementedError(f"ZeroBlockOptimizer.load_state_dict: DeepSpeed is loading its optimizer state "
                                      f"into the ZeroBlockOptimizer it was handed{UNCONNECTED_LOAD}")
        super().load_state_dict(state_dict)

    def _refuse_checkpoint(self, what: str) -> None:
        if self._ds_engine is not None:
            raise NotImplementedError(f"ZeroBlockOptimizer.{what}: under ZeRO-3 the active block's optimizer state "
                                      "lives in DeepSpeed's partitioned optimizer, rebuilt at every switch; save and "
                                      "resume with engine.save_checkpoint(dir) and engine.load_checkpoint(dir), "
                                      "which keep the block schedule beside DeepSpeed's checkpoint")

    def step(self, closure=None):
        if self._ds_engine is not None:
            raise RuntimeError("ZeroBlockOptimizer: under DeepSpeed call step() on the engine that "
                               "bread_kernels.integrations.deepspeed.initialize returned (it steps DeepSpeed and "
                               "switches blocks); the optimizer is not stepped directly")
        return super().step(closure)


#: why a DeepSpeed load before the engine is connected is refused, and what to do instead
UNCONNECTED_LOAD = (
    ", before BreadCallback connected it to the DeepSpeed engine: the Hugging Face Trainer's resume_from_checkpoint "
    "under ZeRO-3 loads before any callback runs, with the block that this run starts at and without the block "
    "schedule or the weights a hook updates, which would not resume the saved run. Put bread_kernels.integrations."
    "transformers.BreadTrainerMixin first in your Trainer's bases (class BlockTrainer(BreadTrainerMixin, Trainer)): "
    "it connects the engine before the Trainer loads, and the load resumes exactly. The checkpoint folders also "
    "resume in a loop: engine = bread_kernels.integrations.deepspeed.initialize(model, ZeroBlockOptimizer(...), "
    "config), then engine.load_checkpoint('<output_dir>/checkpoint-<step>')")


class _UnconnectedLoadGuard:
    """A ``load_state_dict`` pre-hook on the model: refuses a load while a DeepSpeed engine holds the block optimizer
    as its own but is not connected to it (:meth:`ZeroBlockOptimizer.handed_to_deepspeed`: DeepSpeed's own
    ``load_checkpoint`` starts with the module's ``load_state_dict``), before anything is loaded.  Any other load
    (a model built under ``deepspeed.zero.Init`` and loaded before :func:`initialize`) goes on.  Holds the optimizer
    weakly."""

    def __init__(self, optimizer: ZeroBlockOptimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self, module, *args) -> None:
        opt = self.optimizer()
        if opt is not None and not opt.closed and opt.handed_to_deepspeed():
            raise NotImplementedError(f"bread_kernels: a load into the model while DeepSpeed holds its "
                                      f"ZeroBlockOptimizer{UNCONNECTED_LOAD}")


def _elementwise(value, flat: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() == flat.numel()


def _step_of(state: dict):
    step = state.get("step")
    return float(step) if step is not None else None
