"""One resident copy of the weights for every CPU session of a compile (runtimes/weights.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvcompile.runtimes.session import cpu_session
from kvcompile.runtimes.weights import MIN_SHARED_BYTES, WeightPool
from synthetic import build_decoder


def _saved(proto: onnx.ModelProto, folder, name: str = "model.onnx"):
    folder.mkdir(parents=True, exist_ok=True)
    model = ir.serde.deserialize_model(proto)
    path = folder / name
    ir.save(model, path, external_data=name + ".data", size_threshold_bytes=1024)
    return path


def _feeds(session):
    feeds = {}
    for value in session.get_inputs():
        dims = [d if isinstance(d, int) else 1 for d in value.shape]
        if "past" in value.name:
            feeds[value.name] = np.random.default_rng(1).standard_normal([*dims[:2], 3, *dims[3:]]).astype(np.float32)
        elif value.name in ("input_ids", "position_ids"):
            feeds[value.name] = np.array([[5, 7]], dtype=np.int64) if value.name == "input_ids" else \
                np.array([[3, 4]], dtype=np.int64)
        else:  # attention mask over 3 past + 2 new positions
            feeds[value.name] = np.ones([1, 5], dtype=np.int64)
    return feeds


def _large(proto: onnx.ModelProto) -> list[str]:
    return [t.name for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).nbytes >= MIN_SHARED_BYTES]


@pytest.fixture(scope="module")
def decoder_proto():
    return build_decoder("llama", layers=2, heads=4, kv_heads=2, head_dim=64)


def test_sessions_on_copies_of_the_weights_read_one_mapping(decoder_proto, tmp_path):
    """The model and a byte-identical copy in another folder (another data file, as the staged
    float model and an artifact are): the copy's tensors are served from the first file's
    mapping, and both sessions compute what an unshared session does."""
    original = _saved(decoder_proto, tmp_path / "input")
    copy = _saved(decoder_proto, tmp_path / "work", "float.onnx")
    pool = WeightPool()
    first = cpu_session(original, weights=pool)
    mapped = pool.stats.mapped_bytes
    second = cpu_session(copy, weights=pool)
    large = _large(decoder_proto)
    assert large and pool.stats.tensors == len(large)
    assert pool.stats.aliased_tensors == len(large) and pool.stats.mapped_bytes == mapped
    feeds = _feeds(first)
    expected = cpu_session(original).run(None, feeds)[0]
    np.testing.assert_allclose(first.run(None, feeds)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.run(None, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_a_tensor_with_other_bytes_is_not_served_from_the_pool(decoder_proto, tmp_path):
    """A copy in which one weight differs (same name, shape and size) keeps its own bytes: the
    pool compares, it does not trust names."""
    original = _saved(decoder_proto, tmp_path / "input")
    changed = onnx.ModelProto()
    changed.CopyFrom(decoder_proto)
    weight = max(changed.graph.initializer, key=lambda t: onnx.numpy_helper.to_array(t).nbytes)
    values = onnx.numpy_helper.to_array(weight) * 2.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
    other = _saved(changed, tmp_path / "other")
    pool = WeightPool()
    first = cpu_session(original, weights=pool)
    second = cpu_session(other, weights=pool)
    large = _large(decoder_proto)
    assert pool.stats.aliased_tensors == len(large) - 1
    feeds = _feeds(first)
    np.testing.assert_allclose(second.run(None, feeds)[0], cpu_session(other).run(None, feeds)[0], rtol=1e-5,
                               atol=1e-5)
    assert np.abs(second.run(None, feeds)[0] - first.run(None, feeds)[0]).max() > 1e-3


def test_a_graph_with_4bit_matmuls_keeps_prepacking(decoder_proto, tmp_path):
    """MatMulNBits without prepacked weights runs several times slower (weights.NEEDS_PREPACKING);
    a float graph's MatMuls do without."""
    rows, depth, block = 64, 64, 32
    node = onnx.helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"], domain="com.microsoft",
                                 K=depth, N=rows, bits=4, block_size=block)
    codes = onnx.numpy_helper.from_array(
        np.random.default_rng(0).integers(0, 256, (rows, depth // block, block // 2), dtype=np.uint8), "codes")
    scales = onnx.numpy_helper.from_array(np.full(rows * depth // block, 0.01, np.float32), "scales")
    graph = onnx.helper.make_graph([node], "nbits", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                       [1, depth])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, rows])],
                                   [codes, scales])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    int4 = _saved(proto, tmp_path / "int4")
    pool = WeightPool()
    assert pool.initializers(int4).prepack and "codes" in pool.initializers(int4).values
    assert not pool.initializers(_saved(decoder_proto, tmp_path / "float")).prepack
    x = np.random.default_rng(1).standard_normal((1, depth)).astype(np.float32)
    np.testing.assert_allclose(cpu_session(int4, weights=pool).run(None, {"x": x})[0],
                               cpu_session(int4).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def _tied_head(dtype=onnx.TensorProto.FLOAT, also_read_by: str | None = None) -> onnx.ModelProto:
    """Embedding Gather and an lm_head MatMul reading the same [vocab, hidden] weight through a
    Transpose (how torch exports tied embeddings); `also_read_by` adds another reader of the Transpose."""
    vocab, hidden = 96, 32
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((vocab, hidden)).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype)),
        "embed")
    nodes = [h.make_node("Gather", ["embed", "ids"], ["x"]),
             h.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
             h.make_node("MatMul", ["x", "embed_t"], ["logits"])]
    outputs = [h.make_tensor_value_info("logits", dtype, [1, None, vocab])]
    if also_read_by:
        nodes.append(h.make_node(also_read_by, ["embed_t"], ["other"]))
        outputs.append(h.make_tensor_value_info("other", dtype, None))
    graph = h.make_graph(nodes, "tied", [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, None])],
                         outputs, [weight])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])


