"""The layers depend one way: rounding/plan ← kernels ← backends ← update/collectives ← functions ← stream/patch ←
optim ← integrations.  Checked on the source (imports and attribute names), so a change that loops fails here."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bread_kernels"
#: the engine's modules: none may import the optimizer, the integrations or the benchmark
ENGINE = ["rounding.py", "quantized.py", "offload.py",
          "interrupts.py", "plan.py", "installed_forward.py", "open_forwards.py", "update.py",
          "collectives.py", "stream.py", "patch.py",
          "causal_lm.py", "peft_lora.py", "weight_readers.py", "kernels", "backends", "functions"]
#: what each lower layer must not import (package-relative module prefixes)
FORBIDDEN = {
    "rounding.py": ["plan", "kernels", "backends", "update", "functions", "stream", "patch", "optim", "integrations"],
    "quantized.py": ["rounding", "interrupts", "plan", "kernels", "backends", "update", "functions", "stream",
                     "patch", "optim", "integrations"],
    "offload.py": ["rounding", "quantized", "interrupts", "plan", "kernels", "backends", "update", "functions",
                   "stream", "patch", "optim", "integrations"],
    "interrupts.py": ["rounding", "plan", "kernels", "backends", "update", "functions", "stream", "patch", "optim",
                      "integrations"],
    "plan.py": ["kernels", "backends", "update", "functions", "stream", "patch", "optim", "integrations"],
    "installed_forward.py": ["rounding", "plan", "kernels", "backends", "update", "functions", "stream", "patch", "optim",
                             "integrations"],
    "open_forwards.py": ["rounding", "plan", "kernels", "backends", "update", "functions", "stream", "patch", "optim",
                         "integrations"],
    "kernels": ["backends", "update", "functions", "stream", "patch", "optim", "integrations"],
    "backends": ["update", "functions", "stream", "patch", "optim", "integrations"],
    "update.py": ["functions", "stream", "patch", "optim", "integrations"],
    "collectives.py": ["update", "functions", "stream", "patch", "optim", "integrations"],
    "functions": ["stream", "patch", "optim", "integrations"],
    "stream.py": ["patch", "optim", "integrations"],
    "patch.py": ["optim", "integrations"],
    "causal_lm.py": ["stream", "patch", "optim", "integrations"],
    "peft_lora.py": ["functions", "stream", "patch", "optim", "integrations"],
    "weight_readers.py": ["kernels", "backends", "update", "functions", "stream", "patch", "optim",
                          "integrations"],
    "optim": ["integrations", "bench"],
}
DEEPSPEED_ATTRIBUTES = ("ds_id", "ds_tensor", "ds_numel", "ds_shape", "ds_status", "ds_persist",
                        "ds_process_group", "ds_secondary_tensor", "ds_active_sub_modules")


def _files(entry: str) -> list[Path]:
    path = PACKAGE / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imported_modules(path: Path) -> list[str]:
    """Package-relative names of everything ``path`` imports from bread_kernels (``optim.block_optimizer``)."""
    package = path.relative_to(PACKAGE).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                names = [".".join(parts + [a.name]) for a in node.names] if not node.module else [".".join(parts)]
                found += names
            elif node.module and node.module.startswith("bread_kernels"):
                found.append(node.module.removeprefix("bread_kernels").lstrip("."))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("bread_kernels").lstrip(".") for a in node.names
                      if a.name.startswith("bread_kernels")]
    return found


@pytest.mark.parametrize("entry", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(entry):
    bad = []
    for path in _files(entry):
        for module in _imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[entry]):
                bad.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not bad, bad


@pytest.mark.parametrize("entry", ENGINE + ["optim"])
def test_no_engine_or_optimizer_module_reads_a_deepspeed_attribute_or_imports_deepspeed(entry):
    bad = []
    for path in _files(entry):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in DEEPSPEED_ATTRIBUTES:
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in DEEPSPEED_ATTRIBUTES:
                bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} names {node.value!r}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                if any(n and n.split(".")[0] == "deepspeed" for n in names) and not getattr(node, "level", 0):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports deepspeed")
    assert not bad, bad


def test_the_scan_catches_a_planted_loop(tmp_path, monkeypatch):
    """The checks above fail on a lazy import of the integrations inside a function, as the old code had."""
    fake = tmp_path / "bread_kernels" / "functions"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from ..plan import Role\n\ndef f(w):\n"
                               "    from ..integrations.deepspeed import shards\n    return w.ds_id\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "bread_kernels")
    assert _imported_modules(fake / "x.py") == ["plan", "integrations.deepspeed"]
    with pytest.raises(AssertionError, match="imports integrations.deepspeed"):
        test_lower_layers_never_import_higher_ones("functions")
    with pytest.raises(AssertionError, match="reads .ds_id"):
        test_no_engine_or_optimizer_module_reads_a_deepspeed_attribute_or_imports_deepspeed("functions")
