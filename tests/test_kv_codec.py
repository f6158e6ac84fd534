"""The in-graph encode/decode fragments compute exactly what kvcompile.quant.Codec does."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvcompile.passes.kv_codec import Encoded, FragmentBuilder, emit_decode, emit_encode
from kvcompile.passes.names import NameAllocator
from kvcompile.quant import Codec, symmetric_scale
from kvcompile.runtimes.session import cpu_session

# (logical shape with symbolic batch/seq, concrete shape, head_dim axis, heads axis)
LAYOUTS = {
    "bhsd": (["batch", 2, "seq", 16], (3, 2, 5, 16), 3, 1),
    "bhds (keys transposed)": (["batch", 2, 16, "seq"], (3, 2, 16, 5), 2, 1),
    "bsd (one tensor per head)": (["batch", "seq", 16], (3, 5, 16), 2, None),
}
SCHEMES = ["per-tensor", "per-channel", "per-token", "per-token asym", "per-group8", "per-group8 asym"]


def make_codec(x: np.ndarray, bits: int, scheme: str, head_dim_axis: int, heads_axis, packed: bool = True) -> Codec:
    if scheme.startswith("per-token") or scheme.startswith("per-group"):
        group = 8 if scheme.startswith("per-group") else x.shape[head_dim_axis]
        return Codec(bits, None, None, head_dim_axis, group=group, symmetric="asym" not in scheme, packed=packed)
    if scheme == "per-channel":  # one scale per head and channel, broadcast over batch and seq
        kept = {head_dim_axis, heads_axis}
        absmax = np.abs(x).max(axis=tuple(a for a in range(x.ndim) if a not in kept), keepdims=True)
    else:
        absmax = np.abs(x).max()
    return Codec(bits, symmetric_scale(absmax, bits), 1 << (bits - 1), head_dim_axis, packed=packed)


def _value(name, dtype, dims):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))


def run_graph(inputs: list[ir.Value], outputs: list[ir.Value], builder: FragmentBuilder, graph: ir.Graph, feeds):
    graph.inputs.extend(inputs)
    graph.extend(builder.nodes)
    graph.outputs.extend(outputs)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto, full_check=True)
    return cpu_session(proto.SerializeToString()).run(None, feeds)


def stored_dims(dims, axis, codec: Codec, what: str):
    out = list(dims)
    out[axis] = out[axis] // codec.per_byte if what == "codes" else out[axis] // codec.group
    return out


def encode_in_graph(codec: Codec, logical, dtype, x, style="onnx"):
    dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in logical]
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="encode")
    builder = FragmentBuilder(graph, NameAllocator(graph), "t")
    source = _value("x", dtype, dims)
    encoded = emit_encode(builder, source, codec, dtype, list(logical), style)
    outputs = [encoded.codes]
    encoded.codes.type, encoded.codes.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape(stored_dims(dims, codec.pack_axis, codec, "codes"))
    for value, kind in ((encoded.scale, ir.DataType.FLOAT16), (encoded.zero_point, ir.DataType.UINT8)):
        if value is not None:
            value.type, value.shape = ir.TensorType(kind), ir.Shape(stored_dims(dims, codec.pack_axis, codec, "params"))
            outputs.append(value)
    results = run_graph([source], outputs, builder, graph, {"x": x})
    return results + [None] * (3 - len(results))


def decode_in_graph(codec: Codec, logical, dtype, packed, scale, zero_point, style="onnx"):
    dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in logical]
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="decode")
    builder = FragmentBuilder(graph, NameAllocator(graph), "t")
    stored = Encoded(_value("codes", ir.DataType.UINT8, stored_dims(dims, codec.pack_axis, codec, "codes")))
    feeds = {"codes": packed}
    inputs = [stored.codes]
    if scale is not None:
        stored.scale = _value("scale", ir.DataType.FLOAT16, stored_dims(dims, codec.pack_axis, codec, "params"))
        inputs.append(stored.scale)
        feeds["scale"] = scale
    if zero_point is not None:
        stored.zero_point = _value("zero_point", ir.DataType.UINT8, stored_dims(dims, codec.pack_axis, codec, "params"))
        inputs.append(stored.zero_point)
        feeds["zero_point"] = zero_point
    decoded = emit_decode(builder, stored, codec, list(logical), dtype, style)
    decoded.type, decoded.shape = ir.TensorType(dtype), ir.Shape(dims)
    return run_graph(inputs, [decoded], builder, graph, feeds)[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme,style", [(s, "onnx") for s in SCHEMES] +
                         [(s, "arithmetic") for s in ("per-tensor", "per-channel")] +  # static targets
                         [("per-tensor", "fixed-point")])  # qnn-htp
@pytest.mark.parametrize("float16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-code-per-byte"])
def test_fragments_match_codec(layout, bits, scheme, style, float16, packed):
    logical, shape, head_dim_axis, heads_axis = LAYOUTS[layout]
    rng = np.random.default_rng(bits)
    channel_spread = rng.uniform(0.1, 3.0, size=shape[head_dim_axis])
    x = (rng.normal(size=shape) * channel_spread.reshape(
        [-1 if a == head_dim_axis else 1 for a in range(len(shape))]) + 0.3).astype(np.float32)
    x = x.astype(np.float16) if float16 else x
    dtype = ir.DataType.FLOAT16 if float16 else ir.DataType.FLOAT
    codec = make_codec(x.astype(np.float32), bits, scheme, head_dim_axis, heads_axis, packed)

    packed, scale, zero_point = encode_in_graph(codec, logical, dtype, x, style)
    want_packed, want_scale, want_zero_point = codec.encode(x.astype(np.float32))
    np.testing.assert_array_equal(packed, want_packed)
    for got, want in ((scale, want_scale), (zero_point, want_zero_point)):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)

    decoded = decode_in_graph(codec, logical, dtype, packed, scale, zero_point, style)
    expected = codec.decode(packed, scale, zero_point)
    np.testing.assert_array_equal(decoded, expected.astype(decoded.dtype))
