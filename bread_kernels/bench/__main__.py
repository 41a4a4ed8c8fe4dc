"""``python -m bread_kernels.bench [model|linear|lora|host] [options]`` (also ``bread-bench``): run a benchmark.

The default is the model suite (:mod:`bread_kernels.bench.model`): every BCD variant through the engine against the
reference run as its users run it and configured as well as it can be, each verified to compute the same step
before it is timed; a table on stdout, a JSON and a PNG in ``--out``.  ``linear`` times one fused linear backward
(SGD / SIGN update against autograd plus a hook), ``lora`` one LoRA layer's backward against peft, ``host`` the
host time of one fused linear backward and forward on tiny shapes (µs per call, against ``nn.Linear`` plus a hook).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _fail(message: str):
    print(f"bread-bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    from . import model

    # an option not given is absent from the namespace (argument_default=SUPPRESS), so that a suite can refuse every
    # option it does not read; the defaults are filled in after that check (DEFAULTS)
    parser = argparse.ArgumentParser(prog="python -m bread_kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("suite", nargs="?", default="model", help="model (default), linear, lora or host")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (model suite default: fp32 on a CPU, bf16 on a GPU)")
    parser.add_argument("--repeats", type=int,
                        help="timed repeats (model: 2 on a CPU, 5 on a GPU; linear/lora: 5)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    group = parser.add_argument_group("model suite")
    group.add_argument("--model", help="a local Hugging Face checkpoint directory or config JSON (no downloads); "
                                       "default: a Llama built from a config sized for the device")
    group.add_argument("--variants", nargs="+", metavar="VARIANT",
                       help=f"any of {', '.join(model.VARIANTS)}")
    group.add_argument("--positions", type=int, nargs="+", help="active block indices (default: the 2nd and "
                                                                "2nd-to-last; the middle too on a GPU)")
    group.add_argument("--batch", type=int)
    group.add_argument("--seq", type=int)
    group.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                       help="engine recompute and reference gradient checkpointing (default on)")
    group.add_argument("--keep-top", metavar="auto|N",
                       help="the engine's patch(keep_top=...): 'auto' (default) or how many top blocks keep their "
                            "activations (0: recompute every block); the memory-for-time trade")
    group.add_argument("--lora-rank", type=int, help="rank of the LoRA variants' adapters (model suite) and of the "
                                                     "lora suite's layer (default 8)")
    group.add_argument("--out", help="directory for the JSON and PNG (default: the current one)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    group.add_argument("--profile", action="store_true",
                       help="also profile one forward + backward per side: GEMM calls and the time outside the GEMMs")
    for name in ("layers", "hidden", "intermediate", "heads", "kv-heads", "vocab"):
        group.add_argument(f"--{name}", type=int, help="size of the embedded default model")
    group = parser.add_argument_group("linear and lora suites")
    group.add_argument("--out-features", type=int, help="default 5632")
    group.add_argument("--in-features", type=int, help="default 2048")
    group.add_argument("--tokens", type=int, help="default 2048")
    args = parser.parse_args(argv)

    if args.suite not in SUITE_OPTIONS:
        _fail(f"unknown suite {args.suite!r}; choose from model, linear, lora, host")
    _check_suite_options(args)
    args = argparse.Namespace(**{**_defaults(), **vars(args)})
    if args.dtype is not None and args.dtype not in DTYPES:
        _fail(f"unknown dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    if args.repeats is not None and args.repeats < 1:
        _fail(f"--repeats must be at least 1, got {args.repeats}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    device = _check_device(args.device)
    if args.suite == "model":  # first: a size flag beside --model is refused as such, not checked as a size
        _check_model_options(args, model)
    # the embedded default model's shape: what a size flag not given stands for
    _check_sizes(args, model.default_setup(device)["shape"] if args.suite == "model" and not args.model else {})
    if args.suite == "model":
        _check_out(args.out, _output_names(device, dtype or model.default_setup(device)["dtype"]))
    try:
        _run_suite(args, dtype, device)
    except KeyboardInterrupt as stop:
        written = getattr(stop, "partial_json", None)  # set by the model suite once a case's JSON was written
        print("bread-bench: interrupted" + (f"; the cases measured so far are in {written} (marked \"partial\": true)"
                                            if written else "; nothing was written"), file=sys.stderr)
        sys.exit(130)
    except model.VerificationError as exc:
        print(f"bread-bench: verification failed (a failed case is not timed): {exc}", file=sys.stderr)
        sys.exit(VERIFICATION_FAILED)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


#: the exit status of a run whose engine and reference computed different steps (2: the input was refused)
VERIFICATION_FAILED = 3


def _run_suite(args, dtype, device) -> None:
    """The suite ``args.suite`` on checked arguments; every suite's errors are handled alike by the caller."""
    from . import host, linear, lora, model

    if args.suite == "linear":
        linear.run(args.out_features, args.in_features, args.tokens, dtype or torch.float32, args.repeats or 5,
                   args.device)
    elif args.suite == "host":
        host.run(dtype or torch.float32, args.device)
    elif args.suite == "lora":
        lora.run(args.out_features, args.in_features, args.tokens, args.lora_rank, dtype or torch.float32,
                 args.repeats or 5, args.device)
    else:
        model.run(args.model, tuple(args.variants), args.positions, args.batch, args.seq, dtype, args.repeats,
                  args.recompute, args.lora_rank, args.device, args.out, not args.no_progress, profile=args.profile,
                  keep_top=_keep_top(args.keep_top), **_shape(args))


