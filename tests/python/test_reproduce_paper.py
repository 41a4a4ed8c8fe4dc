"""python/reproduce_paper.py: an ablation run kept in --out is reused only for the same settings."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "python"))
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "python" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kept_run(out: Path, method: str, lr: float, data: str, steps: int) -> None:
    directory = out / "ablation" / method
    directory.mkdir(parents=True)
    (directory / "checkpoint.pt").write_bytes(b"")
    (directory / "config.json").write_text(json.dumps({"lr": lr, "data": data, "steps": steps}))
    (directory / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1), "seconds": i})
                                                 + "\n" for i in range(steps)))


def test_a_kept_run_of_other_settings_is_refused_and_a_longer_one_gives_its_first_steps(tmp_path, monkeypatch):
    """A run of 2 steps at lr 0.001 was listed under a later --steps 1 --lr 0.05 as if it were that run."""
    paper = _script()
    for method in paper.ABLATION:
        _kept_run(tmp_path, method, lr=1e-3, data="lima.json", steps=2)
    with pytest.raises(SystemExit, match="holds a run with lr 0.001 .* not lr 0.05"):
        paper.ablation(tmp_path, steps=1, lr=0.05, data="lima.json", progress=False)
    import plot_runs

    monkeypatch.setattr(plot_runs, "plot", lambda *args, **kwargs: None)
    runs = paper.ablation(tmp_path, steps=1, lr=1e-3, data="lima.json", progress=False)
    assert all(len(records) == 1 for records in runs.values()) and set(runs) == set(paper.ABLATION)
