"""End-to-end compiles of the fixtures through the CLI and the pipeline (ORT CPU target)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import DYNAMO, FP16, GENAI, OUTLIERS, TOKENIZER
from kvcompile.errors import QualityGateError
from kvcompile.manifest import read_manifest
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session

pytestmark = pytest.mark.slow
FAST = dict(calib_tokens=2048, eval_tokens=2048)  # for tests that do not assert quality figures


def kvcompile(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def fixture_compile(tmp_path_factory):
    """`kvcompile MODEL --kv-bits 4 -o OUT --json`, exactly as a user types it (defaults)."""
    out = tmp_path_factory.mktemp("compile") / "fixture.kvcompiled"
    result = kvcompile(str(DYNAMO), "--kv-bits", "4", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_acceptance_memory_and_quality(fixture_compile):
    """Issue 3: ratio >= 3.8 and delta <= 1% (the default compile is fused: GroupQueryAttention)."""
    out, report = fixture_compile
    assert report["fusion"]["fused"]
    assert report["memory"]["ratio_vs_fp16"] >= 3.8
    assert report["memory"]["fp16_bytes_per_token"] == 2048
    assert report["memory"]["quantized_bytes_per_token"] <= 512
    assert report["memory"]["avg_bits_per_element"] <= 4.0
    assert report["plan"]["scheme"] == "auto"
    assert report["quality"]["ppl_delta_pct"] <= 1.0
    assert report["quality"]["top1_agreement"] > 0.9
    assert report["quality"]["eval_tokens"] == 12 * (1024 - 32 - 1)  # windows of the default context
    assert report["limits"]["eval_window"] == 1024
    assert report["quality"]["passed"] and report["status"] == "passed"
    assert report == json.loads((out / "report.json").read_text()), "--json prints report.json"


def test_acceptance_qdq_form_within_0_3_percent(tmp_path):
    """Issue 4: at --kv-bits 4 the Q/DQ form (tokens attend to their own K/V in float) loses <= 0.3%,
    at the context the fixture is trained for (256 tokens; at the default 1024, beyond its training
    context, it measured +0.37%)."""
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / "qdq", fuse_attention="off",
                                          max_context=256)).report.to_dict()
    assert report["memory"]["avg_bits_per_element"] <= 4.0
    assert report["quality"]["ppl_delta_pct"] <= 0.3


def test_report_fields(fixture_compile):
    _, report = fixture_compile
    assert report["kv"]["layers"] == 4 and len(report["kv"]["tensors"]) == 8
    for key in ("fp16_bytes_per_token", "quantized_bytes_per_token", "ratio_vs_fp16"):
        assert key in report["memory"]
    for key in ("float_ppl", "quantized_ppl", "ppl_delta_pct", "top1_agreement", "eval_tokens"):
        assert key in report["quality"]
    target = report["targets"]["ort-cpu"]
    assert target["artifact"] == "ort-cpu/model.onnx" and target["ran"] is True
    assert target["kv_storage"].startswith("uint8 codes packed along head_dim: 4-bit (2 per byte) x")
    for row in report["kv"]["tensors"]:
        assert row["sqnr_db"] > 10
        # fused: each layer's only candidate is the kernel's per-channel cache, taken unmeasured
        assert row["reason"].startswith("auto:") and "not measured" in row["reason"] and row["measured_kl"] is None
        assert row["granularity"] == "per-channel"
    assert target["ort_format"] == "ort-cpu/model.ort" and target["onnx_checker"] == "full"


def test_artifacts_and_manifest(fixture_compile):
    out, _ = fixture_compile
    assert sorted(p.name for p in out.iterdir()) == [
        "kvcompile.json", "ort-cpu", "report.json", "report.md", "report.png", "tokenizer.json"]
    assert sorted(p.name for p in (out / "ort-cpu").iterdir()) == [
        "genai_config.json", "model.onnx", "model.ort", "tokenizer.json", "tokenizer_config.json"]
    model = out / "ort-cpu" / "model.onnx"
    onnx.checker.check_model(model, full_check=True)
    manifest = read_manifest(out)
    assert manifest.schema == 1 and manifest.tokenizer == "tokenizer.json"
    io = manifest.targets["ort-cpu"]
    key = io.kv[0]
    assert (key.input, key.output, key.bits, key.stored_dtype) == (
        "past_key_values.0.key", "present.0.key", 4, "uint8")
    assert key.stored_shape == ["batch", 2, "seq", 32] and key.logical_shape == ["batch", 2, "seq", 64]
    assert key.packing.axis == 3 and key.packing.codes_per_byte == 2
    if key.granularity == "per-channel":
        assert np.asarray(key.scale).shape == (2, 64) and key.params == []
    else:  # dynamic: its scales are stored next to it
        assert key.params[0].input == "past_key_values.0.key_scale"
    # The manifest alone is enough to drive the artifact.
    decoder = Decoder(cpu_session(out / io.model), io)
    cache = decoder.new_cache(1)
    decoder.step(cache, np.array([[1, 2, 3]]))
    logits, _ = decoder.step(cache, np.array([[4]]))
    assert logits.shape == (1, 1, 2048)
    assert cache.nbytes() == 4 * report_bytes_per_token(out)
    assert "PASSED" in (out / "report.md").read_text()


def report_bytes_per_token(out) -> float:
    return json.loads((out / "report.json").read_text())["memory"]["quantized_bytes_per_token"]


def test_deterministic_artifacts(tmp_path):
    """Byte-identical whatever the output folder is called (the ORT converter's output once
    depended on the length of its path)."""
    reports, folders = [], ("a", "a-longer-output-folder-name")
    for name in folders:
        result = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / name, **FAST))
        reports.append({k: v for k, v in result.report.to_dict().items() if k != "timings"})
    for relative in ("ort-cpu/model.onnx", "ort-cpu/model.ort", "ort-cpu/genai_config.json", "kvcompile.json",
                     "report.png", "report.md"):
        first, second = ((tmp_path / name / relative).read_bytes() for name in folders)
        assert first == second, relative
    assert reports[0] == reports[1]


def test_float16_export_compiles(tmp_path):
    report = compile_model(CompileOptions(model=FP16, out_dir=tmp_path / "fp16", scheme="per-channel")).report.to_dict()
    assert report["kv"]["tensors"][0]["dtype"] == "float16"
    assert report["quality"]["ppl_delta_pct"] <= 1.0


def test_outliers_per_tensor_fails_gate_auto_and_folding_pass(tmp_path):
    out = tmp_path / "pt"
    # without float slots: with them the fused per-tensor cache passes here (they are added when it fails)
    result = kvcompile(str(OUTLIERS), "--kv-bits", "4", "--scheme", "per-tensor", "--float-slots", "0", "0",
                       "-o", str(out))
    assert result.returncode == 3, result.stderr
    assert "perplexity rose" in result.stderr and "gate" in result.stderr
    assert "Try: --scheme auto (not run in this compile)" in result.stderr, "advice names what is not in use"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed-quality-gate" and not report["quality"]["passed"]
    assert (out / "ort-cpu" / "model.onnx").is_file(), "artifacts are kept, marked failed"
    assert "FAILED" in (out / "report.md").read_text()
    naive = report["quality"]["ppl_delta_pct"]

    auto = compile_model(CompileOptions(model=OUTLIERS, out_dir=tmp_path / "auto")).report.to_dict()
    assert auto["quality"]["ppl_delta_pct"] <= 1.0
    channel = compile_model(CompileOptions(model=OUTLIERS, out_dir=tmp_path / "pc", scheme="per-channel",
                                           fuse_attention="off")).report.to_dict()
    folded = compile_model(CompileOptions(model=OUTLIERS, out_dir=tmp_path / "fold", scheme="per-channel",
                                          fold_scales=True)).report.to_dict()
    assert set(folded["plan"]["choices"].values()) == {"4-bit per-tensor"}, "one scale per tensor in the cache"
    assert folded["quality"]["mean_kl"] == pytest.approx(channel["quality"]["mean_kl"], rel=0.02)
    rotated = compile_model(CompileOptions(model=OUTLIERS, out_dir=tmp_path / "rot", scheme="per-tensor",
                                           rotate="hadamard", quality_gate_pct=1e9)).report.to_dict()
    assert rotated["quality"]["ppl_delta_pct"] < naive / 10, "rotation spreads the outlier channels"


def test_default_output_folder_is_next_to_the_model(tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(DYNAMO.parent, model_dir)
    result = kvcompile("compile", str(model_dir / "model.onnx"), "--scheme", "per-channel",
                       "--calib-tokens", "1024", "--eval-tokens", "1024")
    assert result.returncode == 0, result.stderr
    assert (model_dir / "model.kvcompiled" / "kvcompile.json").is_file()
    assert (model_dir / "model.onnx").read_bytes() == DYNAMO.read_bytes(), "the input is never modified"


def test_calibration_from_token_ids_without_tokenizer(tmp_path, heldout_ids):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copyfile(DYNAMO, model_dir / "model.onnx")  # no tokenizer.json next to it
    np.save(tmp_path / "calib.npy", heldout_ids[:2048])
    np.save(tmp_path / "eval.npy", heldout_ids[2048:4096])
    result = compile_model(CompileOptions(model=model_dir / "model.onnx", out_dir=tmp_path / "out",
                                          calib=tmp_path / "calib.npy", eval_text=tmp_path / "eval.npy",
                                          scheme="per-channel", calib_tokens=2048, eval_tokens=2048))
    assert result.report.calibration.text == "calib.npy"
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    text_without_tokenizer = kvcompile(str(model_dir / "model.onnx"), "-o", str(tmp_path / "out2"))
    assert text_without_tokenizer.returncode == 2
    assert "--tokenizer" in text_without_tokenizer.stderr


@pytest.mark.parametrize("bits", [2, 8])
def test_other_bit_widths(tmp_path, bits):
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / str(bits), kv_bits=bits,
                                          scheme="per-channel", quality_gate_pct=1000, **FAST)).report.to_dict()
    assert report["memory"]["quantized_bytes_per_token"] == 2048 * bits / 16
    if bits == 8:
        assert abs(report["quality"]["ppl_delta_pct"]) < 0.2


def greedy_tokens(decoder: Decoder, prompt: np.ndarray, count: int) -> list[int]:
    cache = decoder.new_cache(1)
    logits, _ = decoder.step(cache, prompt[None])
    out = []
    for _ in range(count):
        out.append(int(logits[0, -1].argmax()))
        logits, _ = decoder.step(cache, np.array([[out[-1]]]))
    return out


def genai_greedy_tokens(folder, prompt: np.ndarray, count: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + count, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.tolist())
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("source", ["onnx-genai (GroupQueryAttention)", "onnx-dynamo (fused)"])
def test_fused_4bit_artifact_runs_in_onnxruntime_genai(tmp_path, heldout_ids, source):
    """Issue 5: the GQA fixture compiles and passes the gate; onnxruntime-genai generates from the
    compiled folder unchanged, the same greedy tokens kvcompile's own decoder does."""
    model = GENAI if source.startswith("onnx-genai") else DYNAMO
    out = tmp_path / "out"
    report = compile_model(CompileOptions(model=model, out_dir=out, calib_tokens=2048)).report.to_dict()
    assert report["quality"]["passed"] and report["plan"]["choices"]["L0.K"].startswith("4-bit per-channel")
    target = report["targets"]["ort-cpu"]
    assert target["onnxruntime_genai"].endswith("runs in onnxruntime-genai")
    if model == DYNAMO:
        assert report["fusion"]["fused"] and report["timings"]["fusion"]["decode_step_ms_at_1024_tokens"]["fused"] > 0
    onnx_model = onnx.load(out / "ort-cpu" / "model.onnx")
    node = next(n for n in onnx_model.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["kv_cache_bit_width"] == 4

    io = read_manifest(out).targets["ort-cpu"]
    prompt = heldout_ids[:12]
    ours = greedy_tokens(Decoder(cpu_session(out / io.model), io), prompt, 20)
    assert genai_greedy_tokens(out / "ort-cpu", prompt, 20) == ours
    # The ORT-format twin computes the same as the .onnx file.
    assert greedy_tokens(Decoder(cpu_session(out / target["ort_format"]), io), prompt, 20) == ours


def test_fuse_attention_off_keeps_qdq_and_on_refuses_dynamic_schemes(tmp_path):
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / "off", fuse_attention="off",
                                          scheme="per-channel", **FAST)).report.to_dict()
    assert not report["fusion"]["fused"]
    graph = onnx.load(tmp_path / "off" / "ort-cpu" / "model.onnx").graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    result = kvcompile(str(DYNAMO), "--scheme", "kivi", "--fuse-attention", "on", "-o", str(tmp_path / "on"))
    assert result.returncode == 2 and "per-token scales" in result.stderr