def _keep_top(text: str):
    """``--keep-top``: ``"auto"`` or a number of top blocks (``int``: ``str.isdigit`` accepts ``²``)."""
    keep_top = text.strip().lower()
    if keep_top == "auto":
        return keep_top
    try:
        number = int(keep_top)
    except ValueError:
        number = -1
    if number < 0:
        _fail(f"--keep-top must be 'auto' or a number of top blocks, got {text!r}")
    return number


def _shape(args) -> dict:
    return {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden), ("intermediate", args.intermediate),
                              ("heads", args.heads), ("kv_heads", args.kv_heads), ("vocab", args.vocab))
            if v is not None}


def _check_model_options(args, model) -> None:
    """The model suite's variants, sizes and keep_top, refused before anything is built (a variant or a position
    given twice is refused by :func:`.model.run`, also before)."""
    unknown = [v for v in args.variants if v not in model.VARIANTS]
    if unknown:
        _fail(f"unknown variant {unknown[0]!r}; choose from {', '.join(model.VARIANTS)}")
    if _shape(args) and args.model:
        _fail("--layers/--hidden/... size the embedded default model; they cannot be combined with --model")
    _keep_top(args.keep_top)


def _output_names(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The file names the model suite writes into ``--out`` (:func:`.report.output_stem`)."""
    from .report import output_stem

    stem = output_stem({"device_type": device.type, "dtype": str(dtype).removeprefix("torch.")})
    return [f"{stem}.json", f"{stem}.png"]


#: the options each suite reads (argparse dests); any other one given is refused, not ignored
SUITE_OPTIONS = {
    "model": ("dtype", "repeats", "device", "model", "variants", "positions", "batch", "seq", "recompute", "keep_top",
              "lora_rank", "out", "no_progress", "profile", "layers", "hidden", "intermediate", "heads", "kv_heads",
              "vocab"),
    "linear": ("dtype", "repeats", "device", "out_features", "in_features", "tokens"),
    "lora": ("dtype", "repeats", "device", "out_features", "in_features", "tokens", "lora_rank"),
    "host": ("dtype", "device"),
}


def _defaults() -> dict:
    """What an option not given stands for (``None``: the suite's own default, e.g. the device's for the model)."""
    from .model import ALL_VARIANTS

    defaults = {dest: None for options in SUITE_OPTIONS.values() for dest in options}
    defaults.update(device="cuda" if torch.cuda.is_available() else "cpu", variants=list(ALL_VARIANTS),
                    recompute=True, keep_top="auto", lora_rank=8, out=".", no_progress=False, profile=False,
                    out_features=5632, in_features=2048, tokens=2048)
    return defaults


def _flag(dest: str, value) -> str:
    return "--no-recompute" if dest == "recompute" and value is False else f"--{dest.replace('_', '-')}"


def _check_suite_options(args) -> None:
    """Refuse the first option given (in command-line order) that ``args.suite`` does not read, naming the suites
    that do: ``linear --seq 3`` printed the linear table as if the option meant something."""
    takes = SUITE_OPTIONS[args.suite]
    for dest, value in vars(args).items():
        if dest == "suite" or dest in takes:
            continue
        flag = _flag(dest, value)
        if args.suite == "host" and dest == "repeats":
            _fail("the host suite takes no --repeats: it reports the median of 1000 calls")
        owners = " and ".join(suite for suite, options in SUITE_OPTIONS.items() if dest in options)
        plural = "s" if " and " in owners else ""
        if args.suite == "model":
            _fail(f"{flag} is an option of the {owners} suite{plural}; the model suite does not read it (see --help "
                  "for its options)")
        _fail(f"{flag} is an option of the {owners} suite{plural}; the {args.suite} suite prints its table and takes "
              f"{', '.join(_flag(d, None) for d in takes)}")


def _check_device(spec: str) -> torch.device:
    """A CPU, or a CUDA device this machine has: the suites synchronise, name and measure only those (another type
    gave tracebacks, and the lora suite timings labelled with the CPU's name)."""
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        _fail(f"--device {spec!r}: {str(exc).splitlines()[0]}")
    if device.type not in ("cpu", "cuda"):
        _fail(f"--device {spec}: the bench runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {spec}: this torch has no CUDA device (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        _fail(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _check_sizes(args, defaults: dict) -> None:
    """Sizes a run cannot take, refused before anything is built (0 was read as "the default").  ``defaults``: the
    embedded default model's shape for the device (empty where no default model is built), which a size flag not
    given stands for: ``--heads 3`` alone is checked against the default hidden size."""
    for name in ("batch", "seq", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "lora_rank",
                 "out_features", "in_features", "tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seq is not None and args.seq < 2:
        _fail(f"--seq must be at least 2, got {args.seq}: a causal LM's loss scores each token by the ones before "
              "it, so a sequence of one token scores none (a NaN loss, no gradient, nothing to verify or time)")
    if args.layers is not None and args.layers < 2:
        _fail(f"--layers must be at least 2 (the engine streams a stack of blocks), got {args.layers}")
    def size(name):  # (value, how it is named in a message)
        value = getattr(args, name)
        flag = f"--{name.replace('_', '-')}"
        if value is not None:
            return value, f"{flag} {value}"
        return defaults.get(name), f"{flag} {defaults.get(name)} (the default model's)"

    (hidden, hidden_said), (heads, heads_said) = size("hidden"), size("heads")
    kv_heads, kv_said = size("kv_heads")
    if kv_heads is None and heads is not None:  # the default model has as many KV heads as heads unless told
        kv_heads, kv_said = heads, None
    if heads is not None and hidden is not None and hidden % heads:
        _fail(f"{hidden_said} is not a multiple of {heads_said}")
    if kv_said is not None and heads is not None and heads % kv_heads:
        _fail(f"{heads_said} is not a multiple of {kv_said}")


def _check_out(out: str, names: list[str] = ()) -> None:
    """``--out`` must be a directory this run can write, its output files (``names``) included, checked before
    minutes of measuring (a directory in a file's place failed after the first case)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        _fail(f"--out {out!r} is a file; give a directory for the JSON and PNG")
    for name in names:
        if (path / name).is_dir():
            _fail(f"--out {out!r}: {name} is a directory where the run writes a file; remove it or give another "
                  "--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        _fail(f"--out {out!r} cannot be written: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