def test_a_weight_read_through_a_transpose_is_read_as_stored(tmp_path):
    """A tied lm_head: onnxruntime would fold Transpose(embedding) into a private transposed copy
    per session; the pooled session reads the stored weight (FusedMatMul transB) and computes
    the same logits, bit for bit."""
    path = _saved(_tied_head(), tmp_path / "tied")
    shared = WeightPool().initializers(path)
    assert shared.graph is not None
    session_graph = onnx.load_from_string(shared.graph)
    assert [n.op_type for n in session_graph.graph.node] == ["Gather", "FusedMatMul"]
    assert onnx.load(str(path), load_external_data=False).graph.node[1].op_type == "Transpose"  # the file is unchanged
    ids = np.array([[3, 50, 7, 95]], dtype=np.int64)
    pooled = cpu_session(path, weights=WeightPool()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(pooled, cpu_session(path).run(None, {"ids": ids})[0])


@pytest.mark.parametrize("model", [_tied_head(onnx.TensorProto.FLOAT16), _tied_head(also_read_by="Relu")],
                         ids=["float16", "transpose-read-elsewhere"])
def test_a_transpose_kept_where_fused_matmul_cannot_take_its_place(model, tmp_path):
    """float16 (no CPU FusedMatMul kernel) and a Transpose another op also reads stay as written."""
    path = _saved(model, tmp_path / "kept")
    assert WeightPool().initializers(path).graph is None
    ids = np.array([[1, 2]], dtype=np.int64)
    np.testing.assert_array_equal(cpu_session(path, weights=WeightPool()).run(None, {"ids": ids})[0],
                                  cpu_session(path).run(None, {"ids": ids})[0])


def test_a_model_rebuilt_at_the_same_path_is_read_from_its_new_file(decoder_proto, tmp_path):
    """An artifact rebuilt in place (float slots) is another file at the same path: the pool maps
    the new file, not the one it mapped before (that read past the new file's tensors)."""
    import shutil

    first = _saved(_tied_head(), tmp_path / "artifact")
    pool = WeightPool()
    ids = np.array([[4, 9]], dtype=np.int64)
    before = cpu_session(first, weights=pool).run(None, {"ids": ids})[0]
    shutil.rmtree(tmp_path / "artifact")
    rebuilt = _tied_head()
    weight = rebuilt.graph.initializer[0]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight)[:64] * 3.0, weight.name))
    path = _saved(rebuilt, tmp_path / "artifact")
    after = cpu_session(path, weights=pool).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(after, cpu_session(path).run(None, {"ids": ids})[0])
    assert after.shape[-1] == 64 and before.shape[-1] == 96
