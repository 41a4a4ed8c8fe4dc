"""ZeRO-3 (DeepSpeed 0.19, CPU accelerator, gloo, 2 ranks) against a single-process plain-autograd run.

One ``torchrun`` launch (every group of the worker, one after the other) runs every case of ``zero3_worker.CASES``
(BAdam, BREAD-SGD, BREAD-SGD-partial with SGD and sign, gradient accumulation 2, persistent parameters, a plain-SGD
base optimizer, a Llama with its head tied to its embedding under sign (the fused loss runs, and "auto" keeps the top
block), and BREAD with peft LoRA adapters: lora_mode "all" with the on-the-fly SGD, "partial" with accumulation,
"all" with BAdam, Falcon's fused FalconLinear, Mamba's dt_proj on the hook path), 4 steps each
with block switches after steps 2 and 4, each rank on its own data.  DeepSpeed's gradient clipping is off
(``gradient_clipping: 0``; its default, 1.0, would clip what the unclipped reference does not).
``BREAD_ZERO_CHUNK_BYTES=1024`` makes every dW go through several chunks whose bounds fall inside rows.  Checked on
every rank:

* every parameter's shard equals the reference's slice: ``|diff| <= 1e-6 + 1e-5·|ref|`` for parameters only ever
  frozen or updated on the fly; parameters that DeepSpeed's AdamW trained get ``2e-5`` (1% of their movement):
  the BAdam case, where this library does nothing on the Adam path, shows that DeepSpeed's flat AdamW alone
  differs from torch's by ~4e-6 here (the eps-normalised step amplifies fp32 reduction-order differences of
  near-zero gradients); with a plain-SGD base optimizer the tight bound holds for every parameter;
* persistent parameters' gathered copies equal the reference (consistent across micro-batches and ranks);
* the mean loss of each step equals the reference's; no parameter holds a ``.grad`` after any backward;
* the block switched twice, and after the two rebuilds a module carries DeepSpeed's hooks exactly once;
  DeepSpeed's internals are as this integration expects (live canary).
The LoRA cases check the adapters (trained by DeepSpeed's AdamW, keeping their Adam state across switches as the
reference does) and the base weights (active, updated on the fly inside the LoRA layer, or frozen) alike.  Biases
are left out of the model to keep the run short (GPT-2 and a Llama with MLP biases match too: see
``zero3_worker.EXTRA_CASES``); the bias update's sharded maths is tested in ``test_sharded_update.py`` (the same
dense path as the norm weights, which are checked here).

A bf16 case (DeepSpeed's bf16 mode) is a smoke run, checked loosely against the fp32 reference, and checks that
stochastic rounding moves the norm weights.  Each launch has a timeout.  After each case the worker
checks that ``destroy()`` leaves the model to be freed (DeepSpeed's globals held it, and with it the process groups,
until interpreter shutdown, where a gloo worker thread could abort the process) and that DeepSpeed's module stack
stayed at the root; at the end it calls ``deepspeed.comm.destroy_process_group``.  The fault test makes rank 1 raise
in the backward and checks that the whole job ends quickly with that error.

The same launch then (``--resume``) checks the exact resume: each of ``zero3_worker.RESUME_CASES`` trains uninterrupted,
and again saved by ``ZeroBlockEngine.save_checkpoint`` mid-block, loaded into a fresh engine and trained on; the two
must agree bit for bit.

and (``--trainer``) runs the Hugging Face Trainer with ``deepspeed=`` and ``BreadCallback`` (a
``ZeroBlockOptimizer`` from its ``create_optimizer``, a cosine lr schedule) against the integration's own loop on the
micro-batches the Trainer gave each rank (fp32 with accumulation, LoRA, ``bf16=True`` with DeepSpeed's bf16 and
signSGD), the Trainer's checkpoint resumed exactly in that loop and by the Trainer's own ``resume_from_checkpoint``
with ``BreadTrainerMixin``, a model built under ``zero.Init``, and what the Trainer with ``BreadCallback`` refuses
(its ``resume_from_checkpoint`` without the mixin, a ``BlockOptimizer`` under DeepSpeed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("zero3_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240
ON_THE_FLY_ATOL, RTOL, ADAM_ATOL = 1e-6, 1e-5, 2e-5

sys.path.insert(0, str(ROOT))
from tests.integrations.ranks import free_port, read_ranks, torchrun  # noqa: E402
from tests.integrations.zero3_worker import CASES, CUSTOM_LOSS_CASES, LAYERS, RESUME_CASES, RESUME_STEPS, \
    SAVE_AFTER, STEPS, TRAINER_CASES, WEIGHTS_ONLY_LOADS  # noqa: E402


def launch(out: Path, *args: str, extra_env: dict | None = None, timeout: int = TIMEOUT):
    """torchrun 2 CPU ranks of the worker (every dW through several chunks); returns the completed process."""
    return torchrun(WORKER, out, *args, extra_env={"BREAD_ZERO_CHUNK_BYTES": "1024", **(extra_env or {})},
                    timeout=timeout)


def launched_results(folder: Path, what: str, *args: str, timeout: int = TIMEOUT) -> dict:
    """Launch the worker with ``args`` writing into ``folder``; every rank's results once it succeeded."""
    proc = launch(folder / "run", *args, timeout=timeout)
    assert proc.returncode == 0, f"the 2-rank {what} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    return read_ranks(folder / "run")


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """One launch of every group of the worker (its cases, resume cases, deepspeed.initialize refusals, Trainer
    cases): each launch pays ~10 s of imports and start-up."""
    folder = tmp_path_factory.mktemp("zero3")
    return launched_results(folder, "run", "--cases", ",".join(CASES), "--resume", ",".join(RESUME_CASES),
                            "--plain-initialize", "--custom-loss", ",".join(CUSTOM_LOSS_CASES), "--weights-only",
                            "--trainer", ",".join([*TRAINER_CASES, "zero_init", "zero_init_falcon", "zero_init_moe"]),
                            "--save-dir", str(folder), timeout=3 * TIMEOUT)


@pytest.fixture(scope="module")
def zero3_results(worker_results):
    return worker_results


