"""Step time, memory and collectives of the ZeRO-3 integration against DeepSpeed's plain BAdam path.

    torchrun --nproc_per_node 2 python/zero3_bench.py [--out bench/results/zero3_cpu.txt]

Variants (one Llama from a config, fp32, the same active block, no switch during the timed steps):

* ``ds-plain-badam``: an unpatched model, every parameter outside the active block ``requires_grad=False``, the
  active block's AdamW given to ``deepspeed.initialize`` — what BAdam under DeepSpeed amounts to;
* ``bread-badam``: patched model + ``ZeroBlockOptimizer(sgd_mode="disabled")``;
* ``bread-sgd-all``, ``bread-sign-all``, ``bread-sgd-partial``: the on-the-fly updates on the shards;
* ``-keep``: the same with ``patch(model, recompute=False)`` (activations kept instead of recomputed).

Per variant: median and 20/80% quantiles of the step time (forward + ``engine.backward`` + ``engine.step``) over
the timed steps; every collective per step with its bytes (DeepSpeed's, counted on its communication backend,
and this library's, from ``sharded_update.comm_stats``); the peak of live bytes allocated during one step
(profiler memory events, CPU); ``.grad`` bytes alive after the backward.  Then the update of one large synthetic
weight alone: the peak extra bytes of ``reduce_scatter_update_`` with the default chunk budget and a small one,
against the size of its full dW; and the time of one block switch (stage-3 optimizer rebuild).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

LAYERS, HIDDEN, INTER, VOCAB, SEQ, MICRO = 4, 256, 688, 4096, 128, 4
ACTIVE = 1
DS_COUNTED = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather", "broadcast",
              "reduce_scatter", "all_to_all_single", "inference_all_reduce")


class DsCounter:
    """Counts the collectives DeepSpeed issues through its communication backend (``deepspeed.comm``'s ``cdb``)."""

    def __init__(self):
        self.calls, self.bytes, self.enabled = {}, {}, False

    def install(self):
        import deepspeed.comm.comm as ds_comm

        backend = ds_comm.cdb
        for name in DS_COUNTED:
            original = getattr(backend, name, None)
            if original is None:
                continue

            def wrapped(*args, _orig=original, _name=name, **kwargs):
                if self.enabled:
                    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
                    if _name in ("all_gather_into_tensor", "all_gather"):
                        sent = kwargs.get("input_tensor", tensors[-1] if tensors else None)
                    else:
                        sent = kwargs.get("input_tensor", kwargs.get("tensor", tensors[-1] if tensors else None))
                    nbytes = sent.numel() * sent.element_size() if isinstance(sent, torch.Tensor) else 0
                    self.calls[_name] = self.calls.get(_name, 0) + 1
                    self.bytes[_name] = self.bytes.get(_name, 0) + nbytes
                return _orig(*args, **kwargs)

            setattr(backend, name, wrapped)

    def reset(self):
        self.calls, self.bytes = {}, {}


def build_model():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    return model


def ds_config():
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 2e6, "stage3_prefetch_bucket_size": 2e6,
                                  "stage3_param_persistence_threshold": 10 * HIDDEN},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def make_engine(variant: str):
    import deepspeed

    from bread_kernels import patch
    from bread_kernels.integrations import deepspeed as bkds

    model = build_model()
    if variant == "ds-plain-badam":
        prefix = f"model.layers.{ACTIVE}."
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefix))
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=ds_config())
        return engine, engine, None
    keep = variant.endswith("-keep")  # recompute=False: activations kept, as the plain path does
    sgd_mode, sign = {"bread-badam": ("disabled", False), "bread-sgd-all": ("all", False),
                      "bread-sign-all": ("all", True), "bread-sgd-partial": ("partial", False)}[
        variant.removesuffix("-keep")]
    model = patch(model, recompute=not keep)
    opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), list(model.named_parameters()),
                                  switch_block_every=10 ** 6, switch_mode="fixed", start_block=ACTIVE,
                                  sgd_mode=sgd_mode, sgd_use_sign=sign, verbose=0)
    wrapped = bkds.initialize(model, opt, config=ds_config())
    return wrapped, wrapped.engine, opt


