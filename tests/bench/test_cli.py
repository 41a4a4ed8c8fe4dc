"""``python -m bread_kernels.bench`` on a tiny config: the JSON a user keeps, verified rows, the PNG, one-line
errors for bad input, and a verification that catches a wrong engine."""

import json
import subprocess
import sys

import pytest
import torch

from bread_kernels.bench import __main__ as cli
from bread_kernels.bench import model as model_bench

RUN = ["--batch", "1", "--seq", "8", "--repeats", "1", "--no-progress", "--device", "cpu"]
TINY = ["--layers", "3", "--hidden", "32", "--intermediate", "40", "--heads", "2", "--vocab", "61", *RUN]
ROW_FIELDS = {"variant", "engine_ms", "reference_ms", "time_ratio", "engine_peak_mib", "reference_peak_mib",
              "memory_ratio", "best_reference_ms", "best_time_ratio", "ideal_fraction", "verified"}


def test_the_cli_writes_verified_rows_json_and_png(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bread_kernels.bench", *TINY, "--positions", "0", "2",
                           "--variants", "BAdam", "BREAD-SGD-sign", "BREAD-partial", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())
    assert {"device", "dtype", "rows"} <= set(result) and result["dtype"] == "float32"
    assert len(result["rows"]) == 6 and all(ROW_FIELDS <= set(row) for row in result["rows"])
    assert all(row["verified"] for row in result["rows"])
    assert [(r["variant"], r["position"]) for r in result["rows"]][:2] == [("BAdam", 0), ("BAdam", 2)]
    png = (tmp_path / "bench_model_cpu_float32.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "BREAD-SGD-sign" in done.stdout and "USDT" not in done.stdout + done.stderr
    # the README's table is made from the JSON, between its markers
    from bread_kernels.bench import report

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.main([str(tmp_path / "bench_model_cpu_float32.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| BREAD-SGD-sign |" in text and result["device"] in text


@pytest.mark.parametrize("argv, message", [
    (["--variants", "BAdam", "LOMO"], "unknown variant 'LOMO'; choose from BAdam, BREAD-SGD-partial"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such file or directory"),
    (["--positions", "7"], "position 7 is not a block index of this model's 3 blocks"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'; choose from fp32, bf16, fp16"),
    (["mystery"], "unknown suite 'mystery'; choose from model, linear, lora"),
    (["--keep-top", "some"], "--keep-top must be 'auto' or a number of top blocks, got 'some'"),
    (["--keep-top", "4"], "keep_top must be 'auto' or an int in [0, 3] (the number of top blocks that keep"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),  # was read as "the default"
    (["--seq", "-4"], "--seq must be at least 1, got -4"),
    (["--seq", "1"], "--seq must be at least 2, got 1: a causal LM's loss scores each token by the ones before it"),
    (["--layers", "1"], "--layers must be at least 2"),
    (["--hidden", "33"], "--hidden 33 is not a multiple of --heads 2"),
    (["--kv-heads", "3", "--heads", "4", "--hidden", "32"], "--heads 4 is not a multiple of --kv-heads 3"),
    (["--device", "foo"], "--device 'foo': "),
    (["--variants", "BAdam", "BREAD-SGD", "BAdam"], "variant 'BAdam' is given twice; give each once"),
    (["--positions", "1", "1", "2"], "position 1 is given twice; give each once"),  # measured twice, mean skewed
    (["--keep-top", "²"], "--keep-top must be 'auto' or a number of top blocks, got '²'"),  # str.isdigit took it
    (["--keep-top", "-1"], "--keep-top must be 'auto' or a number of top blocks, got '-1'"),
])
def test_bad_input_gets_a_one_line_error(capsys, tmp_path, argv, message):
    base = RUN if "--model" in argv else TINY
    with pytest.raises(SystemExit) as stop:
        cli.main([*base, "--out", str(tmp_path), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2", "--heads", "3"], "--hidden 512 (the default model's) is not a multiple of --heads 3"),
    (["--hidden", "100"], "--hidden 100 is not a multiple of --heads 8 (the default model's)"),
    (["--kv-heads", "3"], "--heads 8 (the default model's) is not a multiple of --kv-heads 3"),
    (["--device", "meta"], "--device meta: the bench runs on cpu or cuda, not meta"),
    (["lora", "--device", "meta"], "--device meta: the bench runs on cpu or cuda, not meta"),
    (["linear", "--device", "meta"], "--device meta: the bench runs on cpu or cuda, not meta"),
])
def test_sizes_are_checked_against_the_default_model_and_the_device_is_one_the_bench_runs_on(capsys, tmp_path,
                                                                                              argv, message):
    """A size flag checked only when its partner was given too: a transformers traceback (or a failure deep in
    SDPA after building); a meta device gave tracebacks, and the lora suite timings labelled with the CPU's name."""
    if argv[0] in ("lora", "linear"):
        argv = [argv[0], "--tokens", "4", "--in-features", "8", "--out-features", "8", *argv[1:]]
    else:
        argv = ["--out", str(tmp_path), *RUN, *argv]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_sequence_longer_than_the_models_positions_is_refused(capsys, tmp_path):
    """GPT-2's position table raised a bare IndexError in the first forward."""
    import transformers

    path = tmp_path / "gpt2.json"
    path.write_text(transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=2, n_positions=16)
                    .to_json_string())
    with pytest.raises(SystemExit) as stop:
        cli.main(["--model", str(path), "--out", str(tmp_path), *RUN[:2], "--seq", "17", *RUN[4:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert "--seq 17 is longer than the model's 16 positions" in err[0] and "give --seq 16 or less" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["linear", "--variants", "BAdam"], "--variants is an option of the model suite; the linear suite prints"),
    (["lora", "--out", "somewhere"], "--out is an option of the model suite; the lora suite prints"),
    (["host", "--repeats", "3"], "the host suite takes no --repeats"),
    (["linear", "--batch", "4", "--seq", "3"], "--batch is an option of the model suite; the linear suite prints its "
                                               "table and takes --dtype, --repeats, --device, --out-features"),
    (["linear", "--layers", "9"], "--layers is an option of the model suite"),
    (["linear", "--lora-rank", "8"], "--lora-rank is an option of the model and lora suites; the linear suite"),
    (["linear", "--no-recompute"], "--no-recompute is an option of the model suite"),
    (["lora", "--no-progress"], "--no-progress is an option of the model suite"),
    (["host", "--out-features", "8", "--tokens", "3"], "--out-features is an option of the linear and lora suites; "
                                                       "the host suite prints its table and takes --dtype, --device"),
    (["--tokens", "5", "--out-features", "3"], "--tokens is an option of the linear and lora suites; the model suite "
                                               "does not read it"),
    (["model", "--in-features", "3"], "--in-features is an option of the linear and lora suites; the model suite"),
])
def test_a_suite_refuses_the_options_it_does_not_read(capsys, argv, message):
    """They printed their table and ignored --out, --model, --variants (and host --repeats), the model suite's
    sizes, --lora-rank, --no-recompute; the model suite ignored the linear and lora suites' sizes.  The first option
    a suite does not read is named, even one given at its default value."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_model_without_a_block_stack_gets_a_one_line_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2,
                                                      "vocab_size": 31, "n_positions": 16}))
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path / "config.json"), "--batch", "1", "--seq", "4", "--repeats", "1",
                  "--no-progress", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "found no block stack" in err[0], err


@pytest.fixture
def doubled_fused_step(monkeypatch):
    """The fused update (used by the engine only: the reference's hooks take the dense path) with a doubled step."""
    from bread_kernels.backends.chunked import ChunkedBackend

    original = ChunkedBackend.update_weight_

    def doubled(self, weight, grad_output, input, step, *args, **kwargs):
        return original(self, weight, grad_output, input, 2 * step, *args, **kwargs)

    monkeypatch.setattr(ChunkedBackend, "update_weight_", doubled)


def test_a_wrong_engine_fails_the_verification(doubled_fused_step, tmp_path):
    expected = r"BREAD-SGD at block 1 vs the reference: .*worst tensor \S+ \(role SGD\)"
    with pytest.raises(model_bench.VerificationError, match=expected):
        model_bench.run(variants=("BREAD-SGD",), positions=(1,), batch=1, seq=8, repeats=1, device="cpu",
                        out_dir=tmp_path, progress=False, print_fn=lambda line: None, layers=3, hidden=32,
                        intermediate=40, heads=2, vocab=61)
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written
    assert torch.get_default_dtype() == torch.float32


def test_a_failed_case_is_not_timed_and_the_others_still_are(doubled_fused_step, tmp_path):
    """One case failing its verification (a lent GPU's minutes must not all be lost to it): the cases that verify
    are timed and written, the failed one is listed in the JSON and not timed, and the run still raises."""
    with pytest.raises(model_bench.VerificationError, match=r"BREAD-SGD at block 1 .*1 other cases verified"):
        model_bench.run(variants=("BREAD-SGD", "BAdam"), positions=(1,), batch=1, seq=8, repeats=1, device="cpu",
                        out_dir=tmp_path, progress=False, print_fn=lambda line: None, layers=3, hidden=32,
                        intermediate=40, heads=2, vocab=61)
    written = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(r["variant"], r["verified"]) for r in written["rows"]] == [("BAdam", True)]
    assert [(f["variant"], f["position"]) for f in written["failures"]] == [("BREAD-SGD", 1)]
    assert list(written["summary"]) == ["BAdam"]
    from bread_kernels.bench import report

    lines = []
    report.print_table(written, lines.append)
    assert any(line.startswith("FAILED verification, not timed: BREAD-SGD at block 1") for line in lines)
    assert "FAILED verification, not timed: BREAD-SGD at block 1" in report.markdown_table(written)


def test_a_step_that_scores_no_token_is_not_verified(tmp_path):
    """A sequence of one token: the shifted labels score none, the loss is NaN on both sides and every gradient 0,
    and every case was "verified" (nothing moved on either side) and timed."""
    with pytest.raises(model_bench.VerificationError, match="the reference's loss is nan .*nothing to verify"):
        model_bench.run(variants=("BAdam",), positions=(1,), batch=1, seq=1, repeats=1, device="cpu",
                        out_dir=tmp_path, progress=False, print_fn=lambda line: None, layers=3, hidden=32,
                        intermediate=40, heads=2, vocab=61)
    assert not list(tmp_path.iterdir())


def test_an_out_that_cannot_take_the_results_is_refused_before_anything_runs(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as stop:
        cli.main([*TINY, "--out", str(afile)])
    assert stop.value.code == 2 and "is a file; give a directory" in capsys.readouterr().err


def test_the_spread_lies_within_the_measured_times():
    """The 20-80 % spread of two repeats extrapolated past them (19 and 52 ms printed as [6-65])."""
    assert model_bench._quantiles([19.0, 52.0]) == pytest.approx((25.6, 45.4))
    low, high = model_bench._quantiles([5.0, 100.0])
    assert 5.0 <= low <= high <= 100.0


def test_keep_top_reaches_the_engine_and_the_json(tmp_path, monkeypatch):
    """``--keep-top 0`` patches the engine with it (every block recomputed: the memory-for-time trade against the
    same references) and says so in the JSON and the table's header."""
    seen = []
    patch = model_bench.patch

    def recording_patch(module, **kwargs):
        seen.append(kwargs.get("keep_top"))
        return patch(module, **kwargs)

    monkeypatch.setattr(model_bench, "patch", recording_patch)
    lines = []
    result = model_bench.run(None, ("BAdam",), [1], 1, 8, torch.float32, 1, device="cpu", out_dir=tmp_path,
                             progress=False, print_fn=lines.append, keep_top=0, layers=3, hidden=32,
                             intermediate=40, heads=2, vocab=61)
    assert 0 in seen and result["keep_top"] == 0 and result["rows"][0]["verified"]
    assert json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())["keep_top"] == 0
    assert "keep_top=0" in lines[0]


def test_a_run_stopped_after_a_case_leaves_that_case_in_its_json(tmp_path, monkeypatch):
    """A lent GPU's time limit may stop the run: each case measured is in the JSON (marked partial) as soon as it is
    timed, and the models of the last case are collected before the next one is built."""
    measure, cases = model_bench._measure, []

    def stopped_at_the_second(*args, **kwargs):
        if cases:
            raise KeyboardInterrupt  # what a timeout's SIGINT raises
        cases.append(args[1])
        return measure(*args, **kwargs)

    collected, free = [], model_bench._free_the_last_case

    def recorded_free(device):
        collected.append(len(cases))
        free(device)

    monkeypatch.setattr(model_bench, "_measure", stopped_at_the_second)
    monkeypatch.setattr(model_bench, "_free_the_last_case", recorded_free)
    with pytest.raises(KeyboardInterrupt):
        model_bench.run(variants=("BAdam", "BREAD-SGD"), positions=(1,), batch=1, seq=8, repeats=1, device="cpu",
                        out_dir=tmp_path, progress=False, print_fn=lambda line: None, layers=3, hidden=32,
                        intermediate=40, heads=2, vocab=61)
    written = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert written["partial"] is True and [r["variant"] for r in written["rows"]] == ["BAdam"]
    assert list(written["summary"]) == ["BAdam"] and collected == [0, 1]
    from bread_kernels.bench import report

    assert "PARTIAL: the run stopped before every case was measured" in report.markdown_table(written)


def test_the_lora_variants_run_on_a_model_that_is_not_a_llama(tmp_path):
    """The LoRA targets were Llama's names: peft found none in GPT-2 ("Target modules ... not found")."""
    import transformers

    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path / "gpt2.json"
    path.write_text(config.to_json_string())
    result = model_bench.run(str(path), ("BREAD-partial",), [1], 1, 8, torch.float32, 1, device="cpu",
                             out_dir=tmp_path, progress=False, print_fn=lambda line: None)
    assert [(r["variant"], r["verified"]) for r in result["rows"]] == [("BREAD-partial", True)]


def test_gpt2s_sign_variants_verify(tmp_path):
    """GPT-2's key bias has a true gradient of 0 (softmax is invariant to it): each side took the sign of its own
    rounding noise, and BREAD-SGD-sign failed with 21/192 elements of c_attn.bias outside the tolerance."""
    import transformers

    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    path = tmp_path / "gpt2.json"
    path.write_text(config.to_json_string())
    result = model_bench.run(str(path), ("BREAD-SGD-sign",), [0, 1], 2, 16, torch.float32, 1, device="cpu",
                             out_dir=tmp_path, progress=False, print_fn=lambda line: None)
    assert [(r["position"], r["verified"]) for r in result["rows"]] == [(0, True), (1, True)]


def test_the_report_of_a_missing_json_is_a_one_line_error(tmp_path):
    from bread_kernels.bench import report

    with pytest.raises(SystemExit, match="missing.json: .*give a bench_model_\\*.json the model suite wrote"):
        report.main([str(tmp_path / "missing.json")])


@pytest.mark.parametrize("suite", ["linear", "lora", "host", "model"])
def test_every_suite_reports_a_bad_environment_in_one_line(capsys, monkeypatch, tmp_path, suite):
    """The linear, lora and host suites had no error handling: a traceback (rc 1) where the model suite printed one
    line (rc 2)."""
    monkeypatch.setenv("BREAD_BACKEND", "garbage")
    sizes = {"linear": ["--tokens", "4", "--in-features", "8", "--out-features", "8"], "host": [],
             "model": [*TINY, "--variants", "BAdam", "--positions", "1", "--out", str(tmp_path)]}
    sizes["lora"] = sizes["linear"]
    with pytest.raises(SystemExit) as stop:
        cli.main([suite, *sizes[suite]])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "BREAD_BACKEND='garbage' is not a backend" in err[0], err
    assert "ACTIVE" not in captured.out  # the host suite found its backend after its first row


@pytest.mark.parametrize("stop_at", [0, 1])
def test_an_interrupt_names_the_json_only_if_this_run_wrote_it(capsys, monkeypatch, tmp_path, stop_at):
    """Interrupted before the first case was measured, the message pointed to a JSON that did not exist."""
    measure, cases = model_bench._measure, []

    def stopped(*args, **kwargs):
        if len(cases) == stop_at:
            raise KeyboardInterrupt
        cases.append(args[1])
        return measure(*args, **kwargs)

    monkeypatch.setattr(model_bench, "_measure", stopped)
    with pytest.raises(SystemExit) as stop:
        cli.main([*TINY, "--variants", "BAdam", "BREAD-SGD", "--positions", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    json_path = tmp_path / "bench_model_cpu_float32.json"
    assert stop.value.code == 130
    if stop_at == 0:
        assert err == "bread-bench: interrupted; nothing was written" and not json_path.exists()
    else:
        assert err == (f"bread-bench: interrupted; the cases measured so far are in {json_path} "
                       '(marked "partial": true)') and json.loads(json_path.read_text())["partial"] is True


def test_the_backend_and_the_loss_chunks_are_recorded(monkeypatch, tmp_path):
    """Both change the engine's numbers; the model suite's header and JSON did not say them."""
    from bread_kernels.backends import get_backend

    monkeypatch.setenv("BREAD_LOSS_CHUNK_BYTES", str(3 << 16))
    lines = []
    result = model_bench.run(None, ("BAdam",), [1], 1, 8, torch.float32, 1, device="cpu", out_dir=tmp_path,
                             progress=False, print_fn=lines.append, layers=3, hidden=32, intermediate=40, heads=2,
                             vocab=61)
    written = json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())
    backend = get_backend(torch.device("cpu")).name
    assert (written["backend"], written["loss_chunk_bytes"]) == (result["backend"], 3 << 16) == (backend, 3 << 16)
    assert f"backend {backend}, loss chunks 0.1875 MiB" in lines[0]


def test_a_verification_failure_has_its_own_exit_status(doubled_fused_step, capsys, tmp_path):
    """It exited with 2, as a refused input does, and said "nothing was timed for the case" when others were."""
    with pytest.raises(SystemExit) as stop:
        cli.main([*TINY, "--variants", "BREAD-SGD", "BAdam", "--positions", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == cli.VERIFICATION_FAILED == 3
    assert "verification failed (a failed case is not timed): BREAD-SGD at block 1" in err
    assert "1 other cases verified and timed" in err


def test_an_output_name_taken_by_a_directory_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch):
    """It failed only after the first case was measured."""
    monkeypatch.setattr(model_bench, "run", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "bench_model_cpu_float32.json").mkdir()
    with pytest.raises(SystemExit) as stop:
        cli.main([*TINY, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "bench_model_cpu_float32.json is a directory where the run writes a file" in err


def test_a_bert_checkpoint_is_benched_on_the_engines_blocks(tmp_path):
    """The reference's optimizer on the unpatched model could not infer BERT's blocks (``encoder.layer.N``): every
    side now trains the engine optimizer's blocks, which patch finds structurally."""
    import transformers

    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, is_decoder=True)
    path = tmp_path / "bert.json"
    path.write_text(config.to_json_string())
    result = model_bench.run(str(path), ("BAdam", "BREAD-SGD-sign"), [1], 2, 16, torch.float32, 1, device="cpu",
                             out_dir=tmp_path, progress=False, print_fn=lambda line: None)
    assert [(r["variant"], r["verified"]) for r in result["rows"]] == [("BAdam", True), ("BREAD-SGD-sign", True)]