@pytest.mark.parametrize("target", ["bogus", "coreml"])
def test_unknown_targets_are_refused(tmp_path, target):
    result = kvcompile(str(DYNAMO), "--target", target, "-o", str(tmp_path / "t"))
    assert result.returncode == 2 and target in result.stderr
    assert not (tmp_path / "t").exists()


def test_quality_gate_error_carries_the_result(tmp_path):
    with pytest.raises(QualityGateError) as info:
        compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / "g", scheme="per-tensor",
                                     quality_gate_pct=-50, **FAST))
    assert info.value.result.report.status == "failed-quality-gate"


def test_inspect_json():
    result = kvcompile("inspect", str(GENAI), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["layers"] == 4 and info["attention_forms"] == ["com.microsoft.GroupQueryAttention"]
    assert info["fp16_bytes_per_token"] == 2048 and info["tensors"][0]["layout"] == "bhsd"
    assert TOKENIZER.is_file()


def test_kivi_stores_per_token_scales_next_to_the_cache(tmp_path):
    out = tmp_path / "kivi"
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=out, scheme="kivi", **FAST)).report.to_dict()
    assert report["memory"]["avg_bits_per_element"] == pytest.approx((4 + 4 + 24 / 64) / 2)
    io = read_manifest(out).targets["ort-cpu"]
    value = next(k for k in io.kv if k.kind == "value")
    assert value.granularity == "per-token" and not value.symmetric and value.group == 64
    assert [(p.kind, p.input, p.stored_dtype, p.stored_shape) for p in value.params] == [
        ("scale", "past_key_values.0.value_scale", "float16", ["batch", 2, "seq", 1]),
        ("zero_point", "past_key_values.0.value_zero_point", "uint8", ["batch", 2, "seq", 1])]
    decoder = Decoder(cpu_session(out / io.model), io)
    cache = decoder.new_cache(2)
    decoder.step(cache, np.ones((2, 5), np.int64))
    decoder.step(cache, np.ones((2, 1), np.int64))
    assert cache.tensors["past_key_values.0.value_scale"].shape == (2, 2, 6, 1)


