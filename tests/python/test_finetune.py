"""python/finetune.py: exact resume (the per-step losses of an interrupted and resumed run equal the uninterrupted
run's), the loss falls on LIMA, and bad input gets a clear error."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMA = ROOT.parent / "shared" / "data" / "lima.json"
TINY = ["--layers", "2", "--hidden", "32", "--intermediate", "40", "--heads", "2", "--seq-len", "64",
        "--batch-size", "2", "--switch-every", "2", "--no-progress"]


def _script():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "python" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return _script()


def _text(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return data


def _losses(directory):
    return [json.loads(line)["loss"] for line in (directory / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["bread-sgd", "bread"])
def test_an_interrupted_and_resumed_run_has_the_uninterrupted_losses(finetune, tmp_path, method):
    data = str(LIMA if LIMA.exists() else _text(tmp_path))
    common = ["--method", method, "--data", data, *TINY]
    finetune.main([*common, "--steps", "7", "--save-every", "3", "--out", str(tmp_path / "whole")])
    finetune.main([*common, "--steps", "4", "--save-every", "3", "--out", str(tmp_path / "cut")])  # ends at step 4
    # the step after the last checkpoint (3) is redone: resume from 4 would be the same; go past an earlier save too
    with pytest.raises(SystemExit, match="at step 4 already; --resume with --steps above it"):  # did nothing, exit 0
        finetune.main(["--steps", "3", "--resume", "--no-progress", "--out", str(tmp_path / "cut")])
    finetune.main(["--steps", "7", "--resume", "--no-progress", "--out", str(tmp_path / "cut")])
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert len(whole) == len(resumed) == 7
    assert resumed == pytest.approx(whole, rel=1e-6)
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "active_block", "seconds"} <= set(records[0])
    assert [r["active_block"] for r in records[:5]] == [1, 1, 0, 0, 1]  # descending, switching every 2 steps


def test_the_loss_falls_on_lima(finetune, tmp_path):
    """On LIMA where the shared data is beside the checkout (a clean CI clone may lack it: then on text)."""
    data = LIMA if LIMA.exists() else _text(tmp_path)
    records = finetune.main(["--method", "bread-sgd", "--data", str(data), "--layers", "2", "--hidden", "64",
                             "--intermediate", "128", "--heads", "2", "--seq-len", "96", "--batch-size", "4",
                             "--steps", "40", "--lr", "1e-2", "--switch-every", "5", "--no-progress",
                             "--out", str(tmp_path / "run")])
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.6, (first, last)  # from ln(259) ≈ 5.56 (uniform bytes): 5.42 -> 4.40 measured


def test_bad_input_gets_a_clear_error(finetune, tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        finetune.main(["--data", str(tmp_path / "missing.json"), *TINY, "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        finetune.main(["--method", "sgd-magic", *TINY, "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):  # refused by argparse, before its config.json is written
        finetune.main(["--switch-mode", "sideways", *TINY, "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit, match="--resume, but .* does not exist"):
        finetune.main(["--resume", "--out", str(tmp_path / "c")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(SystemExit, match="records with 'instruction', 'output'"):
        finetune.main(["--data", str(bad), *TINY, "--out", str(tmp_path / "d")])
