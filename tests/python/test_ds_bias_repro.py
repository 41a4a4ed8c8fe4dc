"""python/ds_bias_repro.py: ``BIAS`` chooses whether the repro's Llama has MLP biases (the docstring's "with or
without mlp_bias")."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bias, expected", [("0", False), ("1", True), (None, True)])
def test_bias_variable_chooses_the_models_biases(monkeypatch, bias, expected):
    monkeypatch.setenv("ZERO3_WORKER_MLP_BIAS", "")  # restored after the test: the script writes the variable
    if bias is None:
        monkeypatch.delenv("BIAS", raising=False)
    else:
        monkeypatch.setenv("BIAS", bias)
    repro = runpy.run_path(str(ROOT / "python" / "ds_bias_repro.py"), run_name="ds_bias_repro")  # main() not run
    model = repro["zw"].build_model()
    assert (model.model.layers[0].mlp.up_proj.bias is not None) is expected  # BIAS=0 built biases