def test_model_with_external_data_compiles_with_auto(tmp_path):
    """Weights in a .data file next to the model: read in place (linked for auto's variants). The
    static targets' intermediate models have external data too, and none of it stays behind."""
    from kvcompile.model_io import load_model, save_model

    model_dir = tmp_path / "ext"
    model_dir.mkdir()
    save_model(load_model(DYNAMO), model_dir / "model.onnx", external_data=True)
    assert (model_dir / "model.onnx.data").stat().st_size > 10_000_000
    before = (model_dir / "model.onnx.data").read_bytes()
    report = compile_model(CompileOptions(model=model_dir / "model.onnx", out_dir=tmp_path / "out",
                                          tokenizer=TOKENIZER, targets=("ort-cpu", "tflite"), max_context=64,
                                          quality_gate_pct=100.0, **FAST)).report.to_dict()
    assert report["quality"]["passed"]
    assert (tmp_path / "out" / "ort-cpu" / "model.onnx.data").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "tflite").iterdir()) == ["model.tflite"]
    assert (model_dir / "model.onnx.data").read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_fractional_budget_needs_auto(tmp_path):
    result = kvcompile(str(DYNAMO), "--kv-bits", "4.5", "--scheme", "per-channel", "-o", str(tmp_path / "x"))
    assert result.returncode == 2 and "--scheme auto" in result.stderr


