"""The engine under other BCD libraries: ``badam`` with and without ``bread_kernels.accelerate``, and LISA (LMFlow's
layer draws) with and without the engine's ``LisaCallback``.

Model and batch: the engine benchmark's CPU setup (``bread_kernels.bench.model.CPU_SETUP``: Llama 8 × 512,
intermediate 1376, vocab 4096, batch 4 × 256), fp32.  Sides, all on copies of one model:

* badam (``badam.BlockOptimizer``, ``switch_mode="fixed"`` at block 1, 4 and 6 — its own step is not run, only
  forward + backward are timed): the library alone as its users run it (Hugging Face gradient checkpointing, which makes the
  embeddings' output require grad), the library alone best configured (checkpointing plus
  ``disable_input_require_grads()``, as LLaMA-Factory does), the library alone without checkpointing (plain
  autograd, every activation stored), and the library with ``accelerate`` (the engine's recompute);
* LISA (2 of 8 layers drawn as LMFlow draws them, the embeddings and head trained as LISA does): LMFlow's
  ``requires_grad`` switching on the unpatched model with and without checkpointing, and ``LisaCallback`` on the
  engine.

Per side: the median forward + backward time over the repeats (sides measured alternately; the forward counts
because the engine's fused head+loss does the head's backward work in it), and the peak memory of forward + backward from the profiler's allocation events in an untimed warm-up.  Not a test.

    python bench/bcd_libraries.py [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's bread_kernels, run from anywhere

import badam
import numpy as np
import torch

import bread_kernels
from bread_kernels.bench.model import CPU_SETUP, build_model, reference_ways, timed_alternately
from bread_kernels.integrations.transformers import LisaCallback

LR = 1e-5


def _badam(model, block):
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    return badam.BlockOptimizer(base, list(model.named_parameters()), switch_mode="fixed", start_block=block,
                                verbose=0)


def _lmflow_draw(model, layers):
    """LMFlow's switch: every layer frozen, the drawn ones trainable (the rest of the model as it is)."""
    for layer in model.model.layers:
        layer.requires_grad_(False)
    for i in layers:
        model.model.layers[i].requires_grad_(True)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = build_model(**CPU_SETUP["shape"])
    ids = torch.randint(0, CPU_SETUP["shape"]["vocab"], (CPU_SETUP["batch"], CPU_SETUP["seq"]))
    lines = [f"# badam / LISA with and without the engine — {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, badam 1.4, fp32, Llama 8x512, "
             f"batch {tuple(ids.shape)}, median of {args.repeats}", ""]

    summary = {"badam": [], "lisa": []}
    for block in (1, 4, 6):
        ways = reference_ways(base, recompute=True)
        plain = copy.deepcopy(base).train()
        engine = copy.deepcopy(base).train()
        sides = {"badam as run (HF ckpt)": ways["reference"], "badam best (ckpt, no input grads)": ways["best"],
                 "badam, no checkpointing": plain, "badam + accelerate": engine}
        optimizers = {name: _badam(model, block) for name, model in sides.items()}
        bread_kernels.accelerate(optimizers["badam + accelerate"], engine)
        names = list(sides)
        times, peaks = timed_alternately([(sides[n], optimizers[n]) for n in names], ids, args.repeats)
        lines += [f"## badam, active block {block}", "", "| side | step s | peak MiB | engine time ratio | "
                  "engine peak ratio |", "| --- | --- | --- | --- | --- |"]
        t_engine, m_engine = statistics.median(times[-1]), peaks[-1]
        for k, name in enumerate(names):
            t = statistics.median(times[k])
            lines.append(f"| {name} | {t:.3f} | {peaks[k] / 2**20:.0f} | {t_engine / t:.2f}x | "
                         f"{m_engine / peaks[k]:.2f}x |")
            summary["badam"].append((block, name, t_engine / t, m_engine / peaks[k]))
        lines.append("")
        for opt in optimizers.values():
            bread_kernels.unaccelerate(opt)

    drawn = [int(i) for i in np.random.RandomState(0).choice(range(8), 2, replace=False)]
    ways = reference_ways(base, recompute=True)
    plain = copy.deepcopy(base).train()
    engine = copy.deepcopy(base).train()
    sides = {"LMFlow LISA, HF ckpt": ways["reference"], "LMFlow LISA, no checkpointing": plain,
             "LisaCallback (engine)": engine}
    for model in (ways["reference"], plain):
        _lmflow_draw(model, drawn)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=LR) for name, model in sides.items()}
    lisa = LisaCallback(n_layers=2, interval_steps=1, seed=0)
    lisa.on_train_begin(None, None, None, model=engine, optimizer=optimizers["LisaCallback (engine)"])
    lisa.switch_active_layers()
    assert lisa.active_layers_indices == drawn
    names = list(sides)
    times, peaks = timed_alternately([(sides[n], optimizers[n]) for n in names], ids, args.repeats)
    lines += [f"## LISA, layers {sorted(drawn)} of 8 (embeddings and head trained)", "",
              "| side | step s | peak MiB | engine time ratio | engine peak ratio |", "| --- | --- | --- | --- | --- |"]
    t_engine, m_engine = statistics.median(times[-1]), peaks[-1]
    for k, name in enumerate(names):
        t = statistics.median(times[k])
        lines.append(f"| {name} | {t:.3f} | {peaks[k] / 2**20:.0f} | {t_engine / t:.2f}x | {m_engine / peaks[k]:.2f}x |")
        summary["lisa"].append((name, t_engine / t, m_engine / peaks[k]))
    lisa.close()

    lines += ["", "## mean ratios, engine / side (badam over blocks 1, 4, 6)", ""]
    for name in dict.fromkeys(n for _, n, _, _ in summary["badam"] if n != "badam + accelerate"):
        rows = [(t, m) for _, n, t, m in summary["badam"] if n == name]
        lines.append(f"- badam + accelerate vs {name}: time {statistics.mean(t for t, _ in rows):.2f}x, "
                     f"peak {statistics.mean(m for _, m in rows):.2f}x")
    for name, t, m in summary["lisa"][:-1]:
        lines.append(f"- LisaCallback vs {name}: time {t:.2f}x, peak {m:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bcd_libraries_cpu_float32.txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
