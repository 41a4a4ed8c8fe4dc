"""One rank of the DistributedDataParallel and FSDP2 run of ``test_data_parallel.py`` (torchrun, 2 CPU ranks, gloo).

Each DDP case trains a patched tiny Llama with :class:`bread_kernels.BlockOptimizer` under DDP, each rank on its own
data, and a reference in the same process on the ranks' mean loss — what DDP computes: plain autograd with
torch.optim.SGD over the active block's parameters (the schedule's block at each step) for BAdam; for BREAD (peft
LoRA, ``lora_mode="all"``, whose adapters the single-process tests check against peft's autograd) the same optimizer
in one process.  The Trainer case runs ``transformers.Trainer`` (which wraps the model in DDP after the optimizer is
built) and checks that the ranks end with the same parameters.  The FSDP2 cases (``fully_shard``) record the error
each refusal raises and whether any weight changed.  Writes ``<out>.rank<r>.json``: per case, the largest
|parameter - reference|, how far the reference moved, whether every rank holds the same parameters, and the error a
refused case raised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import threading
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bread_kernels  # noqa: E402
from bread_kernels.collectives import comm_stats  # noqa: E402
from bread_kernels.optim.data_parallel import INDEPENDENT_RANKS_ENV  # noqa: E402
from tests import model_zoo  # noqa: E402
from tests.integrations.ranks import freeze_long_lived_objects  # noqa: E402

STEPS, LR = 4, 0.5
LAYERS = 4
class Case(NamedTuple):
    """One DDP case: BAdam cases are checked against plain autograd, the others against the same optimizer in one
    process."""

    sgd_mode: str  # the optimizer's; "-sign": signSGD
    gas: int  # gradient accumulation micro-batches
    ddp_first: bool = False  # DDP built before the optimizer (a Trainer builds it after)
    #: patch's: 0 fuses every block linear of the tiny models (their updates average inside the backward); 2¹⁷
    #: (patch's default) leaves them small enough for the hook path (averaged at the end of the backward)
    hook_update_numel: int = 0
    #: "gpt2": Conv1D weights stored transposed, biases, a tied head; "qwen3_moe": experts; "llama_strided": a weight
    #: stored column-major
    model: str = "llama"
    dtype: str = "float32"
    chunk_bytes: int | None = None  # BREAD_CHUNK_BYTES: small, so a dW goes through several chunks
    rounding: str = "auto"  # of the low-precision on-the-fly updates
    #: a torch.amp.GradScaler whose scale grows mid-run (the reference runs unscaled: powers of two scale exactly)
    scaled: bool = False
    #: BREAD_LOSS_CHUNK_BYTES: small, so the fused loss in one process updates the head by vocabulary tiles
    loss_chunk_bytes: int | None = None
    #: the reference on the ranks' summed loss at lr / ranks (the same maths): its gradients the size of each rank's
    #: (fp16: the mean's halved gradients round apart in fp16's precision — 16.9 steps on the embedding against the
    #: mean-loss reference, 5.2 against this one)
    summed_reference: bool = False
    #: the rank whose last step's batch is model_zoo.SHORT (3 tokens: at least two experts of every MoE layer get none
    #: there); the last step's only, as its large steps would amplify the ranks' other summation order in later ones
    short_rank: int | None = None
    steps: int = STEPS  # BAdam cases: ascending, one block a step (LAYERS + 1: the first block comes back)
    #: DDP wraps a module whose loss calls the decoder and the head apart (``lm.model(...)``, ``lm.lm_head``): no
    #: forward of the patched model itself runs
    below: bool = False
    #: in the middle of each training forward (at block 1), another thread runs a whole forward of the patched model
    #: under torch.no_grad() to its end (a background evaluation) while the training forward waits
    evaluate_meanwhile: bool = False


CASES = {
    "badam": Case("disabled", 1),             # a Trainer's order: the optimizer first, DDP after
    "badam_ddp_first": Case("disabled", 1, ddp_first=True),
    # built after the optimizer, DDP registers block 0 only: the synced backwards of blocks 1-3 reach none of its
    # parameters, and block 0 comes back under no_sync()
    "badam_no_sync_accumulation": Case("disabled", 2, steps=LAYERS + 1),
    "bread_lora": Case("disabled", 1),
    "bread_sgd": Case("all", 1),
    "bread_sgd_hook_path": Case("all", 1, hook_update_numel=1 << 17),
    "bread_sgd_partial_sign_no_sync_accumulation": Case("partial-sign", 2),
    "bread_lora_sgd": Case("all", 1),
    "bread_sgd_synced_accumulation": Case("all", 2),  # DDP syncs every micro-batch: no no_sync()
    "bread_sgd_gpt2_chunks": Case("all", 1, model="gpt2", chunk_bytes=600),  # 149 elements: rows cut across
    "bread_sgd_moe": Case("all", 1, model="qwen3_moe"),
    "bread_sgd_moe_experts_without_tokens": Case("all", 1, model="qwen3_moe", short_rank=1),
    "bread_sgd_head_tiled_in_one_process": Case("all", 1, loss_chunk_bytes=5 * 97 * 4),
    "bread_sgd_strided_weight": Case("all", 1, model="llama_strided"),
    "bread_sgd_loss_scaler": Case("all", 1, scaled=True),
    "bread_sgd_bf16": Case("all", 1, dtype="bfloat16"),
    "bread_sgd_bf16_nearest": Case("all", 1, dtype="bfloat16", rounding="nearest"),
    "bread_sgd_bf16_moe": Case("all", 1, model="qwen3_moe", dtype="bfloat16", rounding="nearest"),  # bf16 sums
    "bread_sgd_fp16": Case("all", 1, dtype="float16", rounding="nearest", summed_reference=True),
    "bread_sgd_loss_below_the_model": Case("all", 1, below=True),
    "bread_sgd_evaluation_in_another_thread": Case("all", 1, evaluate_meanwhile=True),
}
#: a block linear above the first active block, per model: on the fly from the first step where sgd_mode is not
#: "disabled"
PROBES = {"llama": "layers.2.mlp.down_proj", "gpt2": "h.2.mlp.c_proj", "qwen3_moe": "layers.2.self_attn.o_proj",
          "llama_strided": "layers.2.mlp.down_proj"}
#: the other fused weights whose updates average inside the backward, per model (GPT-2's head is tied to the
#: embedding: the hook path): (what, module name, parameter)
OTHER_PROBES = {"llama": [("head", "lm_head", "weight")], "llama_strided": [("head", "lm_head", "weight")],
                "qwen3_moe": [("head", "lm_head", "weight"), ("experts", "layers.2.mlp.experts", "gate_up_proj"),
                              ("experts_down", "layers.2.mlp.experts", "down_proj")],
                "gpt2": []}


def llama_strided(seed: int, dtype: torch.dtype):
    """The tiny Llama with block 2's down_proj weight stored column-major (strides (1, N)), as a checkpoint saved
    from a transposed tensor loads."""
    model = model_zoo.llama(seed=seed, dtype=dtype)
    mlp = model.model.layers[2].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach().t().contiguous().t())
    return model


MODELS = {"llama": model_zoo.llama, "gpt2": model_zoo.gpt2, "qwen3_moe": model_zoo.qwen3_moe,
          "llama_strided": llama_strided}


def batch(step: int, micro: int, rank: int, short_rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    shape = model_zoo.SHORT if rank == short_rank and step == STEPS - 1 else (model_zoo.BATCH, model_zoo.SEQ)
    return torch.randint(0, model_zoo.VOCAB, shape, generator=g)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before: dict) -> bool:
    """Whether every parameter of ``model`` still equals its value in ``before`` (a :func:`snapshot`)."""
    return all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


class LossBelowTheModel(torch.nn.Module):
    """A custom loss around a causal LM that calls its decoder and its head apart, as DDP's module."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        logits = self.lm.lm_head(self.lm.model(input_ids=input_ids).last_hidden_state).float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def reference_params(base, world: int, gas: int, steps: int = STEPS) -> dict:
    """Plain autograd: block ``step`` (ascending, one block per step) trained by SGD on the ranks' mean loss."""
    model = copy.deepcopy(base)
    for step in range(steps):
        prefix = f"model.layers.{step % LAYERS}."
        active = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in active:
            p.requires_grad_(True)
        for micro in range(gas):
            loss = sum(loss_of(model, batch(step, micro, r)) for r in range(world)) / (world * gas)
            loss.backward()
        torch.optim.SGD(active, lr=LR).step()
        for p in active:
            p.grad = None
    return snapshot(model)


