"""The in-graph encode/decode fragments compute exactly what kvcompile.quant.Codec does."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvcompile.passes.kv_codec import FragmentBuilder, emit_decode, emit_encode
from kvcompile.quant import Codec, symmetric_scale
from kvcompile.runtimes.session import cpu_session

# (logical shape with symbolic batch/seq, concrete shape, head_dim axis, heads axis)
LAYOUTS = {
    "bhsd": (["batch", 2, "seq", 8], (3, 2, 5, 8), 3, 1),
    "bhds (keys transposed)": (["batch", 2, 8, "seq"], (3, 2, 8, 5), 2, 1),
    "bsd (one tensor per head)": (["batch", "seq", 8], (3, 5, 8), 2, None),
}


def _codec(x: np.ndarray, bits: int, per_channel: bool, head_dim_axis: int, heads_axis) -> Codec:
    """Per-channel: one scale per head and channel, broadcast over batch and seq."""
    if per_channel:
        kept = {head_dim_axis, heads_axis}
        absmax = np.abs(x).max(axis=tuple(a for a in range(x.ndim) if a not in kept), keepdims=True)
    else:
        absmax = np.abs(x).max()
    return Codec(bits, symmetric_scale(absmax, bits), 1 << (bits - 1), head_dim_axis)


def _run_fragment(kind: str, codec: Codec, logical, dtype: ir.DataType, feed: np.ndarray) -> np.ndarray:
    dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in logical]
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    builder = FragmentBuilder(graph, "t")
    stored = list(dims)
    stored[codec.pack_axis] = stored[codec.pack_axis] // (8 // codec.bits)
    if kind == "encode":
        x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape(dims))
        y = emit_encode(builder, x, codec, dtype)
        y.type, y.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape(stored)
    else:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(stored))
        y = emit_decode(builder, x, codec, list(logical), dtype)
        y.type, y.shape = ir.TensorType(dtype), ir.Shape(dims)
    y.name = "y"
    graph.inputs.append(x)
    graph.extend(builder.nodes)
    graph.outputs.append(y)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto, full_check=True)
    return cpu_session(proto.SerializeToString()).run(None, {"x": feed})[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("float16", [False, True], ids=["fp32", "fp16"])
def test_fragments_match_codec(layout, bits, per_channel, float16):
    logical, shape, head_dim_axis, heads_axis = LAYOUTS[layout]
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[head_dim_axis]).reshape(
        [-1 if a == head_dim_axis else 1 for a in range(len(shape))])).astype(np.float32)
    if float16:
        x = x.astype(np.float16)
    dtype = ir.DataType.FLOAT16 if float16 else ir.DataType.FLOAT
    codec = _codec(x.astype(np.float32), bits, per_channel, head_dim_axis, heads_axis)
    packed = _run_fragment("encode", codec, logical, dtype, x)
    np.testing.assert_array_equal(packed, codec.encode(x.astype(np.float32)))
    decoded = _run_fragment("decode", codec, logical, dtype, packed)
    expected = codec.decode(packed)
    np.testing.assert_array_equal(decoded, expected.astype(decoded.dtype))
