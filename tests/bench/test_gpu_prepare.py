"""``bench/gpu_prepare.sh`` downloads the pure-Python wheels the lent GPU machine lacks (it has no network), and
``bench/gpu_session.sh`` installs them with ``pip install --no-deps``: so the list must hold every runtime requirement
of the packages it carries that the GPU image is not known to have, or their import fails there."""

import importlib.metadata as metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_prepare.sh"
#: what the GPU image has (torch, triton, transformers, peft: .library/device/KINDS.md) and the wheels need
ON_THE_IMAGE = {"torch", "triton", "transformers"}


def _downloaded() -> set[str]:
    """The distributions the script's ``pip download`` names (its quoted requirement specifiers)."""
    text = SCRIPT.read_text()
    return {_canonical(Requirement(spec).name) for spec in re.findall(r'"([A-Za-z][\w.-]*[<>=!~][^"]*)"', text)}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _runtime_requirements(distribution: str) -> set[str]:
    """The requirements of ``distribution`` (as installed here) that apply on the GPU machine's Linux Python 3.12,
    without extras."""
    environment = {"sys_platform": "linux", "python_version": "3.12", "platform_system": "Linux", "extra": ""}
    names = set()
    for spec in metadata.requires(distribution) or ():
        requirement = Requirement(spec)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(_canonical(requirement.name))
    return names


def test_every_runtime_requirement_of_the_carried_test_runner_is_carried_too():
    """pytest 8.4 and later import ``pygments`` (and ``packaging``) at ``import pytest``: carried without them,
    pytest fails to import on an image without pygments, and the GPU run's test step ends at once."""
    downloaded = _downloaded()
    assert {"pytest", "pytest-xdist", "pytest-timeout"} <= downloaded, downloaded
    checked = [name for name in ("pytest", "pytest-xdist", "pytest-timeout", "pluggy", "execnet") if _installed(name)]
    assert "pytest" in checked  # the rest are read where installed here (pytest-timeout is not in the test extra)
    for carried in checked:
        missing = _runtime_requirements(carried) - downloaded - ON_THE_IMAGE
        assert not missing, f"{carried} needs {sorted(missing)}, which bench/gpu_prepare.sh does not download"
