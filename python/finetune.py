"""Finetune a Llama-style model with one of the BCD methods on real text, with exact resume.

    python python/finetune.py --data ../shared/data/lima.json --method bread-sgd --steps 300 --out runs/bread-sgd
    python python/finetune.py --out runs/bread-sgd --resume          # continues from the last checkpoint in DIR

Model: an embedded small Llama (random init; a byte-level tokenizer: ids 0 pad, 1 bos, 2 eos, 3 + byte), sized by
``--layers/--hidden/--intermediate/--heads``, or ``--model PATH`` (a local Hugging Face checkpoint with its
tokenizer; nothing is downloaded).  Data: LIMA-style JSON records ``{instruction, input, output}`` (the loss is on
the response tokens only) or a plain text file (cut into ``--seq-len`` windows, loss on every token).  Examples
are drawn in a seeded permutation per epoch, so the data position is one integer.

Methods: ``adam`` (AdamW on every parameter), ``badam``, ``bread`` / ``bread-partial`` (peft LoRA adapters of rank
``--rank`` as the landscape correction, BREAD's initialisation), ``bread-sgd`` / ``bread-sgd-partial`` /
``bread-sign`` (the on-the-fly SGD / signSGD correction), ``lora`` (peft LoRA alone).  The BCD methods run on
``bread_kernels.patch`` + ``BlockOptimizer``.

Writes ``DIR/log.jsonl`` (one JSON object per optimizer step: ``step``, ``loss``, ``lr``, ``active_block``,
``seconds`` — training wall-clock so far — and ``tokens``), ``DIR/config.json`` (the arguments), and
``DIR/checkpoint.pt`` every ``--save-every`` steps and at the end (model, optimizer with
``BlockOptimizer.state_dict()``, scheduler, data position, RNG states).  ``--resume`` reloads the run's arguments
(``--steps`` may be raised) and continues; the losses are those of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch

METHODS = ("adam", "badam", "bread", "bread-partial", "bread-sgd", "bread-sgd-partial", "bread-sign", "lora")
BCD = {"badam": dict(), "bread": dict(lora_mode="all"), "bread-partial": dict(lora_mode="partial"),
       "bread-sgd": dict(sgd_mode="all"), "bread-sgd-partial": dict(sgd_mode="partial"),
       "bread-sign": dict(sgd_mode="all", sgd_use_sign=True)}
LORA_METHODS = ("bread", "bread-partial", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
#: what a resumed run may change; every other argument is the run's own
RESUMABLE = ("steps", "save_every", "no_progress", "resume", "out")


class ByteTokenizer:
    """Bytes as ids (3 + byte), with pad 0, bos 1, eos 2: no vocabulary file, any text."""

    vocab_size = 256 + BYTE_OFFSET
    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]


class HFTokenizer:
    """A local Hugging Face tokenizer, as the byte tokenizer's interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.bos_token_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


# -- data ------------------------------------------------------------------------------------------------------
def load_examples(path: str, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) pairs: LIMA records with the loss on the response only, or text windows."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"finetune: --data {path!r} is not a file (a LIMA-style JSON or a text file)")
    if file.suffix == ".json":
        try:
            records = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"finetune: --data {path!r} is not valid JSON ({exc})") from None
        if not isinstance(records, list) or not records or not all(
                isinstance(r, dict) and {"instruction", "output"} <= set(r) for r in records):
            raise SystemExit(f"finetune: --data {path!r} must be a JSON list of records with 'instruction', "
                             "'output' (and optionally 'input')")
        examples = []
        for record in records:
            prompt = record["instruction"] + (("\n" + record["input"]) if record.get("input") else "") + "\n\n"
            prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt)
            response_ids = tokenizer.encode(record["output"]) + [tokenizer.eos_token_id]
            ids = (prompt_ids + response_ids)[:seq_len]
            labels = ([-100] * len(prompt_ids) + response_ids)[:seq_len]
            if any(label != -100 for label in labels[1:]):  # a prompt longer than seq_len leaves nothing to learn
                examples.append((ids, labels))
        return examples
    ids = tokenizer.encode(file.read_text())
    windows = [ids[i:i + seq_len] for i in range(0, max(1, len(ids) - 1), seq_len)]
    return [(w, list(w)) for w in windows if len(w) > 1]