def data(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step * 100 + rank)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen)


def one_step(engine, step, rank):
    ids = data(step, rank)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters()
                     if p.grad is not None)
    engine.step()
    return grad_bytes


def run_variant(variant, rank, counter, warmup, timed):
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.integrations.sharded_update import comm_stats

    engine, ds_engine, _ = make_engine(variant)
    for s in range(warmup):
        one_step(engine, s, rank)
    counter.reset()
    comm_stats.reset()
    counter.enabled = True
    times, grad_bytes = [], 0
    for s in range(warmup, warmup + timed):
        dist.barrier()
        start = time.perf_counter()
        grad_bytes = max(grad_bytes, one_step(engine, s, rank))
        times.append(time.perf_counter() - start)
    counter.enabled = False
    ds_calls = {k: v / timed for k, v in counter.calls.items()}
    ds_bytes = {k: v / timed for k, v in counter.bytes.items()}
    ours_calls = {k: v / timed for k, v in comm_stats.calls.items()}
    ours_bytes = {k: v / timed for k, v in comm_stats.bytes.items()}
    trace = trace_allocations(lambda: one_step(engine, warmup + timed, rank))
    ds_engine.destroy()
    q = statistics.quantiles(times, n=5)
    return dict(variant=variant, median=statistics.median(times), q20=q[0], q80=q[-1], ds_calls=ds_calls,
                ds_bytes=ds_bytes, ours_calls=ours_calls, ours_bytes=ours_bytes, peak=trace.peak_bytes,
                largest=trace.largest_bytes, grad_bytes=grad_bytes)


