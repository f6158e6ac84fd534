"""nnapi and tflite: the static decode graph with the 4-bit cache packed two codes per byte."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import DYNAMO
from kvcompile.manifest import read_manifest
from kvcompile.passes.legalize_nnapi import legalize_nnapi_passes
from kvcompile.passes.manager import run_passes
from kvcompile.pipeline import CompileOptions, compile_model
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.tflite import TFLiteSession
from kvcompile.targets.tflite import convert_in_child

pytestmark = pytest.mark.slow
# The ONNX graph at FOLDER/m.onnx through kvcompile's TF translation, fed FOLDER/feeds.npz.
_TF_DIRECT = """
import sys
from pathlib import Path
import numpy as np, onnx
from kvcompile.targets.onnx_to_tf import tf_function
folder = Path(sys.argv[1])
proto = onnx.load(folder / "m.onnx")
feeds = np.load(folder / "feeds.npz")
out = tf_function(proto)(*(feeds[i.name] for i in proto.graph.input))
np.savez(folder / "direct.npz", **{k: np.asarray(v) for k, v in out.items()})
"""
CONTEXT = 128


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile") / "out"
    report = compile_model(CompileOptions(model=DYNAMO, out_dir=out, targets=("nnapi", "tflite"),
                                          max_context=CONTEXT, calib_tokens=2048, eval_tokens=2048)).report
    return out, report


def test_acceptance_nnapi_one_partition_full_coverage(compiled):
    out, report = compiled
    nnapi = report.targets["nnapi"]
    facts = nnapi.facts
    assert facts["partitions"] == 1 and facts["coverage_pct"] == 100.0
    assert facts["nodes_on_nnapi"] == facts["nodes_total"] > 300 and facts["unsupported_ops"] == ""
    assert "two 4-bit codes per byte" in nnapi.kv_storage
    assert nnapi.quality.passed and nnapi.quality.eval_tokens > 400
    io = read_manifest(out).targets["nnapi"]
    assert io.model == "nnapi/model.ort" and (out / io.model).is_file()
    key = io.kv[0]
    assert key.stored_dtype == "uint8" and key.packing.codes_per_byte == 2 and key.stored_shape[-1] == 32
    assert {i.name: i.dtype for i in io.inputs}["input_ids"] == "int32", "NNAPI has no 64-bit integers"


def test_acceptance_tflite_builtins_packed_io_matches_onnxruntime(compiled):
    out, report = compiled
    target = report.targets["tflite"]
    ops, dtypes = target.facts["ops"], target.facts["io_dtypes"]
    assert not any("Flex" in op for op in ops) and "FLOOR" in ops
    assert dtypes["past_key_values.0.key"] == "uint8" and dtypes["present.3.value"] == "uint8"
    agreement = target.quality.agreement
    assert agreement.codes_identical and agreement.logits_cosine_min > 0.9999
    assert agreement.code_bytes_differing == 0 and agreement.code_bytes_compared > 0
    assert target.quality.passed and not (out / "tflite" / "reference.onnx").exists()
    io = read_manifest(out).targets["tflite"]
    session = TFLiteSession(out / io.model)
    signature = session.interpreter.get_signature_list()["serving_default"]
    assert set(signature["inputs"]) == {i.name for i in io.inputs} | {k.input for k in io.kv}
    decoder = Decoder(session, io)
    cache = decoder.new_cache(1)
    logits, presents = decoder.step(cache, np.array([[3, 4, 5]]))
    assert logits.shape == (1, 3, 2048) and presents["present.0.key"].shape == (1, 2, 1, 32)
    assert cache.length == 3 and cache.filled[:3].all()


def test_nnapi_legalization_keeps_the_function():
    """Cos, Reciprocal, Round and Expand rewritten, int64 inputs narrowed: same results."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    nodes = [helper.make_node("Cos", ["x"], ["c"]), helper.make_node("Reciprocal", ["c"], ["r"]),
             helper.make_node("Round", ["x"], ["q"]), helper.make_node("Expand", ["x", "shape"], ["e"]),
             helper.make_node("Gather", ["table", "ids"], ["g"])]
    graph = helper.make_graph(nodes, "g", [x, ids], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                      for n in ("r", "q", "e", "g")],
                              [helper.make_tensor("shape", TensorProto.INT64, [3], [2, 4, 3]),
                               helper.make_tensor("table", TensorProto.FLOAT, [5], [0, 1, 2, 3, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    assert run_passes(model, *legalize_nnapi_passes())
    legal = ir.serde.serialize_model(model)
    assert {"Cos", "Reciprocal", "Round", "Expand"}.isdisjoint(n.op_type for n in legal.graph.node)
    assert legal.graph.input[1].type.tensor_type.elem_type == TensorProto.INT32
    feeds = {"x": np.array([[[0.3, 2.7, -1.2]], [[10.0, 100.4, -0.6]]], np.float32)}
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {**feeds, "ids": np.array([4, 1])})
    after = ort.InferenceSession(legal.SerializeToString()).run(None, {**feeds, "ids": np.array([4, 1], np.int32)})
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_onnx_to_tf_translation_matches_onnxruntime(tmp_path):
    """Every op the translator knows, on a small graph: TFLite equals onnxruntime."""
    f = TensorProto.FLOAT
    inits = [helper.make_tensor("w", f, [4, 4], np.linspace(-1, 1, 16)), helper.make_tensor("shape", TensorProto.INT64, [3], [0, 2, 2]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1]), helper.make_tensor("lo", f, [], [-0.5]),
             helper.make_tensor("hi", f, [], [0.5]), helper.make_tensor("two", f, [], [2.0]),
             helper.make_tensor("starts", TensorProto.INT64, [1], [1]), helper.make_tensor("ends", TensorProto.INT64, [1], [3]),
             helper.make_tensor("table", f, [3, 4], np.arange(12))]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["a"]),
        helper.make_node("Sub", ["a", "x"], ["s"]), helper.make_node("Div", ["s", "two"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("Sqrt", ["p"], ["q"]),
        helper.make_node("Neg", ["q"], ["n"]), helper.make_node("Sin", ["n"], ["sn"]), helper.make_node("Cos", ["sn"], ["cs"]),
        helper.make_node("Floor", ["a"], ["fl"]), helper.make_node("Sigmoid", ["fl"], ["sg"]),
        helper.make_node("Softmax", ["sg"], ["sm"], axis=-1), helper.make_node("Clip", ["d", "lo", "hi"], ["cl"]),
        helper.make_node("Reshape", ["cl", "shape"], ["rs"]), helper.make_node("Transpose", ["rs"], ["tr"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["cs", "axes"], ["un"]), helper.make_node("Squeeze", ["un", "axes"], ["sq"]),
        helper.make_node("Slice", ["sq", "starts", "ends", "axes"], ["sl"]),
        helper.make_node("ReduceMean", ["sl", "axes"], ["rm"], keepdims=1),
        helper.make_node("Concat", ["sm", "cs"], ["cc"], axis=1), helper.make_node("Mul", ["cc", "two"], ["mu"]),
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["table", "ids32"], ["g"], axis=0), helper.make_node("Cast", ["mu"], ["u8"], to=TensorProto.UINT8),
    ]
    outputs = ["tr", "rm", "mu", "g", "u8"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 4]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT32, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.UINT8 if n == "u8" else f, None)
                               for n in outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": np.array([[0.1, -2.0, 3.5, 0.7], [1.0, 0.2, -0.4, 2.2]], np.float32), "ids": np.array([2, 0], np.int32)}
    expected = ort.InferenceSession(proto.SerializeToString()).run(outputs, feeds)
    # TensorFlow runs in child processes, as the tflite target runs it: it segfaults in a process
    # that has loaded the QNN HTP backend (a pytest worker that ran test_qnn_htp.py first).
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "feeds.npz", **feeds)
    subprocess.run([sys.executable, "-c", _TF_DIRECT, str(tmp_path)], check=True, capture_output=True)
    direct = np.load(tmp_path / "direct.npz")
    convert_in_child(tmp_path / "m.onnx", tmp_path / "m.tflite")
    lite = TFLiteSession(tmp_path / "m.tflite").run(outputs, feeds)
    for name, want, got_tf, got_lite in zip(outputs, expected, [direct[n] for n in outputs], lite):
        np.testing.assert_allclose(np.asarray(got_tf), want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_lite, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_failed_conversion_names_its_cause_not_tensorflows_last_warning():
    from kvcompile.targets.tflite import _conversion_failure

    warning = "WARNING:absl:`past_key_values.2.key` is not a valid tf.function parameter name."
    killed = subprocess.CompletedProcess([], -9, "", warning)
    assert "killed by signal 9 (out of memory" in _conversion_failure(killed)
    failed = subprocess.CompletedProcess([], 1, "", f"ConverterError: op FOO is not supported\n{warning}\n")
    assert _conversion_failure(failed) == "ConverterError: op FOO is not supported"


_TF_WEIGHTS = """
import sys
from pathlib import Path
import numpy as np, onnx
from kvcompile.targets.onnx_to_tf import tf_module
module = tf_module(onnx.load(Path(sys.argv[1]) / "m.onnx"))
graph = module.serving_default.get_concrete_function().graph.as_graph_def()
consts = [n for n in graph.node if n.op == "Const"]
largest = max(int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim] or [1])) for n in consts)
print(sorted(module.weights), largest)
"""


def test_tflite_translation_holds_weights_as_variables(tmp_path):
    """The weights enter TensorFlow as the module's variables, not as constants of the traced
    graph (TFLiteConverter copies constants through each of its stages: SmolLM2 ran out of 19.8
    GB that way); shape operands and scalars stay constants."""
    f = TensorProto.FLOAT
    inits = [helper.make_tensor("w", f, [64, 128], np.linspace(-1, 1, 64 * 128)),
             helper.make_tensor("table", f, [100, 64], np.arange(6400)),
             helper.make_tensor("shape", TensorProto.INT64, [2], [1, 128]), helper.make_tensor("two", f, [], [2.0])]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"], axis=0), helper.make_node("MatMul", ["g", "w"], ["m"]),
             helper.make_node("Mul", ["m", "two"], ["mu"]), helper.make_node("Reshape", ["mu", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1])],
                              [helper.make_tensor_value_info("y", f, [1, 128])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    result = subprocess.run([sys.executable, "-c", _TF_WEIGHTS, str(tmp_path)], check=True, capture_output=True,
                            text=True)
    names, largest = result.stdout.split("] ")
    assert names + "]" == "['table', 'w']" and int(largest) <= 2
