"""pytest-benchmark suite of the fused SGD / SIGN linear backward against autograd + a post-accumulate-grad hook.

Run: ``python -m pytest bench/ --benchmark-group-by=param:role,param:dtype``; compare each fused row with the
reference row of its group.  Shape: a TinyLlama MLP weight (5632×2048) and 2048 tokens (``BENCH_SMALL=1`` for a
quick 1024×512×512 run).  The same cases drive ``python -m bread_kernels.bench``, which also prints memory.
"""

import os

import pytest
import torch

from bread_kernels import Role
from bread_kernels.bench.linear import make_case

SHAPE = (1024, 512, 512) if os.environ.get("BENCH_SMALL") == "1" else (5632, 2048, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("role", [Role.SGD, Role.SIGN], ids=lambda r: r.name)
@pytest.mark.parametrize("kind", ["reference", "fused"])
def test_linear_backward(benchmark, kind, role, dtype):
    case = make_case(kind, role, *SHAPE, dtype)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    benchmark.pedantic(case.backward, setup=case.prepare, rounds=5, warmup_rounds=1)