FP32_CASES = [c for c in CASES if not c.startswith("bf16")]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", FP32_CASES)
def test_shards_equal_single_process_run(zero3_results, case, rank):
    result = zero3_results[(case, rank)]
    adam_trained = CASES[case][6] != "sgd"
    failures = []
    for name, e in result["params"].items():
        tol = ON_THE_FLY_ATOL + RTOL * e["scale"]
        if "ACTIVE" in e["roles"] and adam_trained:
            tol = max(tol, ADAM_ATOL)
        if e["diff"] > tol:
            failures.append(f"{name} (roles {e['roles']}): |shard - reference| = {e['diff']:.3g} > {tol:.3g} "
                            f"(the reference moved it by {e['moved']:.3g})")
        if "persist_diff" in e and e["persist_diff"] > tol:
            failures.append(f"{name}: the persistent gathered copy differs from the reference by "
                            f"{e['persist_diff']:.3g}")
    assert not failures, f"{case}, rank {rank}:\n  " + "\n  ".join(failures)
    moved = [n for n, e in result["params"].items() if e["moved"] > 1e-4 and e["roles"] != ["FROZEN"]]
    assert moved, "nothing moved: the comparison would be vacuous"
    for t, (loss, ref) in enumerate(zip(result["losses"], result["ref_losses"])):
        assert abs(loss - ref) <= 1e-5 * abs(ref), f"{case}: step {t} mean loss {loss} != reference {ref}"
    assert len(result["losses"]) == STEPS
    assert result["grads_left"] == [], f"{case}: .grad left after a backward: {result['grads_left']}"
    assert result["switches"] == 2
    assert result["alive_after_del"] == [], f"{case}: still alive after destroy and del: {result['alive_after_del']}"
    # the recompute's early stop skips DeepSpeed's post-forward hooks, and each rebuilt stage-3 optimizer pushes the
    # root again: the global module stack must stay at the root after every micro-batch
    assert result["module_stack_depths"] and set(result["module_stack_depths"]) == {1}, \
        f"{case}: DeepSpeed's FWD_MODULE_STACK depth after each micro-batch: {result['module_stack_depths']}"
    hooks = result["hook_names"]  # after two stage-3 optimizer rebuilds: DeepSpeed's hooks once each, no leftovers
    for name in ("_pre_forward_module_hook", "_post_backward_module_hook", "_pre_backward_module_hook"):
        assert hooks.count(name) == 1, f"{case}: hook {name} registered {hooks.count(name)} times: {hooks}"
    assert result["internals_problems"] == [], result["internals_problems"]


@pytest.mark.parametrize("rank", [0, 1])
def test_bf16_smoke_with_stochastic_rounding(zero3_results, rank):
    """DeepSpeed bf16, signSGD, GAS 2, persistent norms: within a few bf16 spacings of the fp32 reference; the
    norm weights (1.0, spacing 2^-7 above it) move although every sign step (5e-4) is far below half a spacing —
    stochastic rounding, which is the default for bf16 — and persistent gathered copies equal their shards."""
    result = zero3_results[("bf16_sign_all_gas2_persist", rank)]
    for t, (loss, ref) in enumerate(zip(result["losses"], result["ref_losses"])):
        assert abs(loss - ref) <= 2e-3, f"bf16: step {t} mean loss {loss} vs fp32 reference {ref}"
    assert result["grads_left"] == [] and result["switches"] == 2
    for name, e in result["params"].items():
        assert e["diff"] <= 4 * 2 ** -7 * max(1.0, e["scale"]), f"{name}: {e['diff']:.3g} from the fp32 reference"
        assert e.get("persist_vs_shard", 0.0) == 0.0, f"{name}: persistent copy differs from its shard"
    norms = [e["shard_moved"] for n, e in result["params"].items() if "norm" in n and e["roles"] != ["FROZEN"]]
    assert norms and all(m > 0 for m in norms), f"bf16 norm weights did not move: {norms}"


def test_collectives_are_reduce_scatters_and_sparse_gathers(zero3_results):
    """No all-reduce ever; BAdam issues none of ours; the embedding (SGD in 'all') uses two small gathers."""
    assert zero3_results[("badam", 0)]["comm"] == {}
    for case in ("sgd_all", "sign_all_gas2_persist"):
        comm = zero3_results[(case, 0)]["comm"]
        assert set(comm) <= {"reduce_scatter", "all_gather"} and comm.get("reduce_scatter", 0) > 0, comm
    assert "all_gather" not in zero3_results[("sign_partial", 0)]["comm"]  # embedding frozen, nothing persistent


@pytest.fixture(scope="module")
def resume_results(worker_results):
    return worker_results


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_run_saved_and_loaded_into_a_fresh_engine_trains_on_bit_for_bit(resume_results, case, rank):
    """ZeroBlockEngine.save_checkpoint after step 3 (mid-block), load_checkpoint into a fresh engine whose block
    optimizer was built with another start block, 3 more steps: every shard, every step's loss and active block and
    the stochastic rounding's draw counter are those of the run that never stopped (``RESUME_CASES`` says what each
    case covers).  Without the saved schedule the resumed run trains other blocks; without the hook-updated norms
    saved as frozen they come back at their initial values (sgd_all_persist); without the saved group layout
    DeepSpeed refuses the adapters' optimizer state (resume_lora_gas2)."""
    r = resume_results[(case, rank)]
    assert r["load_path"] and r["start_built"] != r["saved_block"]
    assert r["resumed_at"] == [r["saved_block"], SAVE_AFTER, SAVE_AFTER % 2]  # block, global step, step in block
    assert r["active"] == r["whole_active"] and len(set(r["active"])) == 3, (r["active"], r["whole_active"])
    assert r["losses"] == r["whole_losses"]
    assert r["draws"][1] == r["draws"][0]
    differ = {n: d for n, d in r["diff"].items() if d != 0.0}
    assert not differ, f"{case}, rank {rank}: shards differ from the uninterrupted run's: {differ}"
    assert sum(m > 0 for m in r["moved"].values()) > len(r["moved"]) // 3, "too little moved to compare"
    assert r["switches_after_load"] == (RESUME_STEPS - SAVE_AFTER) // 2 + 1  # the load is not counted as a switch
    whole_persistent, resumed_persistent = r["persistent"]
    assert whole_persistent == resumed_persistent and all(d == 0.0 for d in r["persist_diff"].values())
    if RESUME_CASES[case][4]:  # a persistence threshold: the gathered copies were compared
        assert whole_persistent, "no persistent parameter to compare"


