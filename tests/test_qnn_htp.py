"""qnn-htp: the static 4-bit-KV decode graph, compiled ahead of time for two SoCs, on the HTP backend."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import DYNAMO
from kvcompile.manifest import read_manifest
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session, loads_shared_qnn_contexts, qnn_session

pytestmark = pytest.mark.slow
CONTEXT = 64
PREFILL = CONTEXT // 2  # the default prefill length for a 64-token buffer


@pytest.fixture(scope="module")
def qnn_compile(tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn") / "out"
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("qnn-htp",), socs=("SM8650", "SM8750"),
                                          max_context=CONTEXT, calib_tokens=2048, eval_tokens=2048)).report
    return out, report


def test_acceptance_every_node_on_the_htp_for_two_socs(qnn_compile):
    out, report = qnn_compile
    target = report.targets["qnn-htp"]
    facts = target.facts
    assert target.quality is not None and facts["soc"] == "SM8650"
    assert facts["nodes_total"] > 500 and facts["nodes_on_htp"] == facts["nodes_total"]
    assert facts["graphs"] == ["model", "prefill"] and facts["prefill_len"] == PREFILL
    assert facts["prefill_nodes_on_htp"] == facts["prefill_nodes_total"] > 500
    for soc in ("SM8650", "SM8750"):
        compiled = facts["socs"][soc]
        assert compiled["aot_seconds"] > 0 and compiled["context_binary_bytes"] > 1_000_000
        binaries = set()
        for graph in ("context_model", "prefill_context_model"):
            context_model = onnx.load(out / compiled[graph], load_external_data=False)
            assert {n.op_type for n in context_model.graph.node} == {"EPContext"}, "the whole graph is one HTP context"
            binaries |= {a.s for n in context_model.graph.node for a in n.attribute if a.name == "ep_cache_context"}
        assert len(binaries) == 1 and compiled["context_binaries"] == 1, "both graphs in one context binary"
    assert facts["kv_read_vs_fp16"] == 4.0, "the HTP reads two 4-bit codes per byte: a quarter of float16's bytes"
    assert facts["kv_bytes_read_per_step"] * 4 == facts["kv_fp16_bytes_per_step"]


def test_acceptance_agrees_with_cpu_and_keeps_quality(qnn_compile):
    _, report = qnn_compile
    quality = report.targets["qnn-htp"].quality
    assert quality.ran_on.startswith("onnxruntime CPU EP running the QDQ graph")
    assert quality.eval_tokens == 8 * (CONTEXT - 8 - 1), "windows of the full context, at least 512 tokens"
    assert quality.agreement.logits_cosine_min >= 0.99 and quality.agreement.steps == 16
    assert quality.agreement.prefill_tokens == PREFILL and quality.agreement.prefill_logits_cosine_min >= 0.99
    assert quality.passed and quality.ppl_delta_pct <= 2.0
    short = quality.on_device
    assert short.ran_on.startswith("onnxruntime-qnn HTP backend") and short.passed and short.eval_tokens > 100
    assert report.status == "passed" and report.quality.passed


def test_manifest_drives_the_compiled_context_on_the_htp(qnn_compile):
    """A prompt goes through the prefill graph, generation through the decode graph, on the HTP as
    on the CPU EP run of the same QDQ graphs: the same greedy tokens."""
    from kvcompile.targets import TARGETS

    out, _ = qnn_compile
    io = read_manifest(out).targets["qnn-htp"]
    assert io.max_context == CONTEXT and io.model == "qnn-htp/SM8650/model_ctx.onnx"
    assert io.options.prefill_len == PREFILL and io.options.prefill_compiled_from == "qnn-htp/prefill.qdq.onnx"
    assert [i.role for i in io.inputs] == ["input_ids", "position_ids", "attention_bias"]
    key = io.kv[0]
    assert key.stored_dtype == "uint8" and key.bits == 4 and key.packing.codes_per_byte == 2
    assert key.granularity == "per-tensor" and io.options.qnn_contexts["SM8750"].provider_options["htp_arch"] == "79"
    htp = TARGETS["qnn-htp"].open(out, io, "SM8650")
    cpu = Decoder(cpu_session(out / io.options.compiled_from), io, prefill=cpu_session(out / io.options.prefill_compiled_from))
    tokens = []
    for decoder in (htp, cpu):
        assert decoder.prefill is not None
        cache = decoder.new_cache(1)
        logits, _ = decoder.step(cache, np.arange(10, 10 + PREFILL + 5)[None])  # a full chunk and a padded one
        out_tokens = []
        for _ in range(8):
            out_tokens.append(int(logits[0, -1].argmax()))
            logits, _ = decoder.step(cache, np.array([[out_tokens[-1]]]))
        tokens.append(out_tokens)
    assert tokens[0] == tokens[1], "greedy tokens on the HTP equal the CPU run of the same QDQ graph"


def test_both_graphs_store_their_weights_once(qnn_compile, tmp_path):
    """The shared context binary holds both graphs' weights once: about one graph's size, not the
    two graphs compiled apart."""
    out, report = qnn_compile
    shared = report.targets["qnn-htp"].facts["socs"]["SM8650"]["context_binary_bytes"]
    apart = 0
    for graph in ("model", "prefill"):
        qnn_session((out / "qnn-htp" / f"{graph}.qdq.onnx").read_bytes(), "SM8650",
                    context_file=tmp_path / f"{graph}_ctx.onnx")
        apart += sum(b.stat().st_size for b in tmp_path.glob(f"{graph}_ctx*.bin"))
    assert shared < 0.65 * apart


def test_matmul_weights_are_int8_per_output_channel(qnn_compile):
    """Every MatMul of both QDQ graphs reads its weight through a per-output-channel int8
    DequantizeLinear (axis 1 of [K, N], one scale per column, zero points 0): the form the HTP's
    FullyConnected takes, the acceptance test above showing every node still on the HTP."""
    out, _ = qnn_compile
    for graph in ("model", "prefill"):
        model = onnx.load(out / "qnn-htp" / f"{graph}.qdq.onnx")
        initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        weights = [producers[n.input[1]] for n in model.graph.node
                   if n.op_type == "MatMul" and n.input[1] in producers
                   and producers[n.input[1]].op_type == "DequantizeLinear"
                   and producers[n.input[1]].input[0] in initializers]
        assert len(weights) > 10
        for dq in weights:
            codes, scale, zero = (initializers[name] for name in dq.input)
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert codes.dtype == np.int8 and codes.ndim == 2 and axis == 1
            assert scale.shape == (codes.shape[1],) and not zero.any()


def test_residual_stream_stays_float(qnn_compile):
    """In both QDQ graphs the residual stream is float (float16 on the HTP, where the acceptance
    test above shows every node running): no residual Add's sum is quantized, every RMSNorm reads
    float and its output is quantized for the MatMuls after it."""
    out, _ = qnn_compile
    for graph in ("model", "prefill"):
        model = onnx.load(out / "qnn-htp" / f"{graph}.qdq.onnx", load_external_data=False)
        producers = {o: n for n in model.graph.node for o in n.output}
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        norms = [n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"]
        residual_adds = [producers[n.input[0]] for n in norms if producers[n.input[0]].op_type == "Add"]
        assert len(residual_adds) == len(norms) - 1  # the first norm reads the embedding
        for add in residual_adds:
            assert "QuantizeLinear" not in consumers[add.output[0]]
        for norm in norms:
            assert consumers[norm.output[0]] == ["QuantizeLinear"]


def test_layer_drift_bench_compares_the_residual_stream(qnn_compile):
    """bench.qnn_layer_drift exposes every value an RMSNorm reads in the compiled prefill graph
    and compares the HTP's run with the CPU EP's: one line per norm (the embedding's codes, then
    the float residual sums) and the logits, which agree; the artifact folder is left as it was."""
    out, _ = qnn_compile
    before = sorted(p.name for p in (out / "qnn-htp").iterdir())
    result = subprocess.run([sys.executable, "-m", "bench.qnn_layer_drift", str(out)], capture_output=True, text=True,
                            check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    norms, logits = lines[:-1], lines[-1]
    model = onnx.load(out / "qnn-htp/prefill.qdq.onnx", load_external_data=False)
    assert len(norms) == sum(n.op_type == "SimplifiedLayerNormalization" for n in model.graph.node)
    assert norms[0]["stored"] == "uint16" and all(n["stored"] == "float" for n in norms[1:])
    assert all(n["row_cosine_min"] > 0.99 for n in norms) and logits["logits_row_cosine_min"] > 0.999
    assert sorted(p.name for p in (out / "qnn-htp").iterdir()) == before


@pytest.mark.skipif(loads_shared_qnn_contexts(), reason="this machine loads shared QNN contexts")
def test_shared_context_does_not_load_on_the_x86_simulator(qnn_compile):
    """onnxruntime-qnn loads a weight-shared context binary only on an ARM64 device; here `open`
    compiles the QDQ graphs instead. If this starts passing the load, drop that detour."""
    out, _ = qnn_compile
    script = ("import sys; from pathlib import Path; from kvcompile.runtimes.session import qnn_session; "
              "qnn_session(Path(sys.argv[1]), 'SM8650', shared=True); print('loaded')")
    result = subprocess.run([sys.executable, "-c", script, str(out / "qnn-htp/SM8650/model_ctx.onnx")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "loaded" not in result.stdout


def test_unknown_soc_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvcompile.cli", str(DYNAMO), "--target", "qnn-htp", "--soc", "SM1234",
                             "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "SM1234" in result.stderr and "SM8650" in result.stderr
    assert not (tmp_path / "x").exists()


def test_calibration_reaches_the_last_position_of_any_context():
    """The QDQ ranges are calibrated on decode steps spread over the whole context, the last one
    included: an activation that grows with the position (RoPE's angles) is clipped past the
    largest position calibrated. Short contexts keep every other step, as before."""
    from kvcompile.targets.qnn_htp import calibration_positions

    assert calibration_positions(63, 96) == list(range(0, 63, 2))
    long = calibration_positions(1023, 96)
    assert long[0] == 0 and long[-1] == 1022 and len(long) <= 97
    assert max(b - a for a, b in zip(long, long[1:])) <= 11
    assert calibration_positions(2, 96) == [0, 1] and calibration_positions(0, 96) == []


def test_htp_unpacks_and_packs_4bit_codes_bit_for_bit(tmp_path):
    """The HTP has no bit operations: kv_codec's fixed-point style unpacks a byte b as
    floor(b / 16), b - 16 * floor(b / 16) and packs lo + 16 * hi, in 16-bit fixed point on grids
    that hold those values exactly. On the HTP backend, every byte value decodes to quant.py's
    codes and new entries encode to quant.py's bytes."""
    import onnx_ir as ir

    from kvcompile.passes.kv_codec import FIXED_POINT, Encoded, FragmentBuilder, emit_decode, emit_encode
    from kvcompile.passes.names import NameAllocator
    from kvcompile.quant import Codec
    from kvcompile.targets.qnn_htp import quantize_qdq

    positions, logical = 64, [1, 2, "seq", 64]
    codec = Codec(4, np.float32(1.0), 8, pack_axis=3)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="codec")
    builder = FragmentBuilder(graph, NameAllocator(graph), "kv")
    stored = ir.Value(name="stored", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([1, 2, positions, 32]))
    new = ir.Value(name="new", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 1, 64]))
    decoded = emit_decode(builder, Encoded(stored), codec, logical, ir.DataType.FLOAT, FIXED_POINT)
    encoded = emit_encode(builder, new, codec, ir.DataType.FLOAT, logical, FIXED_POINT).codes
    decoded.name, encoded.name = "decoded", "encoded"
    decoded.type, decoded.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 2, positions, 64])
    encoded.type, encoded.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([1, 2, 1, 32])
    graph.inputs.extend([stored, new])
    graph.extend(builder.nodes)
    graph.outputs.extend([decoded, encoded])
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "codec.onnx")

    rng = np.random.default_rng(0)
    every_byte = np.resize(np.arange(256, dtype=np.uint8), (1, 2, positions, 32))
    # calibrated on bytes that miss the extreme codes, as a real cache's may: the exact grids, not
    # the calibrated ranges, must decide
    feeds = [{"stored": rng.integers(17, 239, (1, 2, positions, 32), dtype=np.uint8),
              "new": (rng.normal(size=(1, 2, 1, 64)) * 4).astype(np.float32)} for _ in range(4)]
    quantize_qdq(tmp_path / "codec.onnx", feeds, tmp_path / "codec.qdq.onnx")
    htp = qnn_session((tmp_path / "codec.qdq.onnx").read_bytes(), "SM8650")
    for stored_bytes, new_entries in [(every_byte, f["new"]) for f in feeds]:
        got_decoded, got_encoded = htp.run(None, {"stored": stored_bytes, "new": new_entries})
        # the decoded values leave the HTP through a float32 dequantization (a 1e-7 rounding); a
        # wrong code would be off by 1
        np.testing.assert_array_equal(np.round(got_decoded), codec.decode(stored_bytes))
        assert np.abs(got_decoded - codec.decode(stored_bytes)).max() < 1e-5
        np.testing.assert_array_equal(got_encoded, codec.encode(new_entries)[0])


