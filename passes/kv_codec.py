"""Graph fragments that encode a float KV tensor to packed codes and decode it back.

Both follow `kvcompile.quant` exactly:
- encode: per-tensor scales use ONNX QuantizeLinear (uint8, zero point) and a Clip onto the
  ``bits`` grid; other scales use the same arithmetic spelled out (Div, Round half-to-even, Add
  zero point, Clip, Cast), because QuantizeLinear's per-axis form takes one axis only while
  per-channel KV scales span heads and head_dim. Codes are then packed ``8 // bits`` per byte
  along the head_dim axis with Slice (stride) + BitShift + BitwiseOr.
- decode: the inverse: BitShift/BitwiseAnd unpack, interleave (Unsqueeze, Concat, Reshape),
  then DequantizeLinear (per-tensor) or Cast/Sub/Mul.
uint8 is used instead of ONNX INT4/UINT4 because Concat (which appends the new token to the
cache) has no 4-bit type, and because every target (ORT GroupQueryAttention, NNAPI, TFLite)
can carry uint8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvcompile.quant import Codec, code_max, codes_per_byte

_INT64_MAX = np.iinfo(np.int64).max


class FragmentBuilder:
    """Appends nodes to a list (inserted into the graph by the caller), naming them after `prefix`."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self._count = 0

    def _name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def const(self, array: np.ndarray, what: str) -> ir.Value:
        name = self._name(what)
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(value.const_value.shape)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value | None], **attributes) -> ir.Value:
        name = self._name(op_type)
        node = ir.Node("", op_type, inputs, attributes=ir.convenience.convert_attributes(attributes),
                       name=name, num_outputs=1)
        node.outputs[0].name = name + "_out"
        self.nodes.append(node)
        return node.outputs[0]


def _uint8(value: int) -> np.ndarray:
    return np.array(value, dtype=np.uint8)


def emit_encode(b: FragmentBuilder, x: ir.Value, codec: Codec, float_dtype: ir.DataType) -> ir.Value:
    """Float tensor -> packed uint8 codes, following kvcompile.quant.Codec.encode."""
    if float_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], to=ir.DataType.FLOAT)
    top = code_max(codec.bits)
    if codec.per_tensor:
        codes = b.op("QuantizeLinear", [x, b.const(codec.scale.reshape(()), "scale"),
                                        b.const(codec.zero_point.reshape(()), "zero_point")])
        if top < 255:
            codes = b.op("Clip", [codes, b.const(_uint8(0), "code_min"), b.const(_uint8(top), "code_max")])
    else:
        scaled = b.op("Div", [x, b.const(codec.scale, "scale")])
        rounded = b.op("Round", [scaled])
        shifted = b.op("Add", [rounded, b.const(codec.zero_point.astype(np.float32), "zero_point")])
        clipped = b.op("Clip", [shifted, b.const(np.float32(0), "code_min"), b.const(np.float32(top), "code_max")])
        codes = b.op("Cast", [clipped], to=ir.DataType.UINT8)
    return emit_pack(b, codes, codec)


def emit_pack(b: FragmentBuilder, codes: ir.Value, codec: Codec) -> ir.Value:
    n = codes_per_byte(codec.bits)
    if n == 1:
        return codes
    axis = b.const(np.array([codec.pack_axis], np.int64), "axis")
    step = b.const(np.array([n], np.int64), "step")
    end = b.const(np.array([_INT64_MAX], np.int64), "end")
    packed = None
    for j in range(n):
        part = b.op("Slice", [codes, b.const(np.array([j], np.int64), "start"), end, axis, step])
        if j:
            part = b.op("BitShift", [part, b.const(_uint8(j * codec.bits), "shift")], direction="LEFT")
        packed = part if packed is None else b.op("BitwiseOr", [packed, part])
    return packed


def emit_unpack(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    n = codes_per_byte(codec.bits)
    if n == 1:
        return packed
    a = codec.pack_axis
    mask = b.const(_uint8(code_max(codec.bits)), "mask")
    unsqueeze_axis = b.const(np.array([a + 1], np.int64), "axis")
    parts = []
    for j in range(n):
        part = packed
        if j:
            part = b.op("BitShift", [part, b.const(_uint8(j * codec.bits), "shift")], direction="RIGHT")
        part = b.op("BitwiseAnd", [part, mask])
        parts.append(b.op("Unsqueeze", [part, unsqueeze_axis]))
    interleaved = b.op("Concat", parts, axis=a + 1)
    return b.op("Reshape", [interleaved, b.const(_merge_shape(logical_shape, a), "shape")])


def _merge_shape(logical_shape: list[int | str], axis: int) -> np.ndarray:
    """Reshape target that merges the (bytes, codes) pair of axes back into the head_dim axis."""
    target = [0] * axis + [logical_shape[axis]]
    after = logical_shape[axis + 1 :]
    if sum(not isinstance(d, int) for d in after) > 1:
        raise ValueError(f"cannot unpack a cache of shape {logical_shape}: more than one symbolic "
                         "dim after head_dim")
    target += [d if isinstance(d, int) else -1 for d in after]
    return np.array(target, dtype=np.int64)


def emit_decode(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str],
                float_dtype: ir.DataType) -> ir.Value:
    """Packed uint8 codes -> float tensor, following kvcompile.quant.Codec.decode."""
    codes = emit_unpack(b, packed, codec, logical_shape)
    if codec.per_tensor:
        x = b.op("DequantizeLinear", [codes, b.const(codec.scale.reshape(()), "scale"),
                                      b.const(codec.zero_point.reshape(()), "zero_point")])
    else:
        as_float = b.op("Cast", [codes], to=ir.DataType.FLOAT)
        centered = b.op("Sub", [as_float, b.const(codec.zero_point.astype(np.float32), "zero_point")])
        x = b.op("Mul", [centered, b.const(codec.scale, "scale")])
    if float_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], to=float_dtype)
    return x