@pytest.mark.parametrize("rank", [0, 1])
def test_deepspeed_initialize_instead_of_the_integrations_is_refused_at_the_first_forward(resume_results, rank):
    """Given the block optimizer, deepspeed.initialize (with zero_allow_untested_optimizer) once failed inside
    DeepSpeed's backward ('NoneType' object has no attribute 'numel'); given its base optimizer it trained the first
    block for ever, silently.  Both are refused before the model runs, naming the remedy, also with an optimizer
    whose engine of the integration's was destroyed before."""
    r = resume_results[("plain_deepspeed_initialize", rank)]
    for given in ("block_optimizer", "base_optimizer", "block_optimizer_after_destroy"):
        assert r[given] and "bread_kernels.integrations.deepspeed.initialize(model, optimizer, config)" in r[given]
        assert r[given + "_moved"] == []


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("how", WEIGHTS_ONLY_LOADS)
def test_a_weights_only_load_brings_back_every_weight_the_saved_run_had(worker_results, how, rank):
    """``load_module_only=True`` or ``load_optimizer_states=False`` into a fresh engine that starts at the saved run's
    active block: every shard is the saved run's, bit for bit.  Before, ``load_module_only=True`` left the active
    block's weights (those DeepSpeed's optimizer trains, kept in its fp32 partitions) at their initial values,
    silently: DeepSpeed 0.19 rebuilds them from the partitions only where it loads no optimizer state."""
    r = worker_results[("weights_only", rank)]
    assert r["active"] and r["active_moved"] == r["active"], "the saved run's active block did not move"
    assert r[how] == [], f"{how}: shards that differ from the saved run's: {r[how]}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", CUSTOM_LOSS_CASES)
def test_a_custom_loss_from_below_the_engine_trains_as_the_reference_or_is_refused(worker_results, case, rank):
    """A custom loss from ``engine.module.model(...)`` and ``engine.module.lm_head`` (BREAD-SGD sign, persistent
    parameters) trains as the single-process reference trained with the same loss.  With gradient accumulation such
    a forward, which did not go through DeepSpeed's engine, is refused before it runs on every rank (before, it
    trained on silently: DeepSpeed's stage-3 optimizer learns where a step begins and ends only from the engine's
    forward, and accumulated the active block's gradients wrongly: 4e-3 from the reference after 4 steps); the loss
    from the logits of ``engine(...)`` then trains as the reference."""
    r = worker_results[(case, rank)]
    if CUSTOM_LOSS_CASES[case][2] > 1:
        assert r["refused"] and "did not go through the DeepSpeed engine" in r["refused"], r["refused"]
        assert r["moved_by_refused"] == []
    else:
        assert r["refused"] is None
    assert r["switches"] == 2
    for t, (loss, ref) in enumerate(zip(r["losses"], r["ref_losses"])):
        assert abs(loss - ref) <= 1e-5 * abs(ref), f"{case}: step {t} mean loss {loss} != reference {ref}"
    differ = {n: d for n, d in r["diff"].items() if d > ADAM_ATOL + RTOL * r["scale"][n]}
    assert not differ, f"{case}, rank {rank}: shards differ from the reference's: {differ}"


@pytest.fixture(scope="module")
def trainer_results(worker_results):
    return worker_results


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", TRAINER_CASES)
def test_the_trainer_with_deepspeed_and_bread_callback_trains_as_the_integrations_loop(trainer_results, case, rank):
    """Trainer(deepspeed=<ZeRO-3>) whose create_optimizer returns a ZeroBlockOptimizer, with BreadCallback: every
    shard equals, bit for bit, that of the integration's own loop (initialize, engine.step(), the same cosine
    schedule on the block optimizer) fed the micro-batches the Trainer gave this rank; the blocks switch as there.
    The accumulation case also runs with gradient_checkpointing=True.  Without BreadCallback the first forward is
    refused (the engine is not connected); with accelerate's wrapper pointed at the rebuilt stage-3 optimizer itself,
    the Trainer's scheduler would schedule the base optimizer's groups, and fails on their count."""
    r = trainer_results[(case, rank)]
    gas = TRAINER_CASES[case][3]
    assert r["micro_batches"] == STEPS * gas and r["trainer_global_step"] == STEPS
    assert len(set(r["loop_active"])) == 2, r["loop_active"]  # a switch after steps 2 and 4
    differ = {n: d for n, d in r["diff"].items() if d != 0.0}
    assert not differ, f"{case}, rank {rank}: the Trainer's shards differ from the loop's: {differ}"
    assert sum(m > 0 for m in r["moved"].values()) > len(r["moved"]) // 3, "too little moved to compare"
    assert r["routed_after_destroy"] == []  # destroy() handed DeepSpeed's own back (load_checkpoint now refuses)
    # the loss scaler object carries across the rebuild at a switch (with fp16, its dynamic scale: DeepSpeed runs no
    # fp16 on this CPU, so only the carrying is checked), and so does a scale set with override_loss_scale
    assert r["loss_scaler_carried"]
    # unwrap_optimizer sees the block optimizer through accelerate's wrapper and the connected engine's view; the
    # integration's destroy removes DeepSpeed's forward hooks from the model (they held the engine and optimizer)
    assert r["unwrapped"] == "ZeroBlockOptimizer" and not r["engine_after_destroy"]
    if gas > 1:  # run with gradient_checkpointing=True: the Trainer turns HF's on after patch; the stream's replaces it
        assert any("gradient checkpointing is replaced by the streaming backward" in w for w in r["warnings"])


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ["zero_init", "zero_init_falcon", "zero_init_moe"])
def test_a_model_built_partitioned_is_patched_loaded_and_trains_as_one_built_whole(trainer_results, case, rank):
    """Under the Trainer's deepspeed= (ZeRO-3), from_pretrained builds the model under deepspeed.zero.Init, every
    parameter an empty tensor until gathered: patch found no block stack in it (it weighed lists by elements).
    Patched, given a ZeroBlockOptimizer, loaded (the guard against the Trainer's resume lets a load through where no
    engine holds the optimizer; it refused this one before) and trained by initialize's engine, its shards equal
    those of the model built whole.  Falcon: its FalconLinear layers (an nn.Linear subclass) are fused from their
    empty tensors as from whole ones (the probe refused a weight that was not 2-D: they took the hook path, patch
    warned that they do not compute x·Wᵀ + b, and fused_fraction, weighing the empty tensors, said 1.0).  A Qwen3-MoE
    (BAdam): its 3-D expert weights are found from their whole shapes and fused (they ran HF's experts, unfused and
    unsaid), and a ZeroBlockOptimizer with sgd_mode="all" on it refuses their on-the-fly update as on the model built
    whole (it went through unsaid, each expert weight's whole gradient materialised on the hook path)."""
    r = trainer_results[(case, rank)]
    if case == "zero_init_moe":
        assert "an on-the-fly SGD update, which is not implemented under ZeRO-3" in (r["on_the_fly_experts"] or "")
    assert r["built_empty"] and r["same_blocks"]
    assert r["fused"] == [1.0, 1.0], \
        f"fraction of the block linears fused (built whole, built partitioned): {r['fused']}"
    differ = {n: d for n, d in r["diff"].items() if d != 0.0}
    assert not differ, f"rank {rank}: the model built partitioned trained otherwise: {differ}"
    assert r["moved"] > len(r["diff"]) // 2