def test_no_calibration_compiles_without_running_the_model(tmp_path):
    """--no-calibration: in-graph per-token scales, nothing run, report says UNVERIFIED (exit 0)."""
    out = tmp_path / "uncalibrated"
    result = kvcompile(str(DYNAMO), "--kv-bits", "4", "--no-calibration", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "UNVERIFIED" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "unverified" and report["quality"]["passed"] is None
    assert report["calibration"] is None and report["targets"]["ort-cpu"]["ran"] is False
    assert set(report["plan"]["choices"].values()) == {"4-bit per-token"}
    assert "**UNVERIFIED**" in (out / "report.md").read_text()
    # Unverified, not untested here: the artifact runs and stays close to the float model.
    from kvcompile.evaluate import evaluate_folder

    compiled = evaluate_folder(out, None, "ort-cpu", None, 12288)  # the verifier's tokens: float PPL 49.228
    assert compiled["window"] == 1024 and compiled["tokens"] == 11892 and compiled["ppl"] < 1.02 * 49.228, compiled


@pytest.mark.parametrize("args, message", [
    (["--scheme", "per-channel"], "--scheme per-channel needs calibrated scales"),
    (["--kv-bits", "4.5"], "needs calibration"),
    (["--target", "qnn-htp"], "--target qnn-htp needs calibration"),
])
def test_no_calibration_refuses_what_needs_calibration(tmp_path, args, message):
    result = kvcompile(str(DYNAMO), "--no-calibration", *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_ort_format_is_skipped_for_weights_it_cannot_hold(tmp_path, monkeypatch):
    """The ORT format (a FlatBuffer) holds 2 GiB at most: above the limit it is not attempted."""
    from kvcompile.targets import ort_cpu

    monkeypatch.setattr(ort_cpu, "ORT_FORMAT_LIMIT_BYTES", 1_000_000)
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / "big", no_calibration=True)).report.to_dict()
    target = report["targets"]["ort-cpu"]
    assert target["ort_format"] is None and "FlatBuffer" in target["ort_format_note"]
    assert not (tmp_path / "big" / "ort-cpu" / "model.ort").exists()