@pytest.fixture(scope="module")
def fp16_compile(tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn-fp16") / "out"
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("qnn-htp",), socs=("SM8650",),
                                          max_context=CONTEXT, calib_tokens=2048, eval_tokens=2048,
                                          htp_precision="fp16")).report
    return out, report


def test_fp16_runs_the_float_graphs_on_the_htp(fp16_compile):
    """--htp-precision fp16: the float static graphs (no QDQ) compiled with the HTP in float16,
    decode and prefill in one shared context, every node on the HTP, agreeing with the CPU EP's
    float32 run and passing the gate there and on the simulator."""
    from kvcompile.targets import TARGETS

    out, report = fp16_compile
    target = report.targets["qnn-htp"]
    facts, quality = target.facts, target.quality
    assert facts["precision"] == "fp16" and facts["compiled_from"] == "qnn-htp/model.float.onnx"
    assert facts["nodes_on_htp"] == facts["nodes_total"] and facts["prefill_nodes_on_htp"] == facts["prefill_nodes_total"]
    model = onnx.load(out / "qnn-htp/model.float.onnx", load_external_data=False)
    assert not {"QuantizeLinear"} & {n.op_type for n in model.graph.node}, "no QDQ: the HTP computes in float16"
    assert facts["socs"]["SM8650"]["context_binaries"] == 1 and facts["kv_read_vs_fp16"] == 4.0
    assert quality.passed and quality.on_device.passed and quality.agreement.logits_cosine_min >= 0.999
    assert quality.agreement.prefill_logits_cosine_min >= 0.999
    io = read_manifest(out).targets["qnn-htp"]
    assert io.options.qnn_contexts["SM8650"].provider_options["enable_htp_fp16_precision"] == "1"
    assert TARGETS["qnn-htp"].open(out, io).prefill is not None