@pytest.mark.parametrize("rank", [0, 1])
def test_a_trainer_checkpoint_resumes_exactly_through_the_trainer_with_the_mixin_and_in_a_loop(trainer_results,
                                                                                               rank):
    """The Trainer saved checkpoint-3 of a peft model through the integration (it asked DeepSpeed to leave the
    frozen parameters out: saved anyway, with a warning).  Loaded into a fresh engine of initialize (another start
    block) and trained on, it ends where the Trainer ended; so does a fresh Trainer with BreadTrainerMixin among its
    bases (and no BreadCallback given: the mixin adds one) whose train(resume_from_checkpoint=...) loads checkpoint-1
    (mid-block; a switch and the lr schedule's steps follow), on the micro-batches the uninterrupted run trained after
    step 1.  Its save_model's gathered state dict holds every
    adapter (it asks DeepSpeed to exclude the frozen ones: the blocks trained earlier).  The Trainer's resume without
    the mixin (DeepSpeed's load before any callback runs, with the start block's layout: a bare KeyError inside
    DeepSpeed before), a plain BlockOptimizer under DeepSpeed and a second train() of the Trainer (the engine the
    first destroyed is not rebuilt) are refused, naming the remedy, before any weight moves."""
    r = trainer_results[("trainer_lora_partial", rank)]
    asked = "bread_kernels: the Trainer asked DeepSpeed to leave the frozen parameters out of the "
    assert r["warnings"] == [asked + "check", asked + "saved"]
    saved, = r["saved_model_warning"]  # once, and it says what the saved model lacks and where it is
    assert "peft's save_pretrained then writes every block's adapters but no base weight" in saved and \
        "zero_to_fp32.py" in saved
    if rank == 0:  # the Trainer's save_model gathers every adapter, not only the active block's (it asks to exclude)
        adapters, gathered = r["save_model_adapters"]
        assert adapters > 0 and gathered == adapters
    assert r["resumed_at"] == [r["loop_active"][SAVE_AFTER], SAVE_AFTER, SAVE_AFTER % 2]
    differ = {n: d for n, d in r["resume_diff"].items() if d != 0.0}
    assert not differ, f"rank {rank}: resumed from the Trainer's checkpoint, the shards differ: {differ}"
    assert r["trainer_resume_callbacks"] == 1
    trained, expected, same = r["trainer_resume_batches"]
    assert trained == expected > 0 and same, r["trainer_resume_batches"]
    assert r["trainer_resume_warnings"] == [asked + "check", asked + "saved"]  # its own saves; the schedule found
    differ = {n: d for n, d in r["trainer_resume_diff"].items() if d != 0.0}
    assert not differ, f"rank {rank}: resumed through the Trainer's resume_from_checkpoint, the shards differ: {differ}"
    if rank == 0:  # the mixin's save_model wrote the base model it trained (peft writes the adapters alone)
        assert r["base_model_keys"] == {"missing_keys": [], "unexpected_keys": []}
        reloaded, on_initial, in_checkpoint = r["base_model_saved"]
        assert reloaded < 1e-5, r["base_model_saved"]  # base_model + adapters: the trained model's logits
        assert on_initial > 1e-3  # BREAD-SGD-partial moved base weights, which the adapters alone would lose
        assert not in_checkpoint  # save_base_model="final": the Trainer's checkpoints hold no copy
    refused = r["refused"]
    assert refused["resume"].startswith("NotImplementedError") and "BreadTrainerMixin first in your Trainer's " \
        "bases" in refused["resume"] and "engine.load_checkpoint('<output_dir>/checkpoint-<step>')" in \
        refused["resume"]
    assert refused["block_optimizer"].startswith("ValueError") and "must be a bread_kernels.integrations." \
        "deepspeed.ZeroBlockOptimizer" in refused["block_optimizer"]
    assert refused["second_train"].startswith("RuntimeError") and "a second train() of a Trainer with " \
        "deepspeed=" in refused["second_train"]
    # with resume_from_checkpoint the Trainer loads into the first train()'s engine, which accelerate's free_memory
    # destroyed at the start of this train(), before any callback runs: DeepSpeed's own load wrote weights there
    # (a KeyError for a frozen weight here, 18 weights moved in a reviewer's run); now that load is refused
    assert refused["second_train_resume"].startswith("RuntimeError") and "engine that the integration's destroy()" \
        " took down; nothing was loaded" in refused["second_train_resume"] and "a second train() of a Trainer with " \
        "deepspeed=" in refused["second_train_resume"]
    # the mixin connects in create_scheduler, before transformers sets model_wrapped: a refused connection left it the
    # bare model, so the remedy trainer.model_wrapped.destroy() missed the engine (a reviewer's find)
    assert refused["mixin_refused_config"].startswith("ValueError") and "managed_gradient_accumulation: false is " \
        "not supported" in refused["mixin_refused_config"]
    assert refused["mixin_refused_config_wrapped"] == "DeepSpeedEngine"
    for what in ("resume", "block_optimizer", "second_train", "second_train_resume", "mixin_refused_config"):
        assert refused[what + "_moved"] == [], what


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ["trainer_sgd_all_gas2", "trainer_bf16_sign"])
def test_the_trainers_resume_with_accumulation_and_in_bf16_is_exact(trainer_results, case, rank):
    """The Trainer with accumulation 2 (accelerate sets DeepSpeed's boundary and steps it once per step, so
    micro_steps counts steps: its save at step 1 was refused as mid-step before), and in bf16 with signSGD's
    stochastic rounding (its draw counter in the schedule), saves after every step; a fresh Trainer with
    BreadTrainerMixin resumes from checkpoint-1 and ends where it ended, on the same micro-batches."""
    r = trainer_results[(case, rank)]
    gas = TRAINER_CASES[case][3]
    trained, expected, same = r["trainer_resume_batches"]
    assert trained == expected == gas * (STEPS - 1) and same, r["trainer_resume_batches"]
    differ = {n: d for n, d in r["trainer_resume_diff"].items() if d != 0.0}
    assert not differ, f"rank {rank}: resumed through the Trainer's resume_from_checkpoint, the shards differ: {differ}"