def chunk_memory(rank, world):
    """Peak extra bytes of one fp32 weight's sharded update (native backend), default vs a 1 MiB chunk budget,
    for two weight sizes: with the small budget the peak does not grow with the weight."""
    from bread_kernels.bench.memory import trace_allocations
    from bread_kernels.integrations.sharded_update import (ShardLayout, linear_grad_fill, reduce_scatter_update_)
    from bread_kernels.plan import Rounding

    from bread_kernels.integrations import sharded_update

    def local_reduce_scatter(out, send, op=None, group=None, async_op=False):
        """Stands in for the collective: this rank's slice of its own send buffer, allocating nothing."""
        out.copy_(send.view(world, -1)[rank])
        return _Done()

    tokens = MICRO * SEQ
    rows = []
    real = sharded_update._REDUCE_SCATTER
    for stub, (n_out, n_in) in [(False, (2048, 2048)), (False, (4096, 2048)), (True, (2048, 2048)),
                                (True, (4096, 2048))]:
        sharded_update._REDUCE_SCATTER = local_reduce_scatter if stub else real
        g, x = torch.randn(tokens, n_out), torch.randn(tokens, n_in)
        n = n_out * n_in
        layout = ShardLayout(None, world, rank, n, -(-n // world))
        shard = torch.zeros(layout.shard_numel)
        for budget in (None, 1 << 20):
            def run():
                reduce_scatter_update_(shard, layout, linear_grad_fill(g, x), step=1e-3, sign=False,
                                       rounding=Rounding.NEAREST, seed=0, divisor=world, locally_finite=True,
                                       budget_bytes=budget)
            run()
            trace = trace_allocations(run)
            rows.append(((n_out, n_in), n * 4, budget, trace.peak_bytes, trace.largest_bytes, stub))
    sharded_update._REDUCE_SCATTER = real
    return rows


class _Done:
    def wait(self):
        return True


def switch_time(rank):
    engine, ds_engine, opt = make_engine("bread-sgd-all")
    one_step(engine, 0, rank)
    times = []
    for block in (2, 3):
        opt._activate(block)
        dist.barrier()
        start = time.perf_counter()
        engine._rebuild_zero_optimizer()
        times.append(time.perf_counter() - start)
        one_step(engine, 1, rank)
    ds_engine.destroy()
    return times


def fmt_bytes(d):
    return ", ".join(f"{k} {v:.0f}× {int(d[1].get(k, 0)):,} B" for k, v in sorted(d[0].items())) or "none"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=8)
    parser.add_argument("--only-chunks", action="store_true", help="only the one-weight update memory")
    parser.add_argument("--variants", default="ds-plain-badam,bread-badam,bread-badam-keep,bread-sgd-partial,"
                                              "bread-sgd-all,bread-sgd-all-keep,bread-sign-all")
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    counter = DsCounter()
    counter.install()
    chunk_rows = chunk_memory(rank, world)
    if args.only_chunks:
        if rank == 0:
            for row in chunk_rows:
                print(row)
        deepspeed.comm.destroy_process_group()  # drops DeepSpeed's references to the groups too
        return
    results = [run_variant(v, rank, counter, args.warmup, args.timed) for v in args.variants.split(",")]
    switches = switch_time(rank)
    if rank == 0:
        n_params = sum(p.numel() for p in build_model().parameters())
        lines = [
            f"ZeRO-3 integration on {world} CPU ranks (gloo, DeepSpeed {deepspeed.__version__}, torch "
            f"{torch.__version__}), {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} thread(s) per rank",
            f"model: Llama {LAYERS} layers, hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB} ({n_params:,} params, "
            f"fp32); micro-batch {MICRO}x{SEQ} tokens per rank; active block: layer {ACTIVE}; "
            f"{args.timed} timed steps after {args.warmup} warm-up",
            "",
            "step time (forward + engine.backward + engine.step), rank 0, seconds: median [20%, 80%]",
        ]
        base = results[0]["median"]
        for r in results:
            lines.append(f"  {r['variant']:<19} {r['median']:.3f} [{r['q20']:.3f}, {r['q80']:.3f}]  "
                         f"x{r['median'] / base:.2f} of ds-plain-badam")
        lines += ["", "collectives per step and rank (calls, bytes handed to the collective)"]
        for r in results:
            lines.append(f"  {r['variant']:<19} DeepSpeed: {fmt_bytes((r['ds_calls'], r['ds_bytes']))}")
            lines.append(f"  {'':<19} bread_kernels: {fmt_bytes((r['ours_calls'], r['ours_bytes']))}")
        lines += ["", "memory of one step, rank 0 (profiler memory events: peak of live bytes allocated during "
                      "the step; .grad bytes alive after the backward)"]
        for r in results:
            lines.append(f"  {r['variant']:<19} peak {r['peak'] / 2**20:8.2f} MiB, largest allocation "
                         f"{r['largest'] / 2**20:6.2f} MiB, .grad after backward {r['grad_bytes'] / 2**20:6.2f} MiB")
        lines += ["", f"one fp32 weight's sharded update alone, rank 0 ({MICRO * SEQ} tokens; native backend): peak of "
                      "live extra bytes. Ours: send w(S+1) + receive S+1 fp32 + one GEMM block of <= S+2K "
                      "elements; gloo's reduce_scatter adds about two receive-sized buffers and a copy of the send "
                      "buffer"]
        for shape, full_dw, budget, peak, largest, stub in chunk_rows:
            name = "default 32 MiB" if budget is None else f"{budget / 2**20:.0f} MiB"
            lines.append(f"  {'collective stubbed (ours only)' if stub else 'gloo reduce_scatter':<31} "
                         f"{shape[0]}x{shape[1]} (full dW {full_dw / 2**20:.0f} MiB), chunk budget {name:<15} "
                         f"peak extra {peak / 2**20:6.2f} MiB, largest allocation {largest / 2**20:6.2f} MiB")
        lines += ["", "block switch (stage-3 optimizer rebuild), rank 0: " +
                  ", ".join(f"{t:.3f} s" for t in switches)]
        text = "\n".join(lines)
        print(text)
        if args.out:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.barrier()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
