"""The model benchmark's positions run one after another in one process: each position's models and optimizers
are gone when the next one starts, so the process does not grow by a model per position."""

import gc
import weakref

import pytest
import torch

from bread_kernels.bench import model as model_bench


@pytest.mark.parametrize("variants", [("BAdam", "BREAD-SGD"), ("BREAD",)], ids=["dense", "lora"])
def test_positions_do_not_accumulate_models(monkeypatch, tmp_path, variants):
    engines, alive_at_start = [], []
    original_patch = model_bench.patch

    def recording_patch(model, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in engines))
        patched = original_patch(model, **kwargs)
        engines.append(weakref.ref(patched))
        return patched

    monkeypatch.setattr(model_bench, "patch", recording_patch)
    monkeypatch.setattr(model_bench, "gemm_flops_per_second", lambda *a, **k: 1e9)
    lines = []
    model_bench.run(positions=(0, 1, 2), variants=variants, progress=False, out_dir=tmp_path, batch=1, seq=8, repeats=1, print_fn=lines.append,
                    lora_rank=2, layers=3, hidden=32, intermediate=40, heads=2, vocab=61)
    assert len(engines) == 1 + 3 * len(variants) and any(line.startswith("mean over positions") for line in lines)
    # the probe, then one engine per position: when a new one is patched at most the previous one is alive
    assert max(alive_at_start) <= 1, alive_at_start
    gc.collect()
    assert [ref() for ref in engines] == [None] * len(engines)


def test_the_profile_counts_each_sides_gemms_and_the_engine_skips_the_frozen_ones(monkeypatch, tmp_path):
    """BAdam at the top block: the engine and the best-configured reference stop at the active block, the reference
    as users run it goes through every block, so it runs more GEMMs than either."""
    monkeypatch.setattr(model_bench, "gemm_flops_per_second", lambda *a, **k: 1e9)
    lines = []
    result = model_bench.run(positions=(2,), variants=("BAdam",), progress=False, out_dir=tmp_path, batch=1, seq=8,
                             repeats=1, print_fn=lines.append, profile=True, layers=3, hidden=32, intermediate=40,
                             heads=2, vocab=61)
    profile = result["rows"][0]["profile"]
    gemms = {side: profile[side]["gemm_calls"] for side in ("engine", "reference", "best_reference")}
    assert 0 < gemms["engine"] <= gemms["best_reference"] < gemms["reference"], gemms
    assert all(profile[side]["ops"] > profile[side]["gemm_calls"] for side in profile)  # counts, not times
    assert any(line.startswith("profiled forward + backward") for line in lines)


def test_the_flop_ratio_is_a_settled_steps(monkeypatch, tmp_path):
    """The FLOPs column counts a step like the timed ones: with ``keep_top="auto"``, which keeps one block in the
    first step after new plans and one more each step (here all three: vocabulary 1001 against 8 tokens), the
    ratio is the one of keeping all three from the start (``keep_top=3``), below the first step's."""
    monkeypatch.setattr(model_bench, "gemm_flops_per_second", lambda *a, **k: 1e9)
    shape = dict(positions=(0,), variants=("BAdam",), progress=False, out_dir=tmp_path, batch=1, seq=8, repeats=1,
                 print_fn=lambda line: None, layers=3, hidden=32, intermediate=40, heads=2, vocab=1001)
    auto = model_bench.run(**shape)["rows"][0]["flop_ratio"]
    all_kept = model_bench.run(keep_top=3, **shape)["rows"][0]["flop_ratio"]
    one_kept = model_bench.run(keep_top=1, **shape)["rows"][0]["flop_ratio"]
    assert auto == pytest.approx(all_kept, rel=1e-9)
    assert all_kept < one_kept


def test_the_gemm_rate_is_the_best_measured_and_every_rows_ideal_fraction_uses_it(monkeypatch, tmp_path):
    """Measured once at the start, a slow spell of a shared machine put every row's ideal fraction past 100%."""
    rates = iter([2e9, 9e9, 3e9, 4e9])  # the start, then before each of the three cases
    monkeypatch.setattr(model_bench, "gemm_flops_per_second", lambda *a, **k: next(rates))
    result = model_bench.run(positions=(0, 1, 2), variants=("BAdam",), progress=False, out_dir=tmp_path, batch=1,
                             seq=8, repeats=1, print_fn=lambda line: None, layers=3, hidden=32, intermediate=40,
                             heads=2, vocab=61)
    assert result["gemm_gflops"] == 9.0
    for row in result["rows"]:
        ideal_seconds = row["ideal_gflop"] / 9.0
        assert row["ideal_fraction"] == pytest.approx(ideal_seconds / (row["engine_ms"] / 1e3), rel=1e-12)
    assert len({row["ideal_gflop"] for row in result["rows"]}) == 3  # the cases' own FLOPs