def test_a_rank_failing_in_backward_stops_every_rank(tmp_path):
    # a hang (rank 0 waiting in a collective for rank 1) raises subprocess.TimeoutExpired here and fails the test
    proc = launch(tmp_path / "fault", "--fault", "--cases", "sgd_all", timeout=150)
    assert proc.returncode != 0
    assert "injected fault: rank 1 fails inside the backward" in proc.stdout + proc.stderr


def test_ranks_training_different_blocks_are_refused_before_any_update(tmp_path):
    """Each rank drew its random block order from a generator seeded apart (before the ZeroBlockOptimizer was
    built, or after, so the order drawn at a later switch differs).  The ranks' shard updates and DeepSpeed's
    optimizer reduce one rank's gradients of a block with the other's of another block: the first backward hung
    in a reduce-scatter until the process group's timeout (30 minutes by default), and where the blocks' shapes
    agree the sums would pair different weights.  Now the first forward after the roles change is refused on every
    rank, before any shard moves, naming the remedy (as under DDP); so are ranks that train alike but were given
    different ``BREAD_ZERO_CHUNK_BYTES`` (their reduce-scatters would split each weight apart, and hang)."""
    # a hang raises subprocess.TimeoutExpired here and fails the test
    results = launched_results(tmp_path, "ranks-apart run", "--ranks-apart", timeout=150)
    for rank in (0, 1):
        r = results[("ranks_apart", rank)]
        for when in ("at_start", "at_a_switch"):
            refused, moved, trained = r[when]["refused"], r[when]["moved"], r[when]["trained"]
            assert refused is not None and "the ranks train different parameters" in refused and \
                "seed every rank the same" in refused, (when, refused)
            assert moved == [], (when, moved)
            assert trained == results[("ranks_apart", 1 - rank)][when]["trained"]  # the same blocks until refused
        assert r["at_start"]["trained"] == []
        assert len(r["at_a_switch"]["trained"]) >= LAYERS  # the first order, drawn alike, trained through
        chunks = r["chunks_apart"]
        assert chunks["refused"] is not None and "BREAD_ZERO_CHUNK_BYTES" in chunks["refused"], chunks["refused"]
        assert chunks["moved"] == [] and chunks["trained"] == []


def test_config_refusals_and_version_check():
    from bread_kernels.integrations import deepspeed as bkds

    ok = {"zero_optimization": {"stage": 3}}
    assert bkds.check_config(ok) == ok
    bad = {
        "stage 2": ({"stage": 2}, "stage is 2"),
        "hpZ": ({"stage": 3, "zero_hpz_partition_size": 2}, "hpZ"),
        "quantized weights": ({"stage": 3, "zero_quantized_weights": True}, "zero_quantized_weights"),
        "quantized frozen": ({"stage": 3, "zero_quantized_nontrainable_weights": True}, "nontrainable"),
        "param offload": ({"stage": 3, "offload_param": {"device": "cpu"}}, "offload_param"),
        # DeepSpeed's deprecated spelling of the same, and ZenFlow with its defaults: both got through
        "deprecated param offload": ({"stage": 3, "cpu_offload_param": True}, "parameter offload to 'cpu'"),
        "zenflow defaults": ({"stage": 3, "zenflow": {}}, "ZenFlow"),
    }
    for what, (zero, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            bkds.check_config({"zero_optimization": zero})
    # torch_autocast's fp16 GradScaler scales the loss outside the loss scale the on-the-fly updates divide out
    with pytest.raises(ValueError, match="torch_autocast with float16 is not supported: .*65536x"):
        bkds.check_config({"zero_optimization": {"stage": 3}, "torch_autocast": {"enabled": True, "dtype": "float16"}})
    bkds.check_config({"zero_optimization": {"stage": 3}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    # a config scheduler never acted: the block optimizer sets the lr at every step
    with pytest.raises(ValueError, match="'scheduler' in the config would never act"):
        bkds.check_config({"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR", "params": {}}})
    # DeepSpeed then tells a boundary only inside step(): the block schedule never ran (a reviewer's run on 1 rank)
    with pytest.raises(ValueError, match="managed_gradient_accumulation: false is not supported"):
        bkds.check_config({"zero_optimization": {"stage": 3}, "managed_gradient_accumulation": False})
    with pytest.raises(ValueError, match="DeepCompile .* is not supported"):
        bkds.check_config({"zero_optimization": {"stage": 3}, "compile": {"deepcompile": True}})
    bkds.check_config({"zero_optimization": {"stage": 3}, "compile": {"deepcompile": False}})
    for fine in ({"stage": 3, "offload_param": {"device": "none"}}, {"stage": 3, "zenflow": None},
                 {"stage": 3, "offload_optimizer": {"device": "cpu"}}):
        assert bkds.check_config({"zero_optimization": fine})["zero_optimization"] == fine
    assert bkds.check_version("0.19.8") is True
    with pytest.warns(RuntimeWarning, match="written for DeepSpeed 0.19"):
        assert bkds.check_version("0.20.0") is False


def test_static_internals_present():
    """Fails loudly when DeepSpeed or torch drop a member the integration uses (the live canary runs in the
    2-rank worker)."""
    from bread_kernels.integrations import deepspeed as bkds

    assert bkds.internals_problems() == []


def test_the_integration_tells_patch_the_sizes_of_partitioned_parameters():
    """Importing the integration registers the ZeRO-3 parameters' whole sizes (``ds_numel``) with patch's discovery,
    which weighs a model built under zero.Init (empty tensors) as one built whole (the 2-rank zero_init case patches
    a real one)."""
    import torch

    import bread_kernels.integrations.deepspeed  # noqa: F401 - registers the sizes
    from bread_kernels.patch import _find_block_stack
    from tests.test_patch import _VisionAndText

    model = _VisionAndText()
    for i, p in enumerate(model.parameters()):  # as zero.Init leaves them
        p.ds_id, p.ds_numel, p.ds_shape, p.ds_tensor = i, p.numel(), p.shape, torch.empty(0)
        p.data = torch.empty(0)
    assert _find_block_stack(model)[0] == "layers"


@pytest.mark.parametrize("family", ["falcon", "qwen3_moe"])
def test_a_model_built_partitioned_is_fused_and_weighed_as_one_built_whole(family):
    """A model with empty tensors, as zero.Init leaves them, is fused as one built whole: Falcon's FalconLinear layers
    (the probe never reads the weight; it refused one that was not 2-D, and patch warned that they compute something
    else), a Qwen3-MoE's experts (found by their whole 3-D shapes; none were, unsaid); and fused_fraction weighs the
    block parameters by their whole sizes (it read the empty tensors' 0 elements as 'all fused')."""
    import torch

    import bread_kernels.integrations.deepspeed  # noqa: F401 - registers the sizes and shapes
    from bread_kernels import patch
    from bread_kernels.patch import fused_fraction, patched_state
    from tests import model_zoo

    build = getattr(model_zoo, family)
    whole_model = patch(build())
    whole = fused_fraction(whole_model)
    model = build(seed=1)
    for i, p in enumerate(model.parameters()):  # as zero.Init leaves them
        p.ds_id, p.ds_numel, p.ds_shape, p.ds_tensor = i, p.numel(), p.shape, torch.empty(0)
        p.data = torch.empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = patch(model)
    assert fused_fraction(model) == whole and whole["fraction_of_linear_and_expert"] == 1.0
    assert [n for n, _ in patched_state(model).expert_weights()] == \
        [n for n, _ in patched_state(whole_model).expert_weights()]


def test_initialize_needs_the_zero_block_optimizer():
    import torch

    from bread_kernels import BlockOptimizer
    from bread_kernels.integrations import deepspeed as bkds

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with warnings.catch_warnings():  # the unpatched model's slow-path warning (said once per process)
        warnings.simplefilter("ignore")
        opt = BlockOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters()),
                             block_prefix_list=[["0."], ["1."]], verbose=0)
    with pytest.raises(TypeError, match="ZeroBlockOptimizer"):
        bkds.initialize(model, opt, config={"zero_optimization": {"stage": 3}})