def test_gate_advice_from_auto_is_measured_and_never_what_is_in_use(tmp_path):
    """A failed gate under --scheme auto: the advice reads auto's own budget curve (the summed KL
    its measurements give at larger --kv-bits) and never suggests --scheme auto or the budget in use."""
    out = tmp_path / "strict"
    result = kvcompile(str(DYNAMO), "--fuse-attention", "off", "--quality-gate", "-1", "-o", str(out),
                       "--calib-tokens", "2048", "--eval-tokens", "2048")
    assert result.returncode == 3, result.stderr
    report = json.loads((out / "report.json").read_text())
    curve = report["plan"]["budget_curve"]
    assert curve[0]["bits"] == 4 and curve[-1]["bits"] == 8
    assert curve[-1]["summed_kl"] < curve[0]["summed_kl"], "8 bits measured better than 4"
    advice = report["quality"]["advice"]
    assert advice and all("--scheme auto" not in a and not a.startswith("--kv-bits 4:") for a in advice)
    assert any("--kv-bits" in a for a in advice) and "--fuse-attention off" not in " ".join(advice)
    assert "Try: " + advice[0] in result.stderr and "To try" in (out / "report.md").read_text()


def test_a_users_short_text_is_used_whole(tmp_path, heldout_ids):
    """A text shorter than --eval-tokens asks for is used whole (its windows counted in the report),
    and refused only below the stated minimum of 2 windows."""
    text = tmp_path / "mine.npy"
    np.save(text, heldout_ids[: 3 * 1024 + 100])
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=tmp_path / "o", eval_text=text,
                                          calib_tokens=2048)).report.to_dict()
    assert report["quality"]["eval_tokens"] == 3 * (1024 - 32 - 1)
    assert report["quality"]["eval_text"] == "mine.npy"
    np.save(text, heldout_ids[:1500])
    result = kvcompile(str(DYNAMO), "--eval", str(text), "-o", str(tmp_path / "short"), "--calib-tokens", "2048")
    assert result.returncode == 2
    assert "1 window(s) of 1024, and at least 2 are needed" in result.stderr


def test_progress_without_a_terminal_is_one_plain_line_per_stage(tmp_path):
    result = kvcompile(str(DYNAMO), "-o", str(tmp_path / "p"), "--calib-tokens", "1024", "--eval-tokens", "1024")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    stages = ["checking attention fusion", "calibrating (1,024 tokens)",
              "rewriting the graph", "writing artifacts", "verifying through"]
    for stage in stages:
        assert sum(stage in line for line in lines) == 1, (stage, result.stderr)
    assert "measuring sensitivity" not in result.stderr, "fused: auto has one candidate per layer, nothing to measure"
    assert all(line.startswith("kvcompile: [") and " s] " in line for line in lines), result.stderr
    assert "\x1b" not in result.stderr and "\r" not in result.stderr, "no terminal control codes in a log"


