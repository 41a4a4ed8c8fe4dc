"""pytest-benchmark suite of one peft LoRA layer's backward (frozen base weight): peft's autograd against the fused
LoRA function.  Run: ``python -m pytest bench/test_lora_bench.py --benchmark-json bench/results/<name>.json``.
Shape: 5632×2048, r 8, 2048 tokens (``BENCH_SMALL=1``: 1024×512, 512 tokens).  ``python -m bread_kernels.bench
lora`` runs the same cases and prints memory."""

import os

import pytest
import torch

from bread_kernels import Role, WeightPlan
from bread_kernels.bench.lora import _layer
from bread_kernels.functions.lora import fused_lora_linear

SHAPE = (1024, 512, 512) if os.environ.get("BENCH_SMALL") == "1" else (5632, 2048, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["peft", "fused"])
def test_lora_layer_backward(benchmark, kind, dtype):
    n_out, n_in, tokens = SHAPE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(n_out, n_in, 8, dtype, device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(tokens, n_in, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(tokens, n_out, dtype=dtype, device=device)
    plan = WeightPlan(Role.LORA, name="proj")
    state = {}

    def prepare():
        x.grad = a.grad = b.grad = None
        state["y"] = layer(x) if kind == "peft" else \
            fused_lora_linear(x, None, layer.base_layer.weight, None, a, b, layer.scaling["default"], plan)

    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.pedantic(lambda: state.pop("y").backward(g), setup=prepare, rounds=5, warmup_rounds=1)
