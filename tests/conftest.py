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
    from tests.integrations.ranks import freeze_long_lived_objects

    freeze_long_lived_objects()  # the imports and the collection are done


def pytest_sessionfinish(session, exitstatus):
    import gc

    gc.unfreeze()  # as it was: the objects frozen at collection are collected at interpreter shutdown like any others