@pytest.mark.parametrize("model", [DYNAMO, FP16], ids=["float32", "float16"])
def test_float_slots_are_added_when_the_gate_fails_without_them(tmp_path, model):
    """A fused compile that fails the gate with its 4-bit cache alone is rebuilt with float sink and
    recent slots (the fixture loses ~0.5% alone: a 0.01% gate fails it); the slots cut the loss, the
    report says why they are there, the manifest describes them, the memory figures count them, and
    the artifact decodes. The static nnapi graph takes them too, built once after the decision."""
    out = tmp_path / "slots"
    targets = ("ort-cpu", "nnapi") if model == DYNAMO else ("ort-cpu",)
    options = CompileOptions(model=model, out_dir=out, calib_tokens=2048, eval_tokens=4096, max_context=256,
                             quality_gate_pct=0.01, targets=targets)
    try:
        report = compile_model(options).report.to_dict()
    except QualityGateError as failed:  # the gate is below what even float slots reach on this text
        report = failed.result.report.to_dict()
    assert report["fusion"]["fused"]
    decision = report["fusion"]["float_slots"]
    assert decision.startswith("float slots: the 4-bit cache alone lost") and "first 4 and newest 128" in decision
    alone = float(decision.split("lost ")[1].split("%")[0])
    assert report["quality"]["ppl_delta_pct"] < alone / 2
    assert "first_verify_s" in report["timings"]
    assert "float sink and recent slots" in report["targets"]["ort-cpu"]["onnxruntime_genai"]
    peaks = report["timings"]["peak_rss_mib"]  # the peak so far at each stage's end: never falls
    assert 0 < peaks["load_analyze"] <= peaks["fuse"] <= peaks["calibrate_plan"] <= peaks["verify"]
    assert "verification stopped there: it could no longer pass" in decision, decision  # the first one's only job
    manifest = read_manifest(out)
    assert sorted(manifest.targets) == sorted(targets)
    io = manifest.targets["ort-cpu"]
    assert io.options.float_slots == [4, 128]
    if "nnapi" in targets:  # built once, after the decision, from the plan with slots
        assert manifest.targets["nnapi"].options.float_slots == [4, 128]
        assert (out / "nnapi" / "model.onnx").stat().st_mtime > (out / "ort-cpu" / "model.onnx").stat().st_mtime
        assert "and of every cache of the nnapi graph" in decision
    slots = {(kv.kind, p.kind, p.stored_dtype, tuple(p.stored_shape)) for kv in io.kv for p in kv.params}
    assert slots == {("key", "sink", "float16", ("batch", 4, "sink_seq", 64)),  # keys and values of 2 kv heads
                     ("key", "recent", "float16", ("batch", 4, "recent_seq", 64))}
    per_tensor = 132 * 2 * 64 * 2  # (4 + 128) positions x 2 kv heads x head_dim 64, float16
    assert report["memory"]["static_bytes"] >= per_tensor * len(io.kv)
    assert "newest 128 positions also in float" in report["targets"]["ort-cpu"]["kv_storage"]
    decoder = Decoder(cpu_session(out / "ort-cpu" / "model.onnx"), io)
    assert len(greedy_tokens(decoder, np.arange(5, 45), 8)) == 8


def test_no_float_slots_when_the_gate_passes_without_them(fixture_compile):
    out, report = fixture_compile
    assert report["fusion"]["float_slots"].startswith("float slots: none needed")
    assert all(not kv.params for kv in read_manifest(out).targets["ort-cpu"].kv)


def test_remove_model_takes_its_external_data(tmp_path):
    """Intermediate models (the qnn-htp static graph, tflite's ONNX graphs) are removed with their
    `.data` file: a large model's would otherwise stay in the output folder (SmolLM2: 651 MB)."""
    from kvcompile.model_io import load_model, remove_model, save_model

    written = save_model(load_model(DYNAMO), tmp_path / "model.static.onnx", external_data=True)
    assert [p.name for p in written] == ["model.static.onnx", "model.static.onnx.data"]
    remove_model(tmp_path / "model.static.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [8, 4])
def test_qdq_weight_exports_compile_and_count_their_weights_as_stored(tmp_path, bits):
    """Issue 18: an AI Hub-style export whose MatMul weights come through DequantizeLinear (int8 or
    int4 codes, per-channel scales) compiles end to end, fused, passes the gate, and the report
    counts the weights as stored: fewer bytes than the float model's."""
    from models.qdq_weights import write_qdq_weights

    model = write_qdq_weights(DYNAMO, tmp_path / f"qdq-int{bits}", bits)
    report = compile_model(CompileOptions(model=model, out_dir=tmp_path / "out", **FAST)).report.to_dict()
    assert report["quality"]["passed"] and report["fusion"]["fused"]
    float_bytes = DYNAMO.stat().st_size  # the float fixture holds its weights in model.onnx
    assert report["memory_wall"]["weights"]["bytes"] < (0.5 if bits == 8 else 0.35) * float_bytes
