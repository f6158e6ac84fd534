"""Graph fragments that encode a float KV tensor to packed codes and decode it back.

Both follow `kvcompile.quant.Codec` exactly (tested element for element):
- encode, static scales: per-tensor scales use a Clip onto the grid's range in float, then ONNX
  QuantizeLinear (uint8 with the zero point); other scales use the same arithmetic spelled out (Div, Round
  half-to-even, Add zero point, Clip, Cast), because QuantizeLinear's per-axis form takes one
  axis only while per-channel KV scales span heads and head_dim.
- encode, dynamic scales: head_dim is split into groups (Reshape), each token's group gets
  absmax / qmax (symmetric) or (max - min) / (2**bits - 1) and a zero point (asymmetric),
  rounded to float16 (how they are stored), then the same arithmetic quantizes.
- codes are packed ``8 // bits`` per byte along the head_dim axis with Slice (stride) +
  BitShift + BitwiseOr; decode unpacks with BitShift/BitwiseAnd and interleaves them back
  (Unsqueeze, Concat, Reshape), then DequantizeLinear (per-tensor) or Cast/Sub/Mul.
uint8 is used instead of ONNX INT4/UINT4 because Concat (which appends the new token to the
cache) has no 4-bit type, and because every target (ORT GroupQueryAttention, NNAPI, TFLite)
can carry uint8.

Style "arithmetic" (static scales only) spells the same math with float arithmetic alone, for
targets without bit operations or QuantizeLinear (NNAPI, TFLite builtins): codes are computed
and kept as exact small integers in float (Div, Round, Add, Clip), packed as
code0 + 2**bits * code1 + ... (Slice, Mul, Add, Cast) and unpacked with Floor(x / 2**bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kvcompile.passes.names import NameAllocator
from kvcompile.quant import DYNAMIC_SCALE_FLOOR, Codec, code_max, symmetric_zero_point

_INT64_MAX = np.iinfo(np.int64).max


class FragmentBuilder:
    """Appends nodes to a list (inserted into the graph by the caller), naming them after `prefix`.

    Initializers are registered in `graph` at once. Every name comes from `names`, the
    allocator of the pass that builds the fragment, so it is unique in the graph."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, prefix: str):
        self.graph = graph
        self.names = names
        self.prefix = prefix
        self.nodes: list[ir.Node] = []

    def _name(self, what: str) -> str:
        return self.names.name(f"{self.prefix}/{what}")

    def const(self, array: np.ndarray, what: str) -> ir.Value:
        name = self._name(what)
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(value.const_value.shape)
        self.graph.register_initializer(value)
        return value

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, np.int64), "ints")

    def op(self, op_type: str, inputs: list[ir.Value | None], domain: str = "", **attributes) -> ir.Value:
        name = self._name(op_type)
        node = ir.Node(domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attributes),
                       name=name, num_outputs=1)
        node.outputs[0].name = self.names.name(name + "_out")
        self.nodes.append(node)
        return node.outputs[0]


@dataclass
class Encoded:
    """What encoding appends to the cache: packed codes, and for dynamic codecs the per-group
    float16 scales and (asymmetric) uint8 zero points, head_dim axis holding D // group."""

    codes: ir.Value
    scale: ir.Value | None = None
    zero_point: ir.Value | None = None


def _uint8(value: int) -> np.ndarray:
    return np.array(value, dtype=np.uint8)


def _shape_after_split(logical_shape: list[int | str], axis: int, parts: list[int]) -> np.ndarray:
    """Reshape target that replaces the dim at `axis` by `parts`, copying the dims before it."""
    after = logical_shape[axis + 1 :]
    if sum(not isinstance(d, int) for d in after) > 1:
        raise ValueError(f"cannot regroup a cache of shape {logical_shape}: more than one symbolic dim after head_dim")
    return np.array([0] * axis + parts + [d if isinstance(d, int) else -1 for d in after], np.int64)


def _to_codes(b: FragmentBuilder, x: ir.Value, scale: ir.Value, zero_point: ir.Value, bits: int) -> ir.Value:
    """clip(round(x / scale) + zero_point, 0, 2**bits - 1) as uint8 (float zero point)."""
    rounded = b.op("Round", [b.op("Div", [x, scale])])
    shifted = b.op("Add", [rounded, zero_point])
    clipped = b.op("Clip", [shifted, b.const(np.float32(0), "code_min"), b.const(np.float32(code_max(bits)), "code_max")])
    return b.op("Cast", [clipped], to=ir.DataType.UINT8)


ONNX, ARITHMETIC = "onnx", "arithmetic"


