"""Reproduce the BREAD paper's two experiments on a CPU, writing PNGs and a markdown table into ``--out``.

    python python/reproduce_paper.py --out runs/paper               # both (the LM ablation takes a while)
    python python/reproduce_paper.py --out runs/paper --only toy    # the toy alone, minutes

1. **Toy** (``toy.png``): a 3-layer ReLU net fitted by mean squared error to a random 3-layer ReLU teacher.
   * *BCD*: the layers in turn (descending), K Adam steps each;
   * *BCD + rank-1 correction*: the same, while every inactive layer carries a rank-1 correction ``u vᵀ`` trained
     by Adam with the active layer, merged into its layer at each switch and restarted (BREAD's landscape
     correction, ``u = 0``, ``v`` Kaiming-uniform at each restart);
   * *rank-1 corrections alone*: every layer frozen, a rank-1 correction on each trained by Adam (never merged);
   * *Adam*: every parameter, for reference.
   The paper's claim: corrected BCD ends far below plain BCD, corrections alone barely move.
2. **Variant ablation** (``ablation.png``): ``finetune.py`` on LIMA with Adam, BAdam, BREAD, BREAD-partial,
   BREAD-SGD, BREAD-SGD-partial and BREAD-sign: the same steps, learning rate, data and initialisation; loss against
   step and against time.

``results.md`` has the final losses of every method in both experiments (the toy's: the mean of its last 1% of
steps; the ablation's: of its last 10%).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ABLATION = ("adam", "badam", "bread", "bread-partial", "bread-sgd", "bread-sgd-partial", "bread-sign")


# -- 1. the toy ----------------------------------------------------------------------------------------------------
def _net(sizes, generator):
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1 / math.sqrt(n_in)
        layers.append([(torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound * math.sqrt(6),
                       torch.zeros(n_out)])
    return layers


def _forward(layers, x, corrections=None):
    for i, (w, b) in enumerate(layers):
        if corrections is not None and corrections[i] is not None:
            u, v = corrections[i]
            w = w + u[:, None] * v[None, :]
        x = x @ w.t() + b
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


def toy(steps_per_block=100, rounds=10, width=32, n=512, lr=1e-2, seed=0) -> dict[str, list[float]]:
    """Training-loss curves of the four methods (one value per step)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [8, width, width, 1]
    teacher = _net(sizes, gen)
    x = torch.randn(n, sizes[0], generator=gen)
    with torch.no_grad():
        y = _forward(teacher, x)
    init = _net(sizes, gen)
    total = steps_per_block * rounds * len(sizes[1:])

    def fresh():
        return [[w.clone().requires_grad_(True), b.clone().requires_grad_(True)] for w, b in init]

    def rank1(layer, generator):
        n_out, n_in = layer[0].shape
        bound = math.sqrt(6 / n_in)
        return [torch.zeros(n_out, requires_grad=True),
                ((torch.rand(n_in, generator=generator) * 2 - 1) * bound).requires_grad_(True)]

    def loss_of(layers, corrections=None):
        return torch.mean((_forward(layers, x, corrections) - y) ** 2)

    def adam_curve(params, loss_fn, steps):
        opt = torch.optim.Adam(params, lr=lr)
        curve = []
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return curve

    layers = fresh()
    curves = {"Adam (all layers)": adam_curve([p for layer in layers for p in layer], lambda: loss_of(layers), total)}

    for corrected in (False, True):
        layers, curve = fresh(), []
        cgen = torch.Generator().manual_seed(seed + 1)
        order = list(range(len(layers)))[::-1]
        for r in range(rounds):
            for active in order:
                corrections = [None if i == active or not corrected else rank1(layers[i], cgen)
                               for i in range(len(layers))]
                params = layers[active] + [p for c in corrections if c is not None for p in c]
                curve += adam_curve(params, lambda: loss_of(layers, corrections), steps_per_block)
                with torch.no_grad():  # the landscape correction is merged into its layer at the switch
                    for i, c in enumerate(corrections):
                        if c is not None:
                            layers[i][0] += c[0][:, None] * c[1][None, :]
        curves["BCD + rank-1 correction" if corrected else "BCD (Adam on one layer at a time)"] = curve

    layers = fresh()
    for layer in layers:
        layer[0].requires_grad_(False)
        layer[1].requires_grad_(False)
    cgen = torch.Generator().manual_seed(seed + 1)
    corrections = [rank1(layer, cgen) for layer in layers]
    curves["rank-1 corrections alone"] = adam_curve([p for c in corrections for p in c],
                                                    lambda: loss_of(layers, corrections), total)
    return curves