class _RecordingDeepSpeedEngine:
    """What ZeroBlockEngine forwards a checkpoint to: a save writes DeepSpeed's folder and records which parameters
    required grad during it; a load records its arguments and, with ``fail_load``, fails as DeepSpeed 0.19's does
    for a checkpoint saved with another block active, on the first parameter trained then and frozen now."""

    global_steps, global_rank, local_rank, micro_steps = 5, 0, 0, 0
    _is_gradient_accumulation_boundary = None  # DeepSpeed tells the boundary (micro_steps counts micro-batches)

    def __init__(self, model):
        self.model, self.saved, self.loads, self.fail_load = model, [], [], True

    def use_node_local_storage(self):
        return False


    def load_universal_checkpoint(self):
        return False

    def gradient_accumulation_steps(self):
        return 2

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(tag)
        self.saved.append((tag, [n for n, p in self.model.named_parameters() if p.requires_grad]))

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loads.append((tag, kwargs))
        if self.fail_load:
            raise KeyError("model.layers.0.self_attn.q_proj.weight")
        return load_dir, {}


def _engine_without_deepspeed(sgd_mode):
    import torch

    import bread_kernels
    from bread_kernels.integrations import deepspeed as bkds
    from tests.model_zoo import llama

    model = bread_kernels.patch(llama())
    opt = bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                                  sgd_mode=sgd_mode, verbose=0)
    ds = _RecordingDeepSpeedEngine(model)
    return model, opt, ds, bkds.ZeroBlockEngine(ds, opt)