def block_optimizer(model, sgd_mode: str, lora: bool, rounding: str = "auto", loss_scaler=None, lr: float = LR):
    """``sgd_mode`` "-sign": signSGD; the on-the-fly step is scaled down so sign's steps stay small."""
    mode, _, sign = sgd_mode.partition("-")
    return bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=lr), list(model.named_parameters()),
                                        switch_block_every=1, switch_mode="ascending", sgd_mode=mode, verbose=0,
                                        sgd_use_sign=bool(sign), sgd_lr_scaling=0.01 if sign else 1.0,
                                        rounding=rounding, loss_scaler=loss_scaler,
                                        **({"lora_mode": "all"} if lora else {}))


def one_process_params(base, world: int, gas: int, lora: bool, sgd_mode: str, hook_update_numel: int,
                       rounding: str, short_rank: int | None = None, one_forward: bool = False,
                       summed: bool = False) -> dict:
    """The same optimizer on a patched copy in this process, on the ranks' mean loss (each micro-batch's backward
    updating the on-the-fly weights, as the engine does in one process): a model of this rank's own.
    ``one_forward``: the ranks' batches concatenated into one forward (their mean loss, the ranks' token counts
    being equal), for a head updated by vocabulary tiles, which take one forward per backward.  ``summed``: their
    summed loss at lr / ranks (the same maths, with each rank's gradient sizes)."""
    os.environ[INDEPENDENT_RANKS_ENV] = "1"
    try:
        model = bread_kernels.patch(copy.deepcopy(base), hook_update_numel=hook_update_numel)
        opt = block_optimizer(model, sgd_mode, lora, rounding, lr=LR / world if summed else LR)
        for step in range(STEPS):
            for micro in range(gas):
                batches = [batch(step, micro, r, short_rank) for r in range(world)]
                if one_forward:
                    loss = loss_of(model, torch.cat(batches)) / gas
                else:
                    loss = sum(loss_of(model, ids) for ids in batches) / ((1 if summed else world) * gas)
                loss.backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    finally:
        del os.environ[INDEPENDENT_RANKS_ENV]
    return snapshot(model)


