"""Test set-up: Triton runs through its interpreter when there is no GPU (set before anything imports triton)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every on-the-fly update fused, however small the test model's weights: the tests of the small-weight hook path
# (patch's hook_update_numel) ask for it
os.environ.setdefault("BREAD_HOOK_UPDATE_NUMEL", "0")

import pytest  # noqa: E402

from bread_kernels.backends import BACKEND_NAMES  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: two workers of torch's two OpenMP threads each on two cores spin against each other
    # (measured: the suite took longer than run in one process); a file run alone keeps torch's threads
    torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backends_for(device: str):
    return [b for b in BACKEND_NAMES if not (b == "native" and device != "cpu")]


@pytest.fixture(params=backends_for(DEVICE))
def backend(request, monkeypatch):
    """Runs the test once per backend, forced through BREAD_BACKEND like a user would."""
    monkeypatch.setenv("BREAD_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_finish(session):
    """The objects the imports and the collection made (torch, transformers, deepspeed, the test modules: millions)
    live through the session: frozen, every garbage collection skips them, automatic or asked for by a test, by
    transformers or by DeepSpeed.  It sees only what the tests make, so a leak test still finds what outlives its
    owner.  Measured in one process on a 2-core AVX2 EPYC: the Trainer and patch tests 99 s to 67 s, the suite 997 s
    to 899 s."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    import gc

    gc.unfreeze()  # as it was: the objects frozen above are collected at interpreter shutdown like any others