def test_a_step_deepspeed_skipped_for_an_fp16_overflow_is_not_counted():
    """DeepSpeed skips its step when fp16's loss scale overflowed (its optimizer's ``overflow``); the block
    optimizer counted it all the same, so the block trained fewer real steps than ``switch_block_every`` (a
    GradScaler that skips BlockOptimizer.step does not count it)."""
    import types

    model, opt, ds, engine = _engine_without_deepspeed("disabled")
    from bread_kernels.integrations.deepspeed.engine import SKIPPED_STEPS_WARNING

    ds.optimizer = types.SimpleNamespace(overflow=True)
    assert engine.after_engine_step() is False
    assert (opt.global_step, opt.block_step) == (0, 0)
    ds.optimizer.overflow = False
    assert engine.after_engine_step() is False  # counted, no switch due yet
    assert (opt.global_step, opt.block_step) == (1, 1)
    # a long run of skipped steps (gradients that stay non-finite) would stall the schedule in silence: warned once
    ds.optimizer.overflow = True
    limit = max(SKIPPED_STEPS_WARNING, opt.switch_block_every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(limit + 3):
            engine.after_engine_step()
    said = [str(w.message) for w in caught if "DeepSpeed skipped the last" in str(w.message)]
    assert said == [f"bread_kernels: DeepSpeed skipped the last {limit} steps (an fp16 overflow or a non-finite "
                    f"gradient norm each time), none counted: block {opt.order.current} has trained none of them and "
                    "the block schedule waits for a step that is not skipped. Check the loss, the lr and the loss "
                    "scale"]
    assert (opt.global_step, opt.block_step) == (1, 1)
    opt.close()


@pytest.mark.parametrize("sgd_mode", ["disabled", "all"])
def test_a_checkpoint_holds_the_hook_updated_weights_and_the_schedule(tmp_path, sgd_mode):
    """DeepSpeed saves its optimizer's parameters and those that do not require grad; the norms a hook updates on
    the fly require grad outside its optimizer, so they came back at their initial values from a checkpoint saved
    with sgd_mode="all".  During the save they do not require grad, and afterwards they do again; the block schedule
    lands in the checkpoint's folder, under DeepSpeed's default tag.  A save between the micro-batches of a step is
    refused, told by DeepSpeed's micro-step count or, where the caller sets the boundary (accelerate under the
    Trainer, whose micro_steps count optimizer steps: a Trainer with accumulation 2 saving at step 3 was refused),
    by the boundary flag."""
    import torch

    from bread_kernels.integrations.deepspeed.engine import SCHEDULE_FILE

    model, opt, ds, engine = _engine_without_deepspeed(sgd_mode)
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    hook_updated = list(opt.driver.unfused_on_the_fly)
    assert bool(hook_updated) == (sgd_mode == "all") and all("norm" in n for n in hook_updated)
    engine.save_checkpoint(tmp_path)
    tag, required_grad = ds.saved[0]
    assert tag == "global_step5"
    assert required_grad == [n for n in before if n not in hook_updated]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before
    schedule = torch.load(tmp_path / tag / SCHEDULE_FILE, weights_only=True)
    assert schedule["order"] == opt.order.state_dict() and schedule["group_layout"] == opt.group_layout
    assert sum(map(len, schedule["group_layout"])) == sum(p.requires_grad for p in model.parameters()) - \
        len(hook_updated)
    with pytest.raises(ValueError, match="exclude_frozen_parameters=True would leave out the frozen parameters, "
                                         ".* every block trained earlier"):
        engine.save_checkpoint(tmp_path, tag="other", exclude_frozen_parameters=True)
    ds.micro_steps = 11  # the first of a step's 2 micro-batches has run
    with pytest.raises(RuntimeError, match="1 of the 2 micro-batches of this optimizer step have run: .* Save after "
                                           "the engine.step"):
        engine.save_checkpoint(tmp_path, tag="midstep")
    assert len(ds.saved) == 1 and not (tmp_path / "midstep").exists()
    # accelerate under the Trainer sets the boundary before each backward and steps at it only: micro_steps counts
    # optimizer steps (11 after 11 of them, whatever the accumulation) and the flag says where the last backward was
    ds._is_gradient_accumulation_boundary = False
    with pytest.raises(RuntimeError, match="some of the 2 micro-batches of this optimizer step have run"):
        engine.save_checkpoint(tmp_path, tag="midstep")
    ds._is_gradient_accumulation_boundary = True
    engine.save_checkpoint(tmp_path, tag="after_step")
    assert [tag for tag, _ in ds.saved] == ["global_step5", "after_step"]
    opt.close()


def test_a_schedule_of_other_blocks_is_refused_before_anything_loads(tmp_path):
    import torch

    from bread_kernels.integrations.deepspeed.engine import SCHEDULE_FILE

    model, opt, ds, engine = _engine_without_deepspeed("all")
    engine.save_checkpoint(tmp_path, tag="t")
    schedule = torch.load(tmp_path / "t" / SCHEDULE_FILE, weights_only=True)
    torch.save({**schedule, "blocks": schedule["blocks"][:-1]}, tmp_path / "t" / SCHEDULE_FILE)
    state = (opt.order.state_dict(), opt.global_step, dict(opt.roles))
    with pytest.raises(ValueError, match="ZeroBlockEngine.load_checkpoint: the saved run's blocks .* build it with"):
        engine.load_checkpoint(tmp_path)
    assert ds.loads == [] and (opt.order.state_dict(), opt.global_step, dict(opt.roles)) == state
    # an engine that has stepped: DeepSpeed loads ZeRO-3 only into one that has not (a second train() of the Trainer
    # with resume_from_checkpoint loaded 18 weights into the trained engine before it was refused)
    engine.save_checkpoint(tmp_path, tag="t")
    ds.micro_steps = 3
    with pytest.raises(RuntimeError, match="this engine has stepped .* nothing was loaded. Load into a fresh engine"):
        engine.load_checkpoint(tmp_path)
    assert ds.loads == [] and (opt.order.state_dict(), opt.global_step, dict(opt.roles)) == state
    opt.close()


@pytest.mark.parametrize("weights_only", [dict(load_module_only=True), dict(load_optimizer_states=False)])
def test_a_weights_only_load_leaves_the_schedule(tmp_path, weights_only):
    """load_module_only / load_optimizer_states=False load the weights only: the block schedule starts afresh
    (it is not taken from the checkpoint, and nothing is rebuilt), and DeepSpeed gets the caller's arguments."""
    model, opt, ds, engine = _engine_without_deepspeed("all")
    engine.save_checkpoint(tmp_path, tag="t")
    opt.global_step = 7
    ds.fail_load = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.load_checkpoint(tmp_path, **weights_only) == (tmp_path, {})
    (tag, arguments), = ds.loads
    assert tag == "t" and all(arguments[k] == v for k, v in weights_only.items())
    assert opt.global_step == 7
    opt.close()


def test_a_deepspeed_checkpoint_without_the_schedule_warns_and_names_start_block(tmp_path):
    """A checkpoint saved by DeepSpeed's own save_checkpoint (no schedule beside it) loads as DeepSpeed loads it,
    with a warning that the block schedule starts afresh; saved with another block active, the error names
    start_block=."""
    model, opt, ds, engine = _engine_without_deepspeed("disabled")
    ds.save_checkpoint(str(tmp_path), tag="global_step3")
    with pytest.warns(RuntimeWarning, match="has no bread_kernels_block_schedule.pt .* start afresh"), \
            pytest.raises(ValueError, match="saved by DeepSpeed's own save_checkpoint, .* with another block active "
                                            ".* start_block="):
        engine.load_checkpoint(tmp_path)
    assert [tag for tag, _ in ds.loads] == ["global_step3"]
    opt.close()


def test_a_weights_only_load_with_another_block_active_names_the_saved_block(tmp_path):
    """A checkpoint of ZeroBlockEngine.save_checkpoint loaded weights only (load_module_only, as the refusal of
    another variant suggests) into an optimizer whose active block is not the saved run's: DeepSpeed fails on the
    first weight trained then and frozen now.  The error said the checkpoint was saved by DeepSpeed's own
    save_checkpoint; it now names the saved run's active block as the start_block to build with."""
    model, opt, ds, engine = _engine_without_deepspeed("all")
    engine.save_checkpoint(tmp_path, tag="t")
    saved_block = opt.order.current
    other = type(engine)(ds, _rebuilt_at_another_block(model, opt))
    with pytest.raises(ValueError, match=f"this weights-only load .* saved run had block {saved_block} active .* "
                                         f"start_block={saved_block}"):
        other.load_checkpoint(tmp_path, load_module_only=True)
    other.block_optimizer.close()


@pytest.mark.parametrize("weights_only", [dict(load_module_only=True), dict(load_optimizer_states=False)])
def test_a_weights_only_load_of_a_tag_latest_does_not_name_is_refused_before_anything_loads(tmp_path, weights_only):
    """DeepSpeed 0.19's weights-only ZeRO-3 load rebuilds the weights its optimizer trains from the checkpoint that
    ``latest`` names (``get_fp32_state_dict_from_zero_checkpoint(load_dir)``, without the tag) and the frozen ones
    from the tag asked for: on 2 gloo ranks, tag "a" loaded so while ``latest`` named "b" gave the active block's 9
    weights from "b" and the rest from "a", silently.  Refused now before DeepSpeed is called; the tag ``latest``
    names loads."""
    model, opt, ds, engine = _engine_without_deepspeed("all")
    engine.save_checkpoint(tmp_path, tag="a")
    engine.save_checkpoint(tmp_path, tag="b")
    ds.fail_load = False
    with pytest.raises(ValueError, match="weights-only load .* of tag 'a', while .*latest names 'b'.* nothing was "
                                         "loaded"):
        engine.load_checkpoint(tmp_path, tag="a", **weights_only)
    assert ds.loads == []
    engine.load_checkpoint(tmp_path, tag="b", **weights_only)
    assert [tag for tag, _ in ds.loads] == ["b"]
    opt.close()


def _rebuilt_at_another_block(model, opt):
    """A ZeroBlockOptimizer over ``model`` like ``opt`` but starting at another block (``opt`` closed)."""
    import torch

    from bread_kernels.integrations import deepspeed as bkds

    other = next(i for i in range(opt.block_num) if i != opt.order.current)
    opt.close()
    return bkds.ZeroBlockOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), list(model.named_parameters()),
                                   sgd_mode="all", verbose=0, start_block=other)


