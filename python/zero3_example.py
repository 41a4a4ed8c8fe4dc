"""BREAD-SGD / BAdam under DeepSpeed ZeRO-3, on CPUs or GPUs.

    deepspeed --num_gpus 2 python/zero3_example.py                  # 2 ranks: GPUs, or CPU processes (gloo)
    deepspeed --num_gpus 2 python/zero3_example.py --sgd-mode disabled   # BAdam
    torchrun --nproc_per_node 2 python/zero3_example.py --gas 2 --sign-sgd
    deepspeed --num_gpus 2 python/zero3_example.py --steps 3 --save ckpt     # then, resumed exactly:
    deepspeed --num_gpus 2 python/zero3_example.py --steps 6 --resume ckpt
    deepspeed --num_gpus 2 python/zero3_example.py --trainer --steps 3 --save out   # the HF Trainer, deepspeed=
    deepspeed --num_gpus 2 python/zero3_example.py --trainer --steps 6 --resume out/checkpoint-3  # resumed by it
    deepspeed --num_gpus 2 python/zero3_example.py --steps 6 --resume out/checkpoint-3   # or in the loop

A Llama model is built from a small config (random init, nothing downloaded).  The text is a file's bytes
(``--text``, vocabulary 256) or random tokens.  Each rank trains on its own slice of the data; the active block
goes through DeepSpeed's optimizer and switches every ``--switch-every`` steps, the other blocks take the
on-the-fly update inside the backward (``bread_kernels.integrations.deepspeed``).  ``--trainer`` trains the same
model with the Hugging Face Trainer (``deepspeed=`` the same config, ``BreadTrainerMixin``, the block optimizer from
its ``create_optimizer``) on the same windows of the data, in the Trainer's order; ``--resume`` is then its
``resume_from_checkpoint``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
import transformers  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--switch-every", type=int, default=2)
    p.add_argument("--sgd-mode", choices=["disabled", "all", "partial"], default="all")
    # not --sign: torchrun takes that for its own --signals-to-handle
    p.add_argument("--sign-sgd", action="store_true", help="signSGD for the inactive blocks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sgd-scaling", type=float, default=0.5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--text", default=None, help="a text file whose bytes are the training tokens")
    p.add_argument("--save", default=None, help="save a checkpoint into this folder after the last step")
    p.add_argument("--resume", default=None, help="resume from a folder --save wrote (--steps counts the whole "
                                                  "run's steps, those before the save included)")
    p.add_argument("--trainer", action="store_true", help="train with the Hugging Face Trainer (--save: its "
                                                          "output_dir, checkpoint-<steps> at the end; --resume: a "
                                                          "checkpoint-<step> folder it resumes from)")
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    return p.parse_args()


def main():
    args = parse_args()
    import deepspeed
    import torch.distributed as dist

    from bread_kernels import patch
    from bread_kernels.integrations.deepspeed import ZeroBlockOptimizer, initialize

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = 256 if args.text else 512
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)  # every rank builds the same initial model; ZeRO-3 keeps each rank's shard of it
    model = patch(transformers.LlamaForCausalLM(config))

    def block_optimizer():
        return ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), list(model.named_parameters()),
                                  switch_block_every=args.switch_every, switch_mode="descending",
                                  sgd_mode=args.sgd_mode, sgd_use_sign=args.sign_sgd, sgd_lr_scaling=args.sgd_scaling,
                                  verbose=1 if rank == 0 else 0)

    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.gas,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 1e6, "stage3_prefetch_bucket_size": 1e6,
                              "stage3_param_persistence_threshold": 10 * args.hidden},
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10 ** 9,
    }
    if args.text:
        data = torch.frombuffer(bytearray(open(args.text, "rb").read()), dtype=torch.uint8).long()
    else:
        data = torch.randint(0, vocab, (1 << 16,), generator=torch.Generator().manual_seed(1))
    if args.trainer:
        train_with_trainer(args, model, block_optimizer, ds_config, data, world)
        deepspeed.comm.destroy_process_group()
        return
    opt = block_optimizer()
    engine = initialize(model, opt, config=ds_config)
    per_step = args.micro_batch * args.seq

    def batch(step: int, micro: int) -> torch.Tensor:
        index = ((step * args.gas + micro) * world + rank) * per_step % max(1, data.numel() - per_step)
        return data[index: index + per_step].view(args.micro_batch, args.seq).to(engine.device)

    first = 0
    if args.resume:  # into an engine that has not trained yet: the block schedule, weights and optimizer state
        engine.load_checkpoint(args.resume)
        first = opt.global_step
    for step in range(first, args.steps):
        start, total = time.perf_counter(), 0.0
        trained = opt.order.current  # the block this step trains (the step may switch to the next)
        for micro in range(args.gas):
            ids = batch(step, micro)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.item() / args.gas
        if rank == 0:
            print(f"step {step}: loss {total:.4f}  ({time.perf_counter() - start:.2f} s, active block "
                  f"{trained}, {engine.switches} switches)", flush=True)
    if args.save:
        engine.save_checkpoint(args.save)  # every rank; the block schedule goes beside DeepSpeed's files
    engine.destroy()
    # the process groups must go while Python is alive: a gloo worker thread that drops a collective's tensors during
    # interpreter shutdown aborts the process ("terminate called without an active exception").  So the model (its
    # parameters hold their group) is freed here, and DeepSpeed's destroy also drops its own references to the groups
    del engine, opt, model, loss
    gc.collect()
    deepspeed.comm.destroy_process_group()


def train_with_trainer(args, model, block_optimizer, ds_config, data, world):
    """The Hugging Face Trainer with ``deepspeed=ds_config``: its ``create_optimizer`` returns the block optimizer
    and ``BreadTrainerMixin`` (through the BreadCallback it adds) connects the engine the Trainer makes
    (``bread_kernels.integrations.deepspeed.trainer``) before the Trainer loads ``resume_from_checkpoint``."""
    import torch.distributed as dist

    from bread_kernels.integrations.transformers import BreadTrainerMixin

    class BlockTrainer(BreadTrainerMixin, transformers.Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = block_optimizer()
            return self.optimizer

    class PrintLoss(transformers.TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kwargs):
            if dist.get_rank() == 0 and logs and "loss" in logs:
                print(f"trainer step {state.global_step - 1}: loss {logs['loss']:.4f}", flush=True)

    # the same windows whatever --steps is, so a run resumed with more steps sees the saved run's order of the data
    rows = min(max(1, data.numel() // args.seq - 1), 1 << 16)
    windows = [{"input_ids": data[i * args.seq:(i + 1) * args.seq], "labels": data[i * args.seq:(i + 1) * args.seq]}
               for i in range(rows)]
    targs = transformers.TrainingArguments(
        output_dir=args.save or "zero3_trainer_output", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.gas, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to="none",
        save_strategy="steps" if args.save else "no", save_steps=args.steps, bf16=args.bf16,
        deepspeed={**ds_config, "gradient_clipping": 0.0}, disable_tqdm=True)
    trainer = BlockTrainer(model=model, args=targs, train_dataset=windows, callbacks=[PrintLoss()])
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.model_wrapped.destroy()  # the integration's destroy (routed): the model leaves DeepSpeed's globals
    del trainer
    gc.collect()


if __name__ == "__main__":
    main()
