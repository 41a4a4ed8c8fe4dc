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