def run_case(name: str, rank: int, world: int) -> dict:
    env = {"BREAD_CHUNK_BYTES": CASES[name].chunk_bytes, "BREAD_LOSS_CHUNK_BYTES": CASES[name].loss_chunk_bytes}
    env = {key: str(value) for key, value in env.items() if value is not None}
    os.environ.update(env)
    try:
        return _run_case(name, rank, world)
    finally:
        for key in env:
            del os.environ[key]


def _run_case(name: str, rank: int, world: int) -> dict:
    case = CASES[name]
    sgd_mode, gas, hook_update_numel = case.sgd_mode, case.gas, case.hook_update_numel
    lora = name.startswith("bread_lora")
    base = MODELS[case.model](seed=0, dtype=getattr(torch, case.dtype))
    if lora:
        base = model_zoo.with_lora(base, r=4)
    model = bread_kernels.patch(copy.deepcopy(base), hook_update_numel=hook_update_numel)
    before = snapshot(model)
    probe = next(m for n, m in model.named_modules() if n.endswith(PROBES[case.model]))
    probe = getattr(probe, "base_layer", probe)
    modules = dict(model.named_modules())
    others = [(what, getattr(next(m for n, m in modules.items() if n.endswith(module)), attr))
              for what, module, attr in OTHER_PROBES[case.model]]

    def wrap():
        module = LossBelowTheModel(model) if case.below else model
        return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    result = {"case": name, "error": None}
    if case.evaluate_meanwhile:
        evaluate_meanwhile(model, rank)
    try:
        ddp = wrap() if case.ddp_first else None
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2) if case.scaled else None
        opt = block_optimizer(model, sgd_mode, lora, case.rounding, scaler)
        ddp = ddp or wrap()
        comm_stats.reset()
        for step in range(case.steps):
            for micro in range(gas):
                synced = micro == gas - 1 or "synced" in name
                sync = contextlib.nullcontext() if synced else ddp.no_sync()
                with sync:
                    ids = batch(step, micro, rank, case.short_rank)
                    loss = (ddp(ids) if case.below else loss_of(ddp, ids)) / gas
                    probes = [("probe", probe.weight), *others]
                    if step == 0 and micro == 0:
                        # whether autograd will make the probe's gradient (False where its update is fused)
                        values = {}
                        for what, weight in probes:
                            result[f"{what}_requires_grad"] = weight.requires_grad
                            values[what] = weight.detach().clone()
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    if step == 0 and micro == 0:  # updated inside that backward, before any step
                        for what, weight in probes:
                            result[f"{what}_moved_in_backward"] = not torch.equal(weight, values[what])
                            result[f"{what}_grad"] = weight.grad is not None
                        result["probes"] = [what for what, _ in probes]
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        if scaler is not None:
            result["scale_grew"] = scaler.get_scale() > 2.0 ** 12  # else a stale read of the scale would not show
        result["all_reduces"] = comm_stats.calls.get("all_reduce", 0)
        result["all_gathers"] = comm_stats.calls.get("all_gather", 0)
    except RuntimeError as exc:
        result["error"] = str(exc)
        result["unchanged"] = unchanged(model, before)
        return result
    ref = reference_params(base, world, gas, case.steps) if name.startswith("badam") else \
        one_process_params(base, world, gas, lora, sgd_mode, hook_update_numel, case.rounding, case.short_rank,
                           one_forward=case.loss_chunk_bytes is not None, summed=case.summed_reference)
    result["diff"], result["diff_where"] = max(((p.detach() - ref[n]).abs().max().item(), n)
                                               for n, p in model.named_parameters())
    # per tensor, in units of its dtype's rounding step at the tensor's largest magnitude
    result["diff_steps"] = max((p.detach().float() - ref[n].float()).abs().max().item()
                               / (torch.finfo(p.dtype).eps * ref[n].float().abs().max().item())
                               for n, p in model.named_parameters())
    result["moved"] = max((ref[n] - before[n]).abs().max().item() for n in ref)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result["replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered[1:])
    opt.close()
    return result


def evaluate_meanwhile(model, rank: int) -> None:
    """In the middle of each forward of ``model`` in this thread (at its block 1), run a whole forward of it under
    ``torch.no_grad()`` in another thread, to its end (a background evaluation)."""
    training = threading.get_ident()

    def evaluate():
        with torch.no_grad():
            model(input_ids=batch(99, 0, rank))

    def meanwhile(module, args):
        if threading.get_ident() == training:
            thread = threading.Thread(target=evaluate)
            thread.start()
            thread.join()

    model.model.layers[1].register_forward_pre_hook(meanwhile)


class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, model_zoo.VOCAB, (model_zoo.SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer_case(rank: int, world: int, out: str) -> dict:
    """A Trainer under torchrun: it wraps the model in DDP after the optimizer was built, and clips."""
    import transformers

    model = bread_kernels.patch(model_zoo.llama(seed=0, layers=LAYERS))
    before = [p.detach().clone() for p in model.parameters()]
    opt = bread_kernels.BlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                       list(model.named_parameters()), switch_block_every=1,
                                       switch_mode="ascending", verbose=0)
    args = transformers.TrainingArguments(output_dir=f"{out}.trainer", per_device_train_batch_size=2,
                                          max_steps=STEPS, use_cpu=True, ddp_backend="gloo",
                                          ddp_find_unused_parameters=True, report_to=[], save_strategy="no",
                                          max_grad_norm=1.0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Batches(), optimizers=(opt, None))
    trainer.train()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    result = {"case": "trainer", "wrapped": type(trainer.model_wrapped).__name__, "moved": moved,
              "replicas_equal": all(torch.equal(gathered[0], g) for g in gathered[1:]), "switches": opt.global_step}
    opt.close()
    return result


def fsdp_cases(rank: int) -> list[dict]:
    """FSDP2 and tensor parallelism shard parameters into DTensors: ``patch`` of a sharded model, a patched model
    sharded after ``patch`` (whole, or only a part of it: each MLP by FSDP2, the head or each MLP by a tensor-parallel
    plan), and an unpatched model's on-the-fly updates are refused; unpatched BAdam runs (the slow path)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    def shard_mlps(model):
        for layer in model.model.layers:
            fully_shard(layer.mlp)
        return model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def tensor_parallel_head(model):  # transformers' plan for Llama's head: colwise, the output gathered
        return parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})

    def tensor_parallel_mlps(model):
        for layer in model.model.layers:
            parallelize_module(layer, mesh, {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                             "mlp.down_proj": RowwiseParallel()})
        return model

    def full(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()

    def attempt(name, build, sgd_mode):
        result = {"case": name, "error": None, "unchanged": None}
        model = None
        try:
            model = build()
            before = {n: full(p).clone() for n, p in model.named_parameters()}
            opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                               list(model.named_parameters()), switch_mode="fixed", start_block=1,
                                               sgd_mode=sgd_mode, verbose=0)
            loss_of(model, batch(0, 0, rank)).backward()
            opt.step()
        except Exception as exc:  # noqa: BLE001 (the test reads which error, and where)
            result["error"] = str(exc)
        if model is not None:
            result["unchanged"] = all(torch.equal(full(p), before[n]) for n, p in model.named_parameters())
        return result

    llama = lambda: model_zoo.llama(seed=0, layers=LAYERS)  # noqa: E731
    return [
        attempt("fsdp_patch_refused", lambda: bread_kernels.patch(shard(llama())), "disabled"),
        attempt("fsdp_sharded_after_patch_refused", lambda: shard(bread_kernels.patch(llama())), "disabled"),
        attempt("fsdp_unpatched_on_the_fly_refused", lambda: shard(llama()), "all"),
        attempt("fsdp_unpatched_badam_runs", lambda: shard(llama()), "disabled"),
        attempt("fsdp_mlps_sharded_after_patch_refused", lambda: shard_mlps(bread_kernels.patch(llama())),
                "disabled"),
        attempt("tp_head_sharded_after_patch_refused", lambda: tensor_parallel_head(bread_kernels.patch(llama())),
                "disabled"),
        attempt("tp_mlps_sharded_after_patch_refused", lambda: tensor_parallel_mlps(bread_kernels.patch(llama())),
                "disabled"),
        attempt("tp_unpatched_badam_runs", lambda: tensor_parallel_mlps(tensor_parallel_head(llama())), "disabled"),
    ]


def deepspeed_cases(rank: int) -> list[dict]:
    """A DeepSpeed engine (ZeRO 0 and 2) around a patched model whose optimizer is a plain BlockOptimizer: refused
    at the first forward, before DeepSpeed's own backward hooks fail or the ranks drift apart."""
    import deepspeed

    results = []
    for stage in (0, 2):
        result = {"case": f"deepspeed_zero{stage}_refused", "error": None}
        model = bread_kernels.patch(model_zoo.llama(seed=0, layers=LAYERS))
        before = snapshot(model)
        opt = block_optimizer(model, "disabled", lora=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": model_zoo.BATCH, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9})
        try:
            engine.backward(loss_of(engine, batch(0, 0, rank)))
            engine.step()
        except RuntimeError as exc:
            result["error"] = str(exc)
        result["unchanged"] = unchanged(model, before)
        opt.close()
        engine.destroy()
        results.append(result)
    return results


def random_order_case(rank: int) -> dict:
    """switch_mode="random" draws the block order from the global RNG: ranks seeded apart train different blocks,
    whose gradients the average must not mix.  BREAD-SGD with every block linear fused: the refusal must come before
    the backward's averaged updates of that step (the ranks would average one weight's chunks with another's)."""
    result = {"case": "different_blocks_refused", "error": None}
    model = bread_kernels.patch(model_zoo.llama(seed=0, layers=LAYERS), hook_update_numel=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    torch.manual_seed(100 + rank)
    opt = bread_kernels.BlockOptimizer(torch.optim.SGD(model.parameters(), lr=LR), list(model.named_parameters()),
                                       switch_block_every=1, switch_mode="random", sgd_mode="all", verbose=0)
    try:
        for step in range(STEPS):
            last = snapshot(model)
            loss_of(ddp, batch(step, 0, rank)).backward()
            opt.step()
            opt.zero_grad()
    except RuntimeError as exc:
        result["error"] = str(exc)
        result["unchanged"] = unchanged(model, last)
    return result


def different_patch_case(rank: int) -> dict:
    """The ranks patched apart (hook_update_numel): the same roles, but rank 0 fuses the block linears (their
    updates all-reduce inside the backward) while rank 1 leaves them to the hook path (averaged at the end): refused
    at the first forward, before any update (before, gloo failed on mismatched collectives; NCCL would hang)."""
    result = {"case": "different_patch_refused", "error": None}
    model = bread_kernels.patch(model_zoo.llama(seed=0, layers=LAYERS), hook_update_numel=0 if rank == 0 else 1 << 17)
    before = snapshot(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = block_optimizer(model, "all", lora=False)
    try:
        loss_of(ddp, batch(0, 0, rank)).backward()
    except RuntimeError as exc:
        result["error"] = str(exc)
    result["unchanged"] = unchanged(model, before)
    opt.close()
    return result


def non_finite_case(rank: int, model_name: str = "llama") -> dict:
    """Rank 1's loss is not finite (a loss scaled by inf), rank 0's is: every on-the-fly update of that backward
    must be skipped on both ranks alike (the averaged gradient is not finite; a rank that applied its own would
    drift), and each rank reports the same skips."""
    result = {"case": "non_finite_on_one_rank" + ("" if model_name == "llama" else f"_{model_name}"), "error": None}
    model = bread_kernels.patch(MODELS[model_name](seed=0, dtype=torch.float32), hook_update_numel=0)
    before = snapshot(model)
    opt = block_optimizer(model, "all", lora=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    loss = loss_of(ddp, batch(0, 0, rank))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (loss * (float("inf") if rank == 1 else 1.0)).backward()
        opt.step()
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    result["skip_warnings"] = skips
    on_the_fly = [n for n in before if not n.startswith("model.layers.0.")]  # block 0 is the active one
    result["on_the_fly_unchanged"] = all(torch.equal(model.get_parameter(n), before[n]) for n in on_the_fly)
    result["skipped"] = opt.driver.skipped_updates
    opt.close()
    return result


def on_the_fly_opt_out_cases(rank: int) -> list[dict]:
    """``BREAD_INDEPENDENT_RANKS=1``: each rank trains a model of its own with BREAD-SGD (no DDP); without it, a
    patched model's forward outside DDP is refused, and an unpatched model's optimizer when it is built."""
    results = []
    os.environ[INDEPENDENT_RANKS_ENV] = "1"
    try:
        base = model_zoo.llama(seed=0, layers=LAYERS)
        own = bread_kernels.patch(copy.deepcopy(base))
        opt = block_optimizer(own, "all", lora=False)
        for step in range(2):
            loss_of(own, batch(step, 0, rank)).backward()
            opt.step()
            opt.zero_grad()
        moved = max((a.detach() - b).abs().max().item() for a, b in zip(own.parameters(), base.parameters()))
        results.append({"case": "independent_ranks_train", "error": None, "moved": moved})
        model = bread_kernels.patch(copy.deepcopy(base))
        opt = block_optimizer(model, "all", lora=False)
    finally:
        del os.environ[INDEPENDENT_RANKS_ENV]
    result = {"case": "bread_sgd_without_ddp_refused", "error": None}
    before = snapshot(model)
    try:
        loss_of(model, batch(0, 0, rank)).backward()
    except RuntimeError as exc:
        result["error"] = str(exc)
    result["unchanged"] = unchanged(model, before)
    results.append(result)
    result = {"case": "library_hooks_sgd_under_ddp_refused", "error": None}
    from tests.integrations.blockoptimizers_style import BlockOptimizersStyle

    styled = copy.deepcopy(base)
    before = snapshot(styled)
    library = BlockOptimizersStyle(torch.optim.SGD(styled.parameters(), lr=LR), list(styled.named_parameters()),
                                   [[f"model.layers.{i}."] for i in range(LAYERS)], sgd_mode="all")
    bread_kernels.accelerate(library, styled, sgd_lr_scaling=1.0, sgd_use_sign=False)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(styled, find_unused_parameters=True)
        loss_of(ddp, batch(0, 0, rank)).backward()
    except RuntimeError as exc:
        result["error"] = str(exc)
    result["unchanged"] = unchanged(styled, before)
    results.append(result)
    result = {"case": "bread_sgd_unpatched_refused", "error": None, "unchanged": True}
    try:
        block_optimizer(model_zoo.llama(seed=0, layers=LAYERS), "all", lora=False)
    except RuntimeError as exc:
        result["error"] = str(exc)
    results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="*",
                        default=[*CASES, "trainer", "fsdp", "random_order", "opt_out", "deepspeed", "non_finite",
                                 "different_patch"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    freeze_long_lived_objects()
    results = [run_case(name, rank, world) for name in args.cases if name in CASES]
    if "trainer" in args.cases:
        results.append(trainer_case(rank, world, args.out))
    if "fsdp" in args.cases:
        results += fsdp_cases(rank)
    if "random_order" in args.cases:
        results.append(random_order_case(rank))
    if "opt_out" in args.cases:
        results += on_the_fly_opt_out_cases(rank)
    if "deepspeed" in args.cases:
        results += deepspeed_cases(rank)
    if "non_finite" in args.cases:
        results.extend(non_finite_case(rank, name) for name in ("llama", "qwen3_moe"))
    if "different_patch" in args.cases:
        results.append(different_patch_case(rank))
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