def _run_example(*args: str, launcher: str = "deepspeed") -> str:
    """``python/zero3_example.py`` on 2 CPU ranks (small settings, signSGD, GAS 2) under ``launcher``: "deepspeed"
    (its launcher, as the example's docstring runs it) or "torchrun"."""
    if launcher == "deepspeed":
        path = shutil.which("deepspeed")
        if path is None:
            pytest.skip("the deepspeed launcher is not on PATH")
        command = [path, "--num_gpus", "2", "--master_port", str(free_port())]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    command += ["python/zero3_example.py", "--layers", "2", "--hidden", "32", "--seq", "16", "--micro-batch", "2",
                "--gas", "2", "--sign-sgd", "--switch-every", "1", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _steps(output: str) -> list[tuple[int, str, int]]:
    """(step, loss, the block it trained) of each step the example printed."""
    return [(int(s), loss, int(b)) for s, loss, b in re.findall(r"step (\d+): loss (\S+) .*active block (\d+)",
                                                                 output)]


def test_example_runs_under_the_deepspeed_launcher(tmp_path):
    """``deepspeed --num_gpus 2 python/zero3_example.py`` on this CPU machine (small settings, signSGD, GAS 2) trains 2
    steps and saves; its ``--resume`` (under torchrun, as its docstring also runs it) trains the third step alone, on
    the block the schedule saved.  That the resumed run is the uninterrupted one bit for bit is the worker's
    ``RESUME_CASES`` (the same save and load, one launch for all of them; each launch here costs ~20 s)."""
    first = _steps(_run_example("--steps", "2", "--save", str(tmp_path / "ckpt")))
    # descending from the top block, switching after every step: the block each step trained (it printed the next)
    assert [(step, block) for step, _, block in first] == [(0, 1), (1, 0)], first
    rest = _steps(_run_example("--steps", "3", "--resume", str(tmp_path / "ckpt"), launcher="torchrun"))
    assert [(step, block) for step, _, block in rest] == [(2, 1)], rest
    assert all(float(loss) > 0 for _, loss, _ in first + rest)


def test_example_trains_with_the_trainer(tmp_path):
    """``python/zero3_example.py --trainer``: the Hugging Face Trainer with ``deepspeed=`` and BreadTrainerMixin under
    the deepspeed launcher trains and saves checkpoint-2 with the block schedule beside DeepSpeed's files, which says
    block 1 comes next (descending, a switch after every step: 1, 0, then 1); ``--resume`` (its
    resume_from_checkpoint, under torchrun) trains the third step alone and saves checkpoint-3, whose schedule says
    block 0 comes next.  That a Trainer checkpoint resumes exactly, through the Trainer and in the loop, is tested by
    the Trainer worker (test_a_trainer_checkpoint_resumes_exactly_...)."""
    import torch

    from bread_kernels.integrations.deepspeed.engine import SCHEDULE_FILE

    output = _run_example("--trainer", "--steps", "2", "--save", str(tmp_path / "out"))
    assert "trainer step 1: loss" in output, output[-3000:]
    schedule = torch.load(tmp_path / "out" / "checkpoint-2" / "global_step2" / SCHEDULE_FILE, weights_only=True)
    assert schedule["global_step"] == 2 and schedule["order"]["current"] == 1, schedule
    output = _run_example("--trainer", "--steps", "3", "--resume", str(tmp_path / "out" / "checkpoint-2"), "--save",
                          str(tmp_path / "out"), launcher="torchrun")
    assert re.findall(r"trainer step (\d+): loss", output) == ["2"], output[-3000:]
    schedule = torch.load(tmp_path / "out" / "checkpoint-3" / "global_step3" / SCHEDULE_FILE, weights_only=True)
    assert schedule["global_step"] == 3 and schedule["order"]["current"] == 0, schedule