@pytest.mark.parametrize("style", ["float-dq", "arithmetic"])
def test_fp16_htp_codec_needs_bytes_through_dequantize(tmp_path, style):
    """In float16 the HTP's Cast from uint8 turns every nonzero byte into 1.0: the float-dq codec
    reads the bytes through DequantizeLinear(1, 0) and decodes all 256 byte values exactly
    (float16 rounding of code x scale aside); the arithmetic codec, with the Cast, does not.
    If the Cast case starts passing, the float-dq detour can go."""
    import onnx_ir as ir

    from kvcompile.passes.kv_codec import Encoded, FragmentBuilder, emit_decode, emit_encode
    from kvcompile.passes.names import NameAllocator
    from kvcompile.quant import Codec

    logical = [1, 2, "seq", 64]
    codec = Codec(4, np.float32(0.37), 8, pack_axis=3)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="codec")
    builder = FragmentBuilder(graph, NameAllocator(graph), "kv")
    stored = ir.Value(name="stored", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([1, 2, 64, 32]))
    new = ir.Value(name="new", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 1, 64]))
    decoded = emit_decode(builder, Encoded(stored), codec, logical, ir.DataType.FLOAT, style)
    encoded = emit_encode(builder, new, codec, ir.DataType.FLOAT, logical, style).codes
    decoded.name, encoded.name = "decoded", "encoded"
    decoded.type, decoded.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 2, 64, 64])
    encoded.type, encoded.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([1, 2, 1, 32])
    graph.inputs.extend([stored, new])
    graph.extend(builder.nodes)
    graph.outputs.extend([decoded, encoded])
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "codec.onnx")
    htp = qnn_session((tmp_path / "codec.onnx").read_bytes(), "SM8650")
    every_byte = np.resize(np.arange(256, dtype=np.uint8), (1, 2, 64, 32))
    entries = (np.random.default_rng(0).normal(size=(1, 2, 1, 64)) * 2).astype(np.float32)
    got_decoded, got_encoded = htp.run(None, {"stored": every_byte, "new": entries})
    exact = np.abs(got_decoded - codec.decode(every_byte)).max() < 0.37 / 2  # less than half a step
    assert exact == (style == "float-dq")
    np.testing.assert_array_equal(got_encoded, codec.encode(entries)[0])


