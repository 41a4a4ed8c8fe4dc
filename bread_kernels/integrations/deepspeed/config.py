"""The DeepSpeed configs the on-the-fly updates cannot serve, refused with the reason."""

from __future__ import annotations

import json

__all__ = ["check_config"]


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
        raise ValueError(f"bread_kernels ZeRO integration: zero_optimization.stage is {stage}; it serves stage 3. "
                         "Stages 1-2 replace the optimizer's parameters with flat partitions a block optimizer cannot "
                         "switch, and none of stages 0-2 averages on-the-fly updates: without sharding, train with "
                         "BlockOptimizer under DistributedDataParallel (BAdam; README, DistributedDataParallel)")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ValueError("bread_kernels ZeRO integration: zero_hpz_partition_size > 1 (ZeRO++ hpZ) is not supported: "
                         "gathers read a secondary partition that an on-the-fly update of the primary shard never "
                         "refreshes, so later forwards would use stale weights")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            raise ValueError(f"bread_kernels ZeRO integration: {key} is not supported: frozen weights are stored or "
                             "gathered quantized, so an exact in-place SGD update of their shards is not possible")
    effective = _as_deepspeed_reads_it(zero)  # its deprecated spellings (cpu_offload_param) and defaults included
    offload = effective.offload_param
    device = None if offload is None else str(getattr(offload.device, "value", offload.device)).lower()
    if device not in (None, "none"):
        raise ValueError(f"bread_kernels ZeRO integration: parameter offload to {device!r} (offload_param, or the "
                         "deprecated cpu_offload_param) is not supported: the frozen weights' shards would live on the "
                         "host/NVMe, where the update does not run")
    if effective.zenflow is not None:  # "zenflow": {} turns it on with its defaults
        raise ValueError("bread_kernels ZeRO integration: ZenFlow is not supported (it transposes param.data)")
    autocast = config.get("torch_autocast") or {}
    if autocast.get("enabled") and str(autocast.get("dtype", "")).lower() in ("float16", "fp16", "half",
                                                                               "torch.float16"):
        raise ValueError("bread_kernels ZeRO integration: torch_autocast with float16 is not supported: its "
                         "GradScaler scales the loss outside DeepSpeed's loss scaler, which the on-the-fly updates "
                         "divide out, so they would step by the scale (65536x). Use \"fp16\": {\"enabled\": true} "
                         "(DeepSpeed's fp16 mode) or bfloat16")
    if (config.get("compile") or {}).get("deepcompile"):
        raise ValueError("bread_kernels ZeRO integration: DeepCompile (compile.deepcompile) is not supported: it "
                         "replaces ZeRO-3's module hooks, which this integration finds the engine by and rebuilds at "
                         "every block switch, with passes over a compiled graph that the on-the-fly updates of the "
                         "shards inside the backward are not part of; leave it off")
    if config.get("managed_gradient_accumulation", True) is False:
        raise ValueError("bread_kernels ZeRO integration: managed_gradient_accumulation: false is not supported: "
                         "DeepSpeed then tells a step boundary only inside step(), so the block schedule (its lr, its "
                         "step count, the switch) would never run; leave it out (the default, true)")
    if config.get("scheduler") is not None:
        raise ValueError("bread_kernels ZeRO integration: a DeepSpeed 'scheduler' in the config would never act (the "
                         "block optimizer sets the active block's lr at every step); take it out and schedule the lr "
                         "with a torch scheduler on the ZeroBlockOptimizer (under the Hugging Face Trainer: its "
                         "lr_scheduler_type)")
    return config


def _as_deepspeed_reads_it(zero: dict):
    """The ``zero_optimization`` section as DeepSpeed parses it (``DeepSpeedZeroConfig``)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**zero)