def plot_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for label, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), curve, label=label)
    axis.set_yscale("log")
    axis.set_xlabel("Adam step")
    axis.set_ylabel("training MSE")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final(values: list[float], fraction: float = 0.1) -> float:
    """The mean of the last ``fraction`` of the values."""
    tail = values[-max(1, int(len(values) * fraction)):]
    return sum(tail) / len(tail)


# -- 2. the ablation -----------------------------------------------------------------------------------------------
def ablation(out: Path, steps: int, lr: float, data: str, progress: bool) -> dict[str, list[dict]]:
    sys.path.insert(0, str(HERE))
    import finetune
    import plot_runs

    runs = {}
    for method in ABLATION:
        directory = out / "ablation" / method
        if (directory / "checkpoint.pt").exists():
            saved = json.loads((directory / "config.json").read_text())
            if saved.get("lr") != lr or saved.get("data") != data:
                raise SystemExit(f"reproduce_paper: {directory} holds a run with lr {saved.get('lr')} on "
                                 f"{saved.get('data')}, not lr {lr} on {data}; choose another --out or remove it")
            records = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
            if len(records) >= steps:
                runs[method] = records[:steps]  # a longer run's first steps are this one's
                continue
        argv = ["--method", method, "--data", data, "--steps", str(steps), "--lr", str(lr), "--out", str(directory),
                "--save-every", str(steps)]
        if (directory / "checkpoint.pt").exists():
            argv = ["--steps", str(steps), "--resume", "--out", str(directory)]
        runs[method] = finetune.main(argv + ([] if progress else ["--no-progress"]))
        runs[method] = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    plot_runs.plot([(m, r) for m, r in runs.items()], str(out / "ablation.png"), smooth=0.9,
                   title=f"finetune.py on LIMA, {steps} steps, lr {lr}")
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="paper")
    parser.add_argument("--only", choices=["toy", "ablation"])
    parser.add_argument("--steps", type=int, default=300, help="ablation: optimizer steps per method")
    parser.add_argument("--lr", type=float, default=1e-3, help="ablation: learning rate of every method")
    parser.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "lima.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# BREAD paper experiments, reproduced on a CPU", ""]
    if args.only in (None, "toy"):
        curves = toy()
        plot_curves(curves, out / "toy.png", "3-layer ReLU regression: BCD vs BCD with rank-1 landscape correction")
        # the last 1% of steps: after the spike every switch causes (fresh Adam state) has settled
        lines += ["## Toy: 3-layer ReLU regression (final training MSE, mean of the last 1% of steps)", "",
                  "| method | final MSE | vs BCD |", "| --- | --- | --- |"]
        bcd = final(curves["BCD (Adam on one layer at a time)"], 0.01)
        lines += [f"| {m} | {final(c, 0.01):.3g} | {final(c, 0.01) / bcd:.2f}x |" for m, c in curves.items()] + [""]
    if args.only in (None, "ablation"):
        runs = ablation(out, args.steps, args.lr, args.data, not args.no_progress)
        lines += [f"## Variant ablation: finetune.py on LIMA, {args.steps} steps, lr {args.lr} (final training loss, "
                  "mean of the last 10% of steps)", "", "| method | final loss | wall-clock s |", "| --- | --- | --- |"]
        lines += [f"| {m} | {final([r['loss'] for r in rs]):.3f} | {rs[-1]['seconds']:.0f} |" for m, rs in runs.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
