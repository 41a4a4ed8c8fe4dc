"""DistributedDataParallel, FSDP2 and DeepSpeed engines (2 CPU ranks, gloo): DDP against single-process runs, the
refusals of the others.

A block optimizer changes which parameters require grad at every switch, and DDP averages only those that did
when it was built (a Trainer builds it after the optimizer), so without the driver's own average the second
block's gradients stayed each rank's own and the replicas drifted apart silently.  One ``torchrun`` launch runs
every case of ``data_parallel_worker.CASES`` (4 steps, a block switch after each, each rank on its own data):

* BAdam with DDP built after the optimizer (a Trainer's order) and before it, and with gradient accumulation under
  ``no_sync()``: every parameter equals the reference (plain autograd, SGD on the ranks' mean loss) within fp32
  rounding, and both ranks hold the same parameters;
* BREAD (peft LoRA, ``lora_mode="all"``), BREAD-SGD (``sgd_mode="all"``; "partial" with sign and accumulation under
  ``no_sync()``; accumulation with DDP synchronising every micro-batch, where DDP's own end of the backward comes
  before the driver's; with LoRA), whose on-the-fly updates take the ranks' averaged gradient — a fused Linear's,
  the head's, the experts' (a rank that routed an expert no token sends zeros) and the embedding's inside the
  backward (all-reduced chunk by chunk, no whole gradient), the hook path's small weights' at the end of it: equal
  to the same optimizer run in one process on the ranks' mean loss (with the head by vocabulary tiles there);
* BREAD-SGD under DDP around a module whose loss calls the decoder and the head apart (``lm.model(...)``,
  ``lm.lm_head``: no forward of the patched model itself): before, none of the driver's DDP work ran there and the
  replicas drifted apart silently; now equal to the one-process run, as through the model's own forward;
* BREAD-SGD with a background evaluation (a forward of the model under ``torch.no_grad()`` in another thread) in the
  middle of each training forward: before, the evaluation's end forgot the DDP forward the training forward had
  noted, so the on-the-fly updates went unaveraged; now equal to the one-process run;
* ranks that train different blocks (a random order seeded apart) are refused at the forward, before any update;
* a ``transformers.Trainer`` under torchrun (DDP, gradient clipping) ends with the same parameters on both ranks;
* on-the-fly updates in a process group of several ranks outside DDP are refused — at a patched model's forward, or
  when an unpatched model's optimizer is built — before any weight changed; ``BREAD_INDEPENDENT_RANKS=1`` lets each
  rank train a model of its own;
* a DeepSpeed engine (ZeRO 0 and 2) around a plain BlockOptimizer is refused at the first forward;
* FSDP2 (``fully_shard``: DTensor parameters, which the engine neither reads nor updates whole) is refused with the
  remedies — by ``patch`` on a sharded model, at the forward of a model sharded after ``patch``, and by the optimizer
  for an unpatched model's on-the-fly updates (before, a raw ``KeyError`` or an error inside the update op) — while
  unpatched BAdam still trains there;
* so is a patched model of which only a part was sharded after ``patch`` — each MLP by FSDP2, the head or each MLP
  by a tensor-parallel plan (``parallelize_module``): before, the forward's check looked at the first parameter of the
  model and of each block only, so these ran on, the tensor-parallel head into aten.mm's "got mixed torch.Tensor and
  DTensor" inside the fused loss; unpatched BAdam trains under tensor parallelism too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.integrations.data_parallel_worker import CASES, OTHER_PROBES  # noqa: E402
from tests.integrations.ranks import read_ranks, torchrun  # noqa: E402

WORKER = Path(__file__).with_name("data_parallel_worker.py")
ATOL, RTOL = 1e-6, 5e-5  # fp32: the ranks' dW summed in another order than one process's
#: bf16, in rounding steps of each tensor's dtype at its largest magnitude: round-to-nearest from an average summed in
#: another order (measured 1.2); stochastic rounding draws the same bits, but from a slightly different value a weight
#: can land one step apart and follow its own path (measured 2.5; two single-process runs seeded apart: 3.7)
BF16_STEPS = {"nearest": 4, "auto": 16}
#: fp16 (nearest), in its own rounding steps, 8x finer than bf16's: measured 5.2 against the summed-loss reference
FP16_STEPS = 16


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel") / "run"
    proc = torchrun(WORKER, out)
    assert proc.returncode == 0, f"the 2-rank run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    return read_ranks(out)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_training_under_ddp_equals_the_single_process_run(results, case, rank):
    result = results[(case, rank)]
    assert result["error"] is None, result["error"]
    assert result["moved"] > 1e-2, "the reference barely moved: the comparison would be vacuous"
    assert result["replicas_equal"], f"{case}: the ranks hold different parameters"
    assert result.get("scale_grew", True), "the loss scale never changed"
    if CASES[case].dtype in ("bfloat16", "float16"):
        steps = BF16_STEPS[CASES[case].rounding] if CASES[case].dtype == "bfloat16" else FP16_STEPS
        assert result["diff_steps"] <= steps, f"{case}, rank {rank}: {result['diff_steps']:.3g} rounding steps apart"
        return
    tol = ATOL + RTOL * result["moved"]
    assert result["diff"] <= tol, f"{case}, rank {rank}: |parameter - reference| = {result['diff']:.3g} > " \
        f"{tol:.3g} ({result['diff_where']})"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ["bread_sgd_without_ddp_refused", "bread_sgd_unpatched_refused"])
def test_an_on_the_fly_update_in_a_group_of_ranks_outside_ddp_is_refused(results, case, rank):
    """A patched model's forward outside DDP, an unpatched model's optimizer when it is built: before anything
    changes, naming DDP, ZeRO-3, BAdam and the opt-out."""
    result = results[(case, rank)]
    assert result["error"] is not None and "this process group has 2 ranks" in result["error"], result["error"]
    for remedy in ("DistributedDataParallel", "ZeRO-3", "sgd_mode='disabled'", "BREAD_INDEPENDENT_RANKS=1"):
        assert remedy in result["error"]
    assert result["unchanged"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_library_s_own_on_the_fly_hooks_under_ddp_are_refused(results, rank):
    """accelerate() on BlockOptimizers' class (its hooks update the parameters outside the fused modules)."""
    result = results[("library_hooks_sgd_under_ddp_refused", rank)]
    assert result["error"] is not None and "library's own hooks" in result["error"], result["error"]
    assert result["unchanged"]


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_training_different_blocks_are_refused(results, rank):
    """switch_mode="random" with the ranks seeded apart: before, one layer's gradient was averaged with another's and
    the replicas drifted apart silently.  Refused at the forward, before that step's averaged updates in the backward
    (BREAD-SGD, fused)."""
    result = results[("different_blocks_refused", rank)]
    assert result["error"] is not None and "the ranks train different parameters" in result["error"], result["error"]
    assert result["unchanged"], "a weight changed in the step the refusal came in"


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_patched_apart_are_refused_before_any_update(results, rank):
    """The same roles, but one rank fuses the block linears and the other leaves them to the hook path: their
    collectives would differ (gloo failed on the sizes, NCCL would hang)."""
    result = results[("different_patch_refused", rank)]
    assert result["error"] is not None and "update them differently" in result["error"], result["error"]
    assert "patch() or optimizer options that differ" in result["error"] and result["unchanged"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case.sgd_mode != "disabled"])