def test_exact_grids_hold_every_value():
    from kvcompile.targets.qnn_htp import exact_grid

    for low, high, unit in ((0, 255, 1), (0, 255 / 16, 1 / 16), (-8, 7, 1), (0, 240, 16), (0, 63, 1), (0, 15, 1)):
        scale, zero_point = exact_grid(low, high, unit)
        values = np.arange(low, high + unit / 2, unit)
        steps = values / np.float64(scale) + int(zero_point)  # where each value falls on the uint16 grid
        assert np.abs(steps - np.round(steps)).max() < 0.01, "every value is a grid point (float32 scale aside)"
        assert round(steps.min()) >= 0 and round(steps.max()) <= 65535
    scale, zero_point = exact_grid(-8, 7, 0.0)  # a fixed range, no grid: the ends are its ends
    assert round(-8 / float(scale)) + int(zero_point) == 0 and round(7 / float(scale)) + int(zero_point) == 65535


def test_headroom_goes_to_text_dependent_values_only():
    """Values computed from the positions alone (RoPE's angles, cos, sin) keep their calibrated
    range; everything downstream of the token ids or the cache is widened."""
    from onnx import TensorProto, helper

    from kvcompile.targets.qnn_htp import text_dependent_values

    graph = helper.make_graph(
        [helper.make_node("Cast", ["position_ids"], ["positions"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["positions", "inv_freq"], ["angles"]),
         helper.make_node("Cos", ["angles"], ["cos"]),
         helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
         helper.make_node("Mul", ["embedded", "cos"], ["rotated"]),
         helper.make_node("Add", ["rotated", "past"], ["present"])],
        "g",
        [helper.make_tensor_value_info(n, t, [1]) for n, t in
         (("input_ids", TensorProto.INT64), ("position_ids", TensorProto.INT64), ("past", TensorProto.FLOAT))],
        [helper.make_tensor_value_info("present", TensorProto.FLOAT, [1])],
        [helper.make_tensor("inv_freq", TensorProto.FLOAT, [1], [0.5]),
         helper.make_tensor("embedding", TensorProto.FLOAT, [2, 1], [1.0, 2.0])])
    reached = text_dependent_values(graph, {"position_ids"})
    assert {"embedded", "rotated", "present"} <= reached
    assert not {"positions", "angles", "cos"} & reached


@pytest.mark.parametrize("norm", ["SimplifiedLayerNormalization", "LayerNormalization"])
def test_matmul_writing_a_massive_activation_stays_float(tmp_path, norm):
    """A residual block whose projection writes a massive activation (one output channel
    thousands of times the others, as SmolLM2's layer-11 down projection) is picked from its
    calibrated range: its MatMul stays float with its float weight, the ordinary projections are
    quantized, and the residual stream (Adds, norms: RMSNorm or LayerNorm) is float. On the HTP
    backend with CPU fallback disabled the graph compiles (the float nodes run in float16) and
    agrees with the CPU EP."""
    from onnx import TensorProto, helper, numpy_helper

    from kvcompile.targets.qnn_htp import quantize_qdq

    rng = np.random.default_rng(0)
    blocks, width, tokens = 4, 64, 8
    nodes, weights, hidden = [], [], "x"
    for block in range(blocks):
        weight = rng.normal(size=(width, width)).astype(np.float32) * 0.1
        if block == 2:
            weight[:, 5] *= 3000.0  # channel 5: a massive activation
        weights += [numpy_helper.from_array(weight, f"w{block}"),
                    numpy_helper.from_array(np.ones(width, np.float32), f"gamma{block}")]
        nodes += [helper.make_node(norm, [hidden, f"gamma{block}"], [f"normed{block}"],
                                   name=f"norm{block}", axis=-1, epsilon=1e-5),
                  helper.make_node("MatMul", [f"normed{block}", f"w{block}"], [f"projected{block}"],
                                   name=f"matmul{block}"),
                  helper.make_node("Add", [hidden, f"projected{block}"], [f"sum{block}"], name=f"add{block}")]
        hidden = f"sum{block}"
    weights.append(numpy_helper.from_array(np.ones(width, np.float32), "gamma_out"))
    nodes.append(helper.make_node(norm, [hidden, "gamma_out"], ["y"], name="norm_out", axis=-1, epsilon=1e-5))
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])], weights,
                              value_info=[helper.make_tensor_value_info(f"{value}{block}", TensorProto.FLOAT,
                                                                        [1, tokens, width])
                                          for block in range(blocks) for value in ("normed", "projected", "sum")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
              tmp_path / "residual.onnx")

    feeds = [{"x": rng.normal(size=(1, tokens, width)).astype(np.float32)} for _ in range(8)]
    float_matmuls = quantize_qdq(tmp_path / "residual.onnx", feeds, tmp_path / "residual.qdq.onnx")
    assert list(float_matmuls) == ["matmul2"] and float_matmuls["matmul2"] > 1000

    qdq = onnx.load(tmp_path / "residual.qdq.onnx")
    producers = {o: n for n in qdq.graph.node for o in n.output}
    initializers = {i.name for i in qdq.graph.initializer}
    consumers = {}
    for node in qdq.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for block in range(blocks):  # the residual sums stay float
        assert "QuantizeLinear" not in consumers[f"sum{block}"]
    for node in (n for n in qdq.graph.node if n.op_type == "MatMul"):
        weight_source = producers.get(node.input[1])
        if node.name == "matmul2":
            assert node.input[1] in initializers and weight_source is None  # float weight, float output
        else:
            assert weight_source is not None and weight_source.op_type == "DequantizeLinear"

    htp = qnn_session((tmp_path / "residual.qdq.onnx").read_bytes(), "SM8650")
    cpu = cpu_session(tmp_path / "residual.qdq.onnx")
    sample = {"x": rng.normal(size=(1, tokens, width)).astype(np.float32)}
    on_htp, on_cpu = htp.run(None, sample)[0].ravel(), cpu.run(None, sample)[0].ravel()
    assert np.dot(on_htp, on_cpu) / np.linalg.norm(on_htp) / np.linalg.norm(on_cpu) > 0.999