def emit_encode(b: FragmentBuilder, x: ir.Value, codec: Codec, float_dtype: ir.DataType,
                logical_shape: list[int | str], style: str = ONNX) -> Encoded:
    """Float tensor -> packed uint8 codes (+ dynamic parameters), following Codec.encode."""
    if float_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], to=ir.DataType.FLOAT)
    if style == ARITHMETIC:
        if codec.dynamic:
            raise ValueError("the arithmetic lowering takes static scales only")
        scaled = b.op("Round", [b.op("Div", [x, b.const(codec.scale, "scale")])])
        shifted = b.op("Add", [scaled, b.const(codec.zero_point.astype(np.float32), "zero_point")])
        codes = b.op("Clip", [shifted, b.const(np.float32(0), "code_min"),
                              b.const(np.float32(code_max(codec.bits)), "code_max")])
        return Encoded(_pack_arithmetic(b, codes, codec, logical_shape))
    if codec.dynamic:
        return _emit_encode_dynamic(b, x, codec, logical_shape)
    if codec.per_tensor:
        scale, zero_point = codec.scale.reshape(()), codec.zero_point.reshape(())
        if code_max(codec.bits) < 255:  # saturate in float: accelerators do not clamp 4-bit codes
            low = np.float32((0 - int(zero_point)) * scale)
            high = np.float32((code_max(codec.bits) - int(zero_point)) * scale)
            x = b.op("Clip", [x, b.const(low, "range_min"), b.const(high, "range_max")])
        codes = b.op("QuantizeLinear", [x, b.const(scale, "scale"), b.const(zero_point, "zero_point")])
    else:
        codes = _to_codes(b, x, b.const(codec.scale, "scale"),
                          b.const(codec.zero_point.astype(np.float32), "zero_point"), codec.bits)
    return Encoded(emit_pack(b, codes, codec))


