"""python/plot_runs.py: one curve per run, runs of one method told apart, an empty log refused."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(directory: Path, method: str, steps: int) -> str:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"method": method}))
    (directory / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 2.0 - i / 10, "seconds": i}) + "\n"
                                                 for i in range(steps)))
    return str(directory)


def test_runs_of_one_method_get_their_own_labels_and_an_empty_log_is_refused(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "python"))
    import plot_runs

    plotted = []
    monkeypatch.setattr(plot_runs, "plot", lambda runs, *args, **kwargs: plotted.extend(label for label, _ in runs))
    runs = [_run(tmp_path / "lr1e-3", "bread-sgd", 3), _run(tmp_path / "lr1e-2", "bread-sgd", 3),
            _run(tmp_path / "adam", "adam", 3)]
    plot_runs.main([*runs, "--out", str(tmp_path / "curves.png")])
    assert plotted == ["bread-sgd (lr1e-3)", "bread-sgd (lr1e-2)", "adam"]  # were two "bread-sgd"
    with pytest.raises(SystemExit, match="is empty"):
        plot_runs.main([_run(tmp_path / "fresh", "adam", 0), "--out", str(tmp_path / "x.png")])