def test_exact_gelu_family_compiles_with_every_node_on_the_htp(tmp_path):
    """GPT-NeoX (the corpus family; Falcon and others export GELU the same way) computes the
    exact GELU with Erf, which the QNN EP does not take: the model was refused whole. The static
    graph now fuses it into one Gelu op, and the model compiles with every node on the HTP and
    passes its gate."""
    from bench.corpus import model_path

    out = tmp_path / "out"
    report = compile_model(CompileOptions(model=model_path("gpt_neox", "dynamo"), out_dir=out, targets=("qnn-htp",),
                                          max_context=CONTEXT, calib_tokens=1024, eval_tokens=1024)).report
    target = report.targets["qnn-htp"]
    assert target.quality.passed and target.facts["nodes_on_htp"] == target.facts["nodes_total"]
    ops = {n.op_type for n in onnx.load(out / "qnn-htp" / "model.qdq.onnx", load_external_data=False).graph.node}
    assert "Gelu" in ops and "Erf" not in ops


def test_per_head_query_key_norms_agree_with_the_cpu_in_prefill(tmp_path):
    """Qwen3 (the corpus family; Gemma3 alike) normalizes queries and keys per head over a
    rank-4 [1, tokens, heads, head_dim] tensor, which the HTP computed wrongly for more than one
    token (prefill rows at cosine 0.38 to the CPU EP). The norm's input is flattened to rows
    first: the prefill call agrees with the CPU EP like the decode steps."""
    from bench.corpus import model_path

    out = tmp_path / "out"
    report = compile_model(CompileOptions(model=model_path("qwen3", "dynamo"), out_dir=out, targets=("qnn-htp",),
                                          max_context=CONTEXT, calib_tokens=1024, eval_tokens=1024)).report
    target = report.targets["qnn-htp"]
    agreement = target.quality.agreement
    assert target.quality.passed and target.facts["nodes_on_htp"] == target.facts["nodes_total"]
    assert agreement.prefill_tokens > 1 and agreement.prefill_logits_cosine_min > 0.999


