"""Backend choice: defaults, BREAD_BACKEND, and clear errors when a forced backend cannot serve a tensor."""

import warnings

import pytest

from bread_kernels.backends import get_backend

# Triton decides whether a kernel is interpreted when it is defined: the kernels are imported here, in this process's
# own mode, before a test below sets TRITON_INTERPRET=1 to build the triton backend for CPU tensors.  Imported first
# under that variable on a GPU host, every later test of the process would run its CUDA kernels interpreted.
from bread_kernels.kernels import finite, lora_grads, wgrad_update  # noqa: F401


def test_default_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv("BREAD_BACKEND", raising=False)
    assert get_backend("cpu").name == "native"


@pytest.mark.parametrize("name", ["torch", "native", "triton"])
def test_forced_backend_is_used(monkeypatch, name):
    monkeypatch.setenv("BREAD_BACKEND", name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_backend("cpu").name == name


def test_unknown_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="BREAD_BACKEND='cutlass' is not a backend; use one of triton, native, torch"):
        get_backend("cpu")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        get_backend("cpu")


def test_native_on_a_non_cpu_device_is_refused(monkeypatch):
    monkeypatch.setenv("BREAD_BACKEND", "native")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        get_backend("meta")


def test_unbuildable_native_backend_falls_back_to_torch_and_says_so_once(monkeypatch):
    import bread_kernels.backends as backends
    import bread_kernels.backends.native as native

    monkeypatch.delenv("BREAD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_instances", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_chosen", {})  # the choice is cached per (device, BREAD_BACKEND)
    monkeypatch.setattr(native, "_state", {"error": RuntimeError("the native CPU backend could not be built: no c++")})
    with pytest.warns(RuntimeWarning, match="native backend is unavailable.*no c\\+\\+.*torch backend"):
        assert get_backend("cpu").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_backend("cpu").name == "torch"
    with pytest.raises(RuntimeError, match="no c\\+\\+"):
        monkeypatch.setenv("BREAD_BACKEND", "native")
        get_backend("cpu")


def test_a_plan_chooses_its_weights_backend_once(monkeypatch):
    """A plan's own update target asks for the backend at its first update and keeps it (no environment reads per
    update); a plan written after a change of ``BREAD_BACKEND`` gets the new choice, and :data:`LOCAL` asks each
    time."""
    import torch

    import copy

    import bread_kernels.backends as backends
    import bread_kernels.update as update
    from bread_kernels.plan import OnTheFlyUpdate, Role, WeightPlan
    from bread_kernels.update import LOCAL, update_linear_

    def plan_after_an_update():
        plan = WeightPlan(Role.SGD, OnTheFlyUpdate(lr=1e-3))
        update_linear_(plan, Role.SGD, torch.zeros(3, 2), None, [(torch.ones(4, 3), torch.ones(4, 2))])
        return plan

    monkeypatch.setenv("BREAD_BACKEND", "torch")
    plan = plan_after_an_update()
    monkeypatch.setenv("BREAD_BACKEND", "native")  # before the plan's target is asked: it answers what it kept
    assert plan.local_target.backend(torch.device("cpu")).name == "torch"
    asked = []
    monkeypatch.setattr(update, "get_backend", lambda device: asked.append(device) or backends.get_backend(device))
    update_linear_(plan, Role.SGD, torch.zeros(3, 2), None, [(torch.ones(4, 3), torch.ones(4, 2))])
    assert asked == []  # a later update of the plan asks nobody
    assert plan_after_an_update().local_target.backend(torch.device("cpu")).name == "native"
    monkeypatch.setattr(update, "get_backend", backends.get_backend)
    assert LOCAL.backend(torch.device("cpu")).name == "native"
    monkeypatch.setenv("BREAD_BACKEND", "torch")
    assert LOCAL.backend(torch.device("cpu")).name == "torch"
    copied = copy.deepcopy(plan.local_target)  # a copied target chooses again
    assert copied._kept is None and copied.keep_backend
    assert copied.backend(torch.device("cpu")).name == "torch"
    assert copy.deepcopy(plan) is None  # a plan is not copied with a model: the copy is driven by no optimizer


def test_two_checkouts_of_the_same_sources_build_apart(monkeypatch, tmp_path):
    """torch's JIT build records the sources' paths: two checkouts of one version (a git worktree, an installed
    copy beside a checkout) that share an extension name rebuild it over each other, each time the other was last.
    Each checkout gets a build of its own; one checkout keeps its name."""
    import shutil

    import torch.utils.cpp_extension

    import bread_kernels.backends.native as native

    native.load_native()  # the real extension, so that its ops are registered whatever load() is given below
    names = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: names.append(kwargs["name"]))
    for checkout in ("a", "b", "a"):
        csrc = tmp_path / checkout / "csrc"
        if not csrc.exists():
            csrc.mkdir(parents=True)
            for name in (*native._SOURCES, *native._HEADERS):
                shutil.copyfile(native._source(name), csrc / name)
        monkeypatch.setattr(native, "_source", lambda name, csrc=csrc: csrc / name)
        monkeypatch.setattr(native, "_state", {})
        native.load_native()
    assert names[0] != names[1] and names[0] == names[2], names
