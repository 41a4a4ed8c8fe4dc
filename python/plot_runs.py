"""Loss curves of several ``finetune.py`` runs, against the step and against wall-clock time, in one PNG.

    python python/plot_runs.py runs/adam runs/badam runs/bread-sgd --out runs/loss.png [--smooth 0.9]

Each DIR's ``log.jsonl`` is one curve, labelled by the run's method (from ``DIR/config.json``) or the directory name;
``--smooth`` is the weight of an exponential moving average (0: raw losses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_run(directory: Path) -> tuple[str, list[dict]]:
    log = directory / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"plot_runs: {directory} has no log.jsonl (is it a finetune.py --out directory?)")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"plot_runs: {log} is empty (the run has not finished a step yet)")
    config = directory / "config.json"
    label = json.loads(config.read_text()).get("method", directory.name) if config.is_file() else directory.name
    return label, records


def distinct_labels(runs: list[tuple[str, list[dict]]], directories: list[str]) -> list[tuple[str, list[dict]]]:
    """Runs of one method (two learning rates, two seeds) told apart in the legend by their directory's name."""
    labels = [label for label, _ in runs]
    return [(f"{label} ({Path(d).name})" if labels.count(label) > 1 else label, records)
            for (label, records), d in zip(runs, directories)]


def smoothed(values: list[float], weight: float) -> list[float]:
    out, average = [], None
    for v in values:
        average = v if average is None else weight * average + (1 - weight) * v
        out.append(average)
    return out


def plot(runs: list[tuple[str, list[dict]]], path: str, smooth: float, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, records in runs:
        losses = smoothed([r["loss"] for r in records], smooth)
        by_step.plot([r["step"] for r in records], losses, label=label)
        by_time.plot([r["seconds"] for r in records], losses, label=label)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock (s)")
    by_step.set_ylabel("training loss" + (f" (EMA {smooth})" if smooth else ""))
    by_step.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finetune.py --out directories")
    parser.add_argument("--out", default="loss_curves.png")
    parser.add_argument("--smooth", type=float, default=0.9)
    parser.add_argument("--title", default="")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    plot(distinct_labels([read_run(Path(d)) for d in args.runs], args.runs), args.out, args.smooth, args.title)
    print(args.out)


if __name__ == "__main__":
    main()