def test_on_the_fly_updates_under_ddp_average_inside_the_backward(results, case, rank):
    """A fused Linear's on-the-fly update under DDP runs inside the backward from the ranks' average, chunk by chunk
    (one all-reduce per chunk of dW rows), as in one process: autograd never makes its gradient (it does not require
    grad), and the weight has moved when the backward returns.  So do the head in the fused loss (its dW, accumulated
    in the forward, all-reduced in chunks) and the 3-D expert weights (every expert's rows, zero where a rank routed
    it no token) — before, both were written ACTIVE, their whole gradients in ``.grad`` until the end of the
    backward.  The input embedding's rows are all-gathered (sgd_mode "all").  A block's small linear (the hook path,
    patch's default for the tiny model; the fused loss takes the head whatever its size) takes the average at the
    end of the backward instead: its gradient lands in ``.grad`` first."""
    result = results[(case, rank)]
    fused = CASES[case].hook_update_numel == 0
    model = CASES[case].model
    assert result["probes"] == ["probe", *(what for what, *_ in OTHER_PROBES[model])]
    for what in result["probes"]:
        assert result[f"{what}_requires_grad"] is (what == "probe" and not fused), what
        assert result[f"{what}_moved_in_backward"] and not result[f"{what}_grad"], what
    assert result["all_reduces"] > 0  # the head's chunks at least (a small block linear's go to the end)
    if CASES[case].sgd_mode == "all" and CASES[case].model != "gpt2":  # GPT-2's embedding is tied: the hook path
        assert result["all_gathers"] > 0, "the embedding's rows were not averaged inside the backward"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case, skipped", [
    ("non_finite_on_one_rank", 30),  # 21 block linears, the embedding, the head, 7 norms
    # 12 attention linears, 6 expert weights, 3 routers, 13 norms (q/k norms too), the embedding, the head
    ("non_finite_on_one_rank_qwen3_moe", 36),
])
def test_a_non_finite_gradient_on_one_rank_skips_the_update_on_every_rank(results, case, skipped, rank):
    """Rank 1's loss is scaled by inf: the average is not finite, so every on-the-fly update of that backward is
    skipped on both ranks (the flag rides in each weight's first all-reduce, the experts' and the head's included;
    the end-of-backward ones see the average), with the same report."""
    result = results[(case, rank)]
    assert result["error"] is None, result["error"]
    assert result["on_the_fly_unchanged"]
    assert result["skipped"] == skipped, result["skip_warnings"]
    assert len(result["skip_warnings"]) == 1 and "not finite on some rank" in result["skip_warnings"][0]
    assert result["skip_warnings"] == results[(case, 1 - rank)]["skip_warnings"]


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_trains_its_own_model_with_the_opt_out(results, rank):
    result = results[("independent_ranks_train", rank)]
    assert result["error"] is None and result["moved"] > 1e-2


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("stage", [0, 2])
def test_a_deepspeed_engine_around_a_plain_block_optimizer_is_refused(results, stage, rank):
    """deepspeed.initialize (or the Trainer's deepspeed=) with ZeRO 0-2: before, ZeRO-1/2 failed inside DeepSpeed's
    hooks and BREAD-SGD at ZeRO-0 trained each rank on its own gradient without an error."""
    result = results[(f"deepspeed_zero{stage}_refused", rank)]
    assert result["error"] is not None and "a DeepSpeed engine drives this model" in result["error"]
    assert "ZeroBlockOptimizer" in result["error"] and result["unchanged"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_trainer_under_torchrun_keeps_the_replicas_equal(results, rank):
    result = results[("trainer", rank)]
    assert result["wrapped"] == "DistributedDataParallel" and result["switches"] == 4
    assert result["moved"] > 1e-3, "nothing moved: the comparison would be vacuous"
    assert result["replicas_equal"], "the ranks hold different parameters after the Trainer's run"


def test_the_ddp_internals_read_are_there():
    from bread_kernels.optim.data_parallel import check_internals

    check_internals()


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case, where", [
    ("fsdp_patch_refused", "patch: "),
    ("fsdp_sharded_after_patch_refused", "bread_kernels: "),
    ("fsdp_unpatched_on_the_fly_refused", "BlockOptimizer.set_roles (an on-the-fly"),
    ("fsdp_mlps_sharded_after_patch_refused", "bread_kernels: "),
    ("tp_head_sharded_after_patch_refused", "bread_kernels: "),
    ("tp_mlps_sharded_after_patch_refused", "bread_kernels: "),
])
def test_fsdp2_sharded_parameters_are_refused_with_the_remedies(results, case, where, rank):
    result = results[(case, rank)]
    assert result["error"] is not None and result["error"].startswith(where), result["error"]
    assert "is a DTensor" in result["error"] and "ZeRO-3" in result["error"]
    assert result["unchanged"] in (None, True)  # None: refused before a model existed to change


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ["fsdp_unpatched_badam_runs", "tp_unpatched_badam_runs"])
def test_unpatched_badam_still_trains_under_fsdp2_and_tensor_parallelism(results, case, rank):
    result = results[(case, rank)]
    assert result["error"] is None and result["unchanged"] is False