def _emit_encode_dynamic(b: FragmentBuilder, x: ir.Value, codec: Codec, logical_shape: list[int | str]) -> Encoded:
    a = codec.pack_axis
    head_dim = logical_shape[a]
    grouped = b.op("Reshape", [x, b.const(_shape_after_split(logical_shape, a, [head_dim // codec.group, codec.group]), "shape")])
    inner = b.ints(a + 1)
    floor = b.const(DYNAMIC_SCALE_FLOOR, "scale_floor")

    def stored_scale(raw: ir.Value) -> tuple[ir.Value, ir.Value]:
        half = b.op("Cast", [b.op("Max", [raw, floor])], to=ir.DataType.FLOAT16)
        return half, b.op("Cast", [half], to=ir.DataType.FLOAT)

    if codec.symmetric:
        absmax = b.op("ReduceMax", [b.op("Abs", [grouped]), inner], keepdims=1)
        qmax = np.float32(symmetric_zero_point(codec.bits) - 1)
        half, scale = stored_scale(b.op("Div", [absmax, b.const(qmax, "qmax")]))
        zero_point = b.const(np.float32(symmetric_zero_point(codec.bits)), "zero_point")
        stored_zero_point = None
    else:
        low = b.op("ReduceMin", [grouped, inner], keepdims=1)
        high = b.op("ReduceMax", [grouped, inner], keepdims=1)
        half, scale = stored_scale(b.op("Div", [b.op("Sub", [high, low]), b.const(np.float32(code_max(codec.bits)), "levels")]))
        zero_point = b.op("Clip", [b.op("Round", [b.op("Div", [b.op("Neg", [low]), scale])]),
                                   b.const(np.float32(0), "zp_min"), b.const(np.float32(code_max(codec.bits)), "zp_max")])
        stored_zero_point = b.op("Squeeze", [b.op("Cast", [zero_point], to=ir.DataType.UINT8), inner])
    codes = _to_codes(b, grouped, scale, zero_point, codec.bits)
    merged = b.op("Reshape", [codes, b.const(_shape_after_split(logical_shape, a, [head_dim]), "shape")])
    return Encoded(emit_pack(b, merged, codec), b.op("Squeeze", [half, inner]), stored_zero_point)


def _pack_arithmetic(b: FragmentBuilder, codes: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    """Float codes -> uint8 bytes holding `per_byte` consecutive codes, first in the lowest bits."""
    n, a = codec.per_byte, codec.pack_axis
    if n > 1:
        pairs = b.op("Reshape", [codes, b.const(_shape_after_split(logical_shape, a, [logical_shape[a] // n, n]), "shape")])
        inner = b.ints(a + 1)
        packed = None
        for j in range(n):
            part = b.op("Squeeze", [b.op("Slice", [pairs, b.ints(j), b.ints(j + 1), inner]), inner])
            if j:
                part = b.op("Mul", [part, b.const(np.float32(1 << (j * codec.bits)), "weight")])
            packed = part if packed is None else b.op("Add", [packed, part])
        codes = packed
    return b.op("Cast", [codes], to=ir.DataType.UINT8)


def _unpack_arithmetic(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    """uint8 bytes -> float codes (exact small integers)."""
    n, a = codec.per_byte, codec.pack_axis
    rest = b.op("Cast", [packed], to=ir.DataType.FLOAT)
    if n == 1:
        return rest
    radix = b.const(np.float32(1 << codec.bits), "radix")
    parts = []
    for _ in range(n - 1):
        higher = b.op("Floor", [b.op("Div", [rest, radix])])
        parts.append(b.op("Sub", [rest, b.op("Mul", [higher, radix])]))
        rest = higher
    parts.append(rest)
    inner = b.ints(a + 1)
    interleaved = b.op("Concat", [b.op("Unsqueeze", [p, inner]) for p in parts], axis=a + 1)
    return b.op("Reshape", [interleaved, b.const(_shape_after_split(logical_shape, a, [logical_shape[a]]), "shape")])


def emit_pack(b: FragmentBuilder, codes: ir.Value, codec: Codec) -> ir.Value:
    n = codec.per_byte
    if n == 1:
        return codes
    axis = b.ints(codec.pack_axis)
    step = b.ints(n)
    end = b.ints(_INT64_MAX)
    packed = None
    for j in range(n):
        part = b.op("Slice", [codes, b.ints(j), end, axis, step])
        if j:
            part = b.op("BitShift", [part, b.const(_uint8(j * codec.bits), "shift")], direction="LEFT")
        packed = part if packed is None else b.op("BitwiseOr", [packed, part])
    return packed


def emit_unpack(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    n = codec.per_byte
    if n == 1:
        return packed
    a = codec.pack_axis
    mask = b.const(_uint8(code_max(codec.bits)), "mask")
    unsqueeze_axis = b.ints(a + 1)
    parts = []
    for j in range(n):
        part = packed
        if j:
            part = b.op("BitShift", [part, b.const(_uint8(j * codec.bits), "shift")], direction="RIGHT")
        part = b.op("BitwiseAnd", [part, mask])
        parts.append(b.op("Unsqueeze", [part, unsqueeze_axis]))
    interleaved = b.op("Concat", parts, axis=a + 1)
    return b.op("Reshape", [interleaved, b.const(_shape_after_split(logical_shape, a, [logical_shape[a]]), "shape")])


def emit_decode(b: FragmentBuilder, stored: Encoded, codec: Codec, logical_shape: list[int | str],
                float_dtype: ir.DataType, style: str = ONNX) -> ir.Value:
    """Packed uint8 codes (+ dynamic parameters) -> float tensor, following Codec.decode."""
    if style == ARITHMETIC:
        if codec.dynamic:
            raise ValueError("the arithmetic lowering takes static scales only")
        codes = _unpack_arithmetic(b, stored.codes, codec, logical_shape)
        centered = b.op("Sub", [codes, b.const(codec.zero_point.astype(np.float32), "zero_point")])
        x = b.op("Mul", [centered, b.const(codec.scale, "scale")])
        return x if float_dtype == ir.DataType.FLOAT else b.op("Cast", [x], to=float_dtype)
    codes = emit_unpack(b, stored.codes, codec, logical_shape)
    if codec.dynamic:
        a = codec.pack_axis
        head_dim = logical_shape[a]
        grouped = b.op("Reshape", [codes, b.const(_shape_after_split(logical_shape, a, [head_dim // codec.group, codec.group]), "shape")])
        inner = b.ints(a + 1)
        scale = b.op("Cast", [b.op("Unsqueeze", [stored.scale, inner])], to=ir.DataType.FLOAT)
        if stored.zero_point is None:
            zero_point = b.const(np.float32(symmetric_zero_point(codec.bits)), "zero_point")
        else:
            zero_point = b.op("Cast", [b.op("Unsqueeze", [stored.zero_point, inner])], to=ir.DataType.FLOAT)
        centered = b.op("Sub", [b.op("Cast", [grouped], to=ir.DataType.FLOAT), zero_point])
        x = b.op("Reshape", [b.op("Mul", [centered, scale]), b.const(_shape_after_split(logical_shape, a, [head_dim]), "shape")])
    elif codec.per_tensor:
        x = b.op("DequantizeLinear", [codes, b.const(codec.scale.reshape(()), "scale"),
                                      b.const(codec.zero_point.reshape(()), "zero_point")])
    else:
        as_float = b.op("Cast", [codes], to=ir.DataType.FLOAT)
        centered = b.op("Sub", [as_float, b.const(codec.zero_point.astype(np.float32), "zero_point")])
        x = b.op("Mul", [centered, b.const(codec.scale, "scale")])
    if float_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], to=float_dtype)
    return x