def test_an_htp_run_that_departs_from_the_cpu_fails_the_gate(tmp_path, monkeypatch):
    """The gate reads the CPU EP run of the QDQ graph; the HTP's own run is checked against it.
    Qwen3's static graph without the rank-4 norm fix (above) computes its prefill rows wrongly
    on the HTP while the CPU EP run passes: the compile must fail and say that the HTP departs
    from the CPU EP, not ship a graph that is wrong where it runs."""
    from bench.corpus import model_path
    from kvcompile.errors import QualityGateError
    from kvcompile.targets import static

    monkeypatch.setattr(static, "flatten_rank4_norms", lambda model: None)
    out = tmp_path / "out"
    with pytest.raises(QualityGateError, match="qnn-htp: its logits depart from the onnxruntime CPU EP") as failed:
        compile_model(CompileOptions(model=model_path("qwen3", "dynamo"), out_dir=out, targets=("qnn-htp",),
                                     max_context=CONTEXT, calib_tokens=1024, eval_tokens=1024))
    quality = failed.value.result.report.targets["qnn-htp"].quality
    assert not quality.passed and not quality.agreement.agrees
    assert quality.agreement.prefill_logits_cosine_min < quality.agreement.min_cosine
    assert json.loads((out / "report.json").read_text())["quality"]["target_failures"][0].startswith("qnn-htp: its logits")


