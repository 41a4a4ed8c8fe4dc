"""pytest-benchmark suite of one streamed block: a 2-layer Llama (hidden 512, the model suite's layer) training
block 0 with BREAD-SGD, so block 1 streams (recompute, fused on-the-fly update), engine against the reference
(plain autograd, hooks, HF gradient checkpointing).  Run: ``python -m pytest bench/test_block_bench.py
--benchmark-json bench/results/<name>.json``."""

import copy

import pytest
import torch

from bread_kernels import patch
from bread_kernels.bench.model import _enable_checkpointing, _optimizer, build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["reference", "engine"])
def test_streamed_block_backward(benchmark, kind, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build_model(layers=2, vocab=1024, dtype=dtype).to(device)
    model = patch(copy.deepcopy(base)) if kind == "engine" else copy.deepcopy(base)
    if kind == "reference":
        _enable_checkpointing(model)
    opt = _optimizer(model, "BREAD-SGD", 0)
    ids = torch.randint(0, 1024, (4, 256), device=device)
    state = {}

    def prepare():
        opt.zero_grad()
        state["loss"] = model(input_ids=ids, labels=ids).loss

    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.pedantic(lambda: state.pop("loss").backward(), setup=prepare, rounds=5, warmup_rounds=1)