def batch_at(examples, position: int, batch_size: int, seed: int, pad: int):
    """The batch that starts at example ``position`` of the stream (a seeded permutation per epoch)."""
    ids, labels = [], []
    for k in range(position, position + batch_size):
        epoch, index = divmod(k, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        example_ids, example_labels = examples[int(order[index])]
        ids.append(example_ids)
        labels.append(example_labels)
    width = max(len(i) for i in ids)
    input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
    label_ids = torch.full((batch_size, width), -100, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, (i, lab) in enumerate(zip(ids, labels)):
        input_ids[row, :len(i)] = torch.tensor(i)
        label_ids[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(i)] = 1
    return input_ids, mask, label_ids


# -- model and optimizer ------------------------------------------------------------------------------------------
def build(args, tokenizer):
    import bread_kernels
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=DTYPES[args.dtype])
    else:
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
                             intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.heads,
                             max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False,
                             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    if args.method in LORA_METHODS:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules=LORA_TARGETS, lora_dropout=0.0))
        if args.method != "lora":
            bread_kernels.init_bread_lora_(model)
    model.train()
    if args.method in BCD:
        model = bread_kernels.patch(model)
        base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        optimizer = bread_kernels.BlockOptimizer(
            base, list(model.named_parameters()), switch_block_every=args.switch_every, switch_mode=args.switch_mode,
            sgd_lr_scaling=args.sgd_lr_scaling, verbose=0, seed=args.seed, **BCD[args.method])
    else:
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return model, optimizer, scheduler


def active_block(optimizer):
    order = getattr(optimizer, "order", None)
    return order.current if order is not None else None


# -- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, position: int, seconds: float) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "position": position, "seconds": seconds,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a crash while saving never leaves a half-written checkpoint


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, int, float]:
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"], state["position"], state["seconds"]


# -- the run -------------------------------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lima.json"))
    parser.add_argument("--model", help="a local Hugging Face checkpoint with its tokenizer (default: embedded)")
    parser.add_argument("--method", default="bread-sgd", help=", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=10, help="linear lr warm-up steps")
    parser.add_argument("--switch-every", type=int, default=20, help="BlockOptimizer's switch_block_every")
    parser.add_argument("--switch-mode", default="descending", choices=["descending", "ascending", "random"])
    parser.add_argument("--sgd-lr-scaling", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (bread, bread-partial, lora)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", help=", ".join(DTYPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=344)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", required=True, help="the run's directory")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.dtype not in DTYPES:
        parser.error(f"unknown --dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    for name in ("steps", "batch_size", "seq_len", "save_every", "switch_every", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    checkpoint, log_path, config_path = out / "checkpoint.pt", out / "log.jsonl", out / "config.json"
    if args.resume:
        if not checkpoint.is_file():
            raise SystemExit(f"finetune: --resume, but {checkpoint} does not exist; start the run without --resume")
        saved = json.loads(config_path.read_text())
        args = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in RESUMABLE}})
    else:
        if checkpoint.exists():
            raise SystemExit(f"finetune: {out} already holds a run; pass --resume to continue it or choose another "
                             "--out")
        out.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps({k: v for k, v in vars(args).items()}, indent=2))

    tokenizer = HFTokenizer(args.model) if args.model else ByteTokenizer()
    examples = load_examples(args.data, tokenizer, args.seq_len)
    if not examples:
        raise SystemExit(f"finetune: --data {args.data!r} gave no training example at --seq-len {args.seq_len}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers'/peft's deprecation notes are not this script's output
        model, optimizer, scheduler = build(args, tokenizer)
    step, position, seconds = 0, 0, 0.0
    random.seed(args.seed)
    if args.resume:
        step, position, seconds = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if step >= args.steps:
            raise SystemExit(f"finetune: {out} is at step {step} already; --resume with --steps above it to train on")
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))  # steps after the checkpoint are redone
    else:
        log_path.write_text("")

    from tqdm import tqdm

    records = []
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, file=sys.stderr, unit="step")
    with log_path.open("a") as log:
        while step < args.steps:
            ids, mask, labels = batch_at(examples, position, args.batch_size, args.seed, tokenizer.pad_token_id)
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            block = active_block(optimizer)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if not math.isfinite(loss.item()):
                raise SystemExit(f"finetune: the loss became {loss.item()} at step {step + 1}; lower --lr")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            step += 1
            position += args.batch_size
            record = {"step": step, "loss": loss.item(), "lr": lr, "active_block": block, "seconds": seconds,
                      "tokens": int((labels != -100).sum())}
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            bar.update()
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(checkpoint, model, optimizer, scheduler, step, position, seconds)
    bar.close()
    return records


if __name__ == "__main__":
    main()
