"""The model benchmark's outputs: the table on stdout, the JSON and the PNG a user keeps, and the README's table
made from a saved JSON (``python -m bread_kernels.bench.report FILE.json``), never typed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..patch import DEFAULT_HOOK_UPDATE_NUMEL

__all__ = ["print_table", "write_outputs", "markdown_table", "output_stem"]


def _header(result: dict) -> str:
    model = result["model"]
    shape = (f"Llama {model['layers']}x{model['hidden']} (inter {model['intermediate']}, vocab {model['vocab']})"
             if isinstance(model, dict) else str(model))
    keep_top = result.get("keep_top", "auto")  # absent from results saved before the option
    kept = "" if keep_top == "auto" else f", keep_top={keep_top}"
    hooked = result.get("hook_update_numel", 0)  # absent from results saved before the option: every update fused
    if hooked != DEFAULT_HOOK_UPDATE_NUMEL:
        kept += f", hook_update_numel={hooked}"
    if "backend" in result:  # absent from results saved before they were recorded
        kept += f", backend {result['backend']}, loss chunks {result['loss_chunk_bytes'] / 2**20:g} MiB"
    return (f"BCD step (forward + backward) on {result['device']}: {shape}, batch {result['batch']}x{result['seq']}, "
            f"{result['dtype']}, recompute={result['recompute']}{kept}; GEMM {result['gemm_gflops']:.0f} GFLOP/s")


def print_table(result: dict, print_fn=print) -> None:
    """Per variant and position: times (median [20%-80%]), ratios to both references, FLOP ratio, peaks, distance
    to the ideal; then the per-variant means against the faster reference (the headline)."""
    print_fn(_header(result))
    if result.get("recompute", True):
        print_fn("ref: the reference as its users run it (HF checkpointing, input embeddings require grad); best: "
                 "configured as well as it can be (autograd stops at the lowest trainable block); 'vs fast' and 'mem': "
                 "against the faster of the two")
    else:
        print_fn("ref = best: the reference without checkpointing (plain autograd and hooks)")
    print_fn(f"{'variant':<24}{'block':>6}{'engine ms':>20}{'ref ms':>9}{'best ms':>9}{'vs ref':>8}{'vs fast':>9}"
             f"{'FLOPs':>7}{'eng MiB':>9}{'ref MiB':>9}{'best MiB':>9}{'mem':>7}{'ideal':>7}{'ok':>4}")
    for r in result["rows"]:
        spread = f"{r['engine_ms']:.0f} [{r['engine_q20_ms']:.0f}-{r['engine_q80_ms']:.0f}]"
        flops = f"{r['flop_ratio']:.2f}" if r["flop_ratio"] is not None else "-"
        print_fn(f"{r['variant']:<24}{r['position']:>6}{spread:>20}{r['reference_ms']:>9.0f}{r['best_reference_ms']:>9.0f}"
                 f"{r['time_ratio']:>8.2f}{r['best_time_ratio']:>9.2f}{flops:>7}{r['engine_peak_mib']:>9.1f}"
                 f"{r['reference_peak_mib']:>9.1f}{r['best_reference_peak_mib']:>9.1f}{r['best_memory_ratio']:>7.2f}"
                 f"{r['ideal_fraction']:>7.0%}{'yes' if r['verified'] else 'NO':>4}")
    profiled = [r for r in result["rows"] if r.get("profile")]
    if profiled:
        print_fn("profiled forward + backward (profiler self time; 'other' = everything outside GEMMs and attention "
                 "kernels, inflated alike on every side by the profiler's per-op cost)")
        print_fn(f"{'variant':<24}{'block':>6}{'GEMMs eng/ref/best':>22}{'other ms eng/ref/best':>26}"
                 f"{'ops eng/ref/best':>22}")
        for r in profiled:
            sides = [r["profile"][k] for k in ("engine", "reference", "best_reference")]
            gemms = "/".join(str(p["gemm_calls"]) for p in sides)
            other = "/".join(f"{p['other_ms']:.0f}" for p in sides)
            ops = "/".join(str(p["ops"]) for p in sides)
            print_fn(f"{r['variant']:<24}{r['position']:>6}{gemms:>22}{other:>26}{ops:>22}")
    print_fn("mean over positions, against the faster reference: " + "; ".join(
        f"{v} {s['best_time_ratio']:.2f}x time, {s['best_memory_ratio']:.2f}x memory"
        for v, s in result["summary"].items()))
    for line in _caveats(result):
        print_fn(line)


def _caveats(result: dict) -> list[str]:
    """What a reader of the table must know about cases it lacks: verification failures (no row), a stopped run."""
    lines = [f"FAILED verification, not timed: {f['variant']} at block {f['position']}: {f['error']}"
             for f in result.get("failures", [])]
    if result.get("partial"):
        lines.append("PARTIAL: the run stopped before every case was measured")
    return lines


def output_stem(result: dict) -> str:
    return f"bench_model_{result['device_type']}_{result['dtype']}"


def write_partial(result: dict, out_dir) -> str:
    """The JSON of the cases measured so far (``"partial": true``), written after each case: a run stopped by a
    time limit (a lent GPU's) still leaves them.  :func:`write_outputs` writes over it at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = (out / output_stem(result)).with_suffix(".json")
    path.write_text(json.dumps({**result, "partial": True}, indent=2))
    return str(path)


def write_outputs(result: dict, out_dir) -> dict:
    """``<out_dir>/bench_model_<device>_<dtype>.json`` and ``.png`` (time and memory per variant, engine beside
    both references); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / output_stem(result)
    files = {"json": str(stem.with_suffix(".json")), "png": str(stem.with_suffix(".png"))}
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=2))
    plot(result, files["png"])
    return files


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["summary"])
    sides = [("engine", "engine_ms", "engine_peak_mib"), ("reference (as run)", "reference_ms", "reference_peak_mib"),
             ("reference (best)", "best_reference_ms", "best_reference_peak_mib")]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(variants) + 4), 4.5))
    width = 0.8 / len(sides)
    for axis, (title, index) in zip(axes, (("forward + backward time (ms)", 1), ("peak extra memory (MiB)", 2))):
        for k, side in enumerate(sides):
            values = [result["summary"][v][side[index]] for v in variants]
            axis.bar([i + (k - 1) * width for i in range(len(variants))], values, width, label=side[0])
        axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        axis.set_title(title + ", mean over positions")
    axes[0].legend()
    fig.suptitle(_header(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """The README's table: per variant, the means over positions."""
    lines = [f"{_header(result)}.", "",
             "| variant | engine ms | vs reference as run | vs the faster reference | peak memory vs the faster | "
             "fraction of ideal GEMM time | verified |", "| --- | --- | --- | --- | --- | --- | --- |"]
    failed = {f["variant"] for f in result.get("failures", [])}
    for variant, s in result["summary"].items():
        verified = "yes" if s["verified"] and variant not in failed else "no"
        lines.append(f"| {variant} | {s['engine_ms']:.0f} | {s['time_ratio']:.2f}x | {s['best_time_ratio']:.2f}x | "
                     f"{s['best_memory_ratio']:.2f}x | {s['ideal_fraction']:.0%} | {verified} |")
    caveats = _caveats(result)
    return "\n".join(lines + ([""] + caveats if caveats else []))


BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def write_into_readme(table: str, readme: Path) -> None:
    """Replace what stands between the README's bench-table markers with ``table``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"report: {readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bread_kernels.bench.report",
                                     description="the README's markdown table from saved model-suite JSONs")
    parser.add_argument("results", nargs="+", help="bench_model_*.json files")
    parser.add_argument("--readme", help="write the tables between this file's bench-table markers")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    for f in args.results:
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"report: {f}: {exc}; give a bench_model_*.json the model suite wrote") from None
    tables = "\n\n".join(markdown_table(result) + f"\n\n(`{Path(f).as_posix()}`)"
                          for f, result in zip(args.results, results))
    if args.readme:
        write_into_readme(tables, Path(args.readme))
    print(tables)


if __name__ == "__main__":
    main()