def test_a_fixed_point_graph_that_fails_the_gate_is_rebuilt_in_float16(tmp_path, monkeypatch):
    """--htp-precision auto (the default): a model whose fixed-point graph fails the gate gets
    its qnn-htp graphs rebuilt in float16 on the HTP, which pass, and the report says why. The
    fixture's fixed-point graph passes, so its text-dependent ranges are cut to a hundredth here: every
    larger activation clips, as a real model's outliers would past a wrongly calibrated range."""
    from kvcompile.targets import qnn_htp

    real = qnn_htp.calibrated_ranges

    def clipped_ranges(static_path, op_types, reader, headroom, text_dependent, cache_path):
        return real(static_path, op_types, reader, headroom / 100, text_dependent, cache_path)

    monkeypatch.setattr(qnn_htp, "calibrated_ranges", clipped_ranges)
    out = tmp_path / "out"
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("qnn-htp",), max_context=CONTEXT,
                                          calib_tokens=2048, eval_tokens=2048)).report
    target = report.targets["qnn-htp"]
    assert target.facts["precision"] == "fp16" and target.quality.passed
    assert target.quality.on_device.passed and target.quality.agreement.agrees
    assert target.plan_changes[0].startswith("HTP precision: the fixed-point graph (uint16 activations, int8 weights) "
                                             "failed the 2.0% gate, perplexity +")
    assert not (out / "qnn-htp" / "model.qdq.onnx").exists() and (out / "qnn-htp" / "model.float.onnx").exists()
    assert target.plan_changes[0] in (out / "report.md").read_text()


def test_float16_exports_compute_in_float16_on_the_htp(tmp_path):
    """A float16 export (Gemma3's: sliding-window layers, norms reading float16 with a float32
    scale) cannot be quantized into the fixed-point graph: --htp-precision auto builds the float16
    graph at once, with every node on the HTP; --htp-precision quantized is refused by name."""
    from bench.corpus import model_path
    from kvcompile.errors import UnsupportedModelError
    from kvcompile.pipeline import FLOAT16_EXPORT_ON_HTP

    model = model_path("gemma3", "dynamo-fp16")
    report = compile_model(CompileOptions(model=model, out_dir=tmp_path / "out", targets=("qnn-htp",),
                                          max_context=CONTEXT, calib_tokens=1024, eval_tokens=1024)).report
    target = report.targets["qnn-htp"]
    assert target.facts["precision"] == "fp16" and target.plan_changes[0] == FLOAT16_EXPORT_ON_HTP
    assert target.quality.passed and target.facts["nodes_on_htp"] == target.facts["nodes_total"]
    with pytest.raises(UnsupportedModelError, match="export is float16"):
        compile_model(CompileOptions(model=model, out_dir=tmp_path / "refused", targets=("qnn-htp",),
                                     max_context=CONTEXT, htp_precision="quantized"))


def test_a_sliding_window_family_compiles_at_a_context_within_its_window(tmp_path):
    """Mistral's export cuts the past to its window before appending (past -> Slice -> Concat):
    the centering of its keys took the Slice for the new entries and shifted the cache instead,
    and the static graph then found no Q.K^T reading the cache (exit 2)."""
    from bench.corpus import model_path

    report = compile_model(CompileOptions(model=model_path("mistral", "dynamo"), out_dir=tmp_path / "out",
                                          targets=("qnn-htp", "nnapi"), max_context=CONTEXT, calib_tokens=1024,
                                          eval_tokens=1024)).report
    assert report.limits.sliding_window == CONTEXT
    for name in ("qnn-htp", "nnapi"):
        assert report.targets[name].quality.passed, name
