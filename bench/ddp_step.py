"""BREAD-SGD under DistributedDataParallel: peak memory and time of one forward + backward on each rank, with the
on-the-fly updates averaged over the ranks.  Run with torchrun (CPU ranks over gloo, GPU ranks over NCCL):

    torchrun --nproc_per_node 2 bench/ddp_step.py [--dtype bf16] [--variants BREAD-SGD BAdam] [--active 1]

The bench's default model (Llama 8x512, inter 1376, vocab 4096; ``--moe``: a Qwen3-MoE 8x512, 8 experts of
intermediate 512, top 2), batch 2x256 per rank, ``patch`` defaults
(``--keep-top 0``: no kept block, so the peak does not depend on what ``"auto"`` measured).  Peaks
come from the profiler's allocation events (``bread_kernels.bench.memory``: bytes allocated beyond what existed
before the step, CPU) or the caching allocator (GPU); times are medians over ``--repeats`` steps.  Rank 0 prints one
line per variant.  To compare two versions of the library, run it with each on ``PYTHONPATH``.
"""

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bread_kernels import patch
from bread_kernels.bench.linear import device_name
from bread_kernels.bench.memory import trace_allocations
from bread_kernels.bench.model import _optimizer, build_model
try:
    from bread_kernels.collectives import comm_stats
except ImportError:  # a version before collectives.py (averaged at the end of the backward only)
    from bread_kernels.integrations.sharded_update import comm_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--variants", nargs="+", default=["BREAD-SGD", "BREAD-SGD-partial", "BAdam"])
    parser.add_argument("--active", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE 8x512 (8 experts, top 2) instead of the Llama")
    parser.add_argument("--keep-top", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="patch(keep_top=...): 'auto' (the default) or how many top blocks keep activations")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=generator).to(device)
    if rank == 0:
        print(f"DDP over {dist.get_world_size()} ranks ({dist.get_backend()}) on {device_name(device)}; "
              f"{'Qwen3-MoE' if args.moe else 'Llama'} 8x512, {args.dtype}, batch {args.batch}x{args.seq} "
              f"per rank, active block {args.active}, keep_top={args.keep_top}")
    for variant in args.variants:
        model = patch((build_moe(dtype) if args.moe else build_model(dtype=dtype)).to(device), keep_top=args.keep_top)
        opt = _optimizer(model, variant, args.active, lr=1e-6)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)

        def step():
            ddp(input_ids=ids, labels=ids).loss.backward()

        step()
        opt.zero_grad()
        peak = trace_allocations(step, device).peak_bytes
        opt.zero_grad()
        times = []
        comm_stats.reset()
        for _ in range(args.repeats):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            opt.zero_grad()
        calls = {op: n // args.repeats for op, n in comm_stats.calls.items()}
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        if rank == 0:
            print(f"{variant:18s} peak {peak / 2**20:7.1f} MiB  step {statistics.median(times) * 1e3:7.1f} ms  "
                  f"requires-grad params {grads / 2**20:6.1f} MiB  in-backward collectives/step {calls}")
        del ddp, opt, model
    dist.destroy_process_group()


def build_moe(dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Qwen3-MoE 8x512: 8 experts of intermediate 512 per layer, top 2, vocab 4096."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=8, head_dim=64, moe_intermediate_size=512, intermediate_size=1376,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
                            tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return Qwen3MoeForCausalLM(config).to(dtype)


if __name__ == "__main__":
    main()
