"""normalize_export: exporter artifacts folded away so discovery sees the cache's dataflow."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvcompile.errors import UnsupportedModelError
from kvcompile.manifest import float_model_io
from kvcompile.passes.find_kv_cache import find_kv_cache
from kvcompile.passes.normalize import normalize_export
from kvcompile.runtimes.decoder import Decoder
from kvcompile.runtimes.session import cpu_session
from synthetic import build_decoder


def test_empty_concat_before_the_cache_is_folded_and_the_cache_found():
    """The TorchScript exporter concatenates the past onto an empty tensor before appending: a
    Concat with no present output behind it, which discovery took for an orphaned cache."""
    proto = build_decoder("llama", layers=2, empty_concat=True)
    with pytest.raises(UnsupportedModelError, match="no graph output carries"):
        find_kv_cache(ir.serde.deserialize_model(proto))
    model = ir.serde.deserialize_model(proto)
    assert normalize_export(model)
    kv = find_kv_cache(model)
    assert [t.past_input for t in kv.tensors] == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    normalized = ir.serde.serialize_model(model)
    onnx.checker.check_model(normalized, full_check=True)
    tokens = np.random.default_rng(0).integers(0, 32, (1, 6))
    before = Decoder(cpu_session(proto.SerializeToString()), float_model_io(kv, "before"))
    after = Decoder(cpu_session(normalized.SerializeToString()), float_model_io(kv, "after"))
    caches = before.new_cache(1), after.new_cache(1)
    for chunk in (tokens[:, :4], tokens[:, 4:5], tokens[:, 5:6]):
        a, _ = before.step(caches[0], chunk)
        b, _ = after.step(caches[1], chunk)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_model_without_artifacts_is_left_alone():
    model = ir.serde.deserialize_model(build_decoder("llama", layers=1))
    nodes = len(model.graph)
    assert not normalize_export(model)
    assert len(model.graph) == nodes


def test_fixed_dims_read_from_shapes_become_constants():
    """TorchScript exports compute SDPA's scale from Slice(Shape(q), -1) and a reshape target from
    Gather(Shape(v), 3); where those dims are fixed they fold to constants, leaving no reader of
    the tensor but its real consumers."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "minus_one", "big"], ["last"], name="slice"),
        helper.make_node("Gather", ["shape", "two"], ["dim"], name="gather", axis=0),
        helper.make_node("Mul", ["last", "dim"], ["product"], name="mul_dims"),
        helper.make_node("Cast", ["product"], ["scale"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["y"], name="mul"),
    ]
    constants = [numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                 numpy_helper.from_array(np.array([2**62], np.int64), "big"),
                 numpy_helper.from_array(np.array(2, np.int64), "two")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], constants),
                              opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    assert normalize_export(model)
    assert "Shape" not in [node.op_type for node in model.graph]
    normalized = ir.serde.serialize_model(model)
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)}
    expected = cpu_session(proto.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(cpu_session(normalized.SerializeToString()).run(None, feeds)[0], expected, rtol=1e-6)