def test_the_host_suite_times_every_role(capsys):
    from bread_kernels.bench import host

    rows = host.run(calls=3)
    assert set(rows) == {"ACTIVE", "SGD", "SIGN", "FROZEN", "SGD hook", "SIGN hook"}
    keys = {"engine_us", "reference_us", "engine_forward_us", "reference_forward_us"}
    assert all(set(r) == keys and all(isinstance(v, float) for v in r.values()) for r in rows.values())  # not speed


def test_grouped_query_attention_counts_as_its_heads_broadcast():
    """torch < 2.13's FLOP counter asserts on key/value with fewer heads than the query (the GPU default model):
    the bench's formulas count each key/value head once per query head it serves."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(q, k, v, **kwargs):
        with FlopCounterMode(display=False, custom_mapping=model_bench.extra_flop_formulas()) as counter:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
        return counter.get_total_flops()

    q = torch.randn(2, 6, 9, 4, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 4, requires_grad=True) for _ in range(2))
    broadcast = [t.detach().repeat_interleave(3, dim=1).requires_grad_() for t in (k, v)]
    b, h, s, d = q.shape  # QKᵀ, PV forward; QKᵀ again, dV, dP, dQ, dK backward: 7 products of 2·b·h_q·s²·d
    assert count(q, k, v, enable_gqa=True) == count(q, *broadcast) == 14 * b * h * s * s * d


def test_the_native_backends_gated_update_counts_as_its_gemm():
    """The bench's FLOP ratio: the native CPU backend's SGD update (nearest rounding, as the verification step runs
    it) is one ``bread_kernels::addmm_if_finite_`` op, which torch's counter does not know; counted, it is W's
    GEMM."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bread_kernels.backends import get_backend

    if type(get_backend(torch.device("cpu"))).__name__ != "NativeBackend":
        pytest.skip("the native CPU backend is not built here")
    w, g, x = torch.zeros(6, 5), torch.randn(7, 6), torch.randn(7, 5)  # W [N, K] += gᵀx, g [M, N], x [M, K]
    with FlopCounterMode(display=False, custom_mapping=model_bench.extra_flop_formulas()) as counter:
        torch.ops.bread_kernels.addmm_if_finite_(w, g, x, 1.0, [g, x])
    assert counter.get_total_flops() == 2 * 6 * 7 * 5


def test_settle_runs_until_auto_keeps_as_many_blocks_as_every_later_step():
    """The bench measures peaks and times after :func:`settle`: ``keep_top="auto"`` grows by a block per step after
    new plans, so a peak taken at the first step would be the top block's alone."""
    import torch

    import bread_kernels
    from bread_kernels.patch import patched_state
    from tests.test_stream import _block_optimizer, _llama_with_a_large_vocabulary

    model = bread_kernels.patch(_llama_with_a_large_vocabulary(torch.float32))
    opt = _block_optimizer(model, switch_mode="fixed", start_block=0)
    ids = torch.randint(0, 1001, (4, 61), generator=torch.Generator().manual_seed(0))
    stream = patched_state(model).stream
    model_bench.settle(model, opt, ids)
    settled = stream.kept
    model(input_ids=ids, labels=ids).loss.backward()
    assert stream.kept == settled > 1


def test_grouped_mm_counts_as_the_per_expert_products():
    """transformers' MoE experts run aten._grouped_mm, which the FLOP counter did not count: the FLOPs column read
    3.05 on Mixtral (the engine's per-expert mm counted, the reference's experts not)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bread_kernels.bench.model import extra_flop_formulas

    if not hasattr(torch.ops.aten, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    x, w = torch.randn(13, 16, dtype=torch.bfloat16), torch.randn(3, 16, 8, dtype=torch.bfloat16)
    offs = torch.tensor([4, 9, 13], dtype=torch.int32)
    g = torch.randn(13, 8, dtype=torch.bfloat16)
    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        torch.ops.aten._grouped_mm(x, w, offs)  # the experts' forward: each row through its expert
        torch.ops.aten._grouped_mm(x.t(), g, offs)  # their dW: [G, K, N]
    assert counter.get_total_flops() == 2 * (2 * 13 * 16 * 8)


def test_lora_targets_of_an_moe_with_a_shared_expert_leave_out_the_expert_weight_names():
    """DeepSeek-V3's dense and shared-expert MLPs have a down_proj linear, and its experts a down_proj parameter:
    peft turns a target named down_proj (gate_proj, up_proj) into LoRA on the expert parameters (which patch
    refuses: the bench's BREAD variants crashed), so their targets leave them out, and the LoRA model patches."""
    import warnings

    import bread_kernels
    from tests.model_zoo import deepseek_v3

    model = bread_kernels.patch(deepseek_v3())
    targets = model_bench.lora_targets(model)
    bread_kernels.unpatch(model)
    assert not {"gate_proj", "up_proj", "down_proj"} & set(targets) and "q_a_proj" in targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bread_kernels.patch(model_bench.with_lora(model, 4, targets))
