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

Style "fixed-point" (per-tensor static scales) is the same arithmetic for a graph that a QDQ
quantizer turns into fixed point (QNN's HTP, which has no bit operations either): the bytes
cross the boundary through DequantizeLinear / QuantizeLinear with scale 1 (the HTP carries them as
8-bit fixed point; a Cast would not), and every value that must stay an exact small integer
(or an exact multiple of 1 / 2**bits, the Floor's input) is marked with `EXACT_GRID` in its
metadata: "low,high,unit", the values it takes. The quantizer must give such a value a grid
holding all of them exactly (`targets.qnn_htp.exact_overrides`): a calibrated range would put
b / 16 = 1.0 a hair under 1 and Floor it to 0.

Style "float-dq" is "arithmetic" for the HTP computing in float16 (qnn-htp `--htp-precision
fp16`): the bytes enter through DequantizeLinear with scale 1 instead of a Cast, because the
HTP's Cast from uint8 to float in float16 mode turned every nonzero byte into 1.0 (measured on
onnxruntime-qnn 2.7's simulator; its Cast to uint8 is right). Every code and every packed byte
is an integer below 2048, exact in float16.
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


ONNX, ARITHMETIC, FIXED_POINT, FLOAT_DQ = "onnx", "arithmetic", "fixed-point", "float-dq"
EXACT_GRID = "kvcompile.exact_grid"  # value metadata: "low,high,unit", see the module docstring


def _exact(value: ir.Value, low: float, high: float, unit: float = 1.0) -> ir.Value:
    """Mark `value` as taking exactly the multiples of `unit` in [low, high] (style fixed-point);
    `unit` 0: any value in [low, high], a fixed range whatever the calibration sees."""
    value.metadata_props[EXACT_GRID] = f"{float(low)!r},{float(high)!r},{float(unit)!r}"
    return value


def _per_tensor_params(codec: Codec) -> tuple[np.float32, int]:
    """The fixed-point style's scalar scale and zero point."""
    if codec.dynamic or not codec.per_tensor:
        raise ValueError("the fixed-point lowering takes one static scale per tensor")
    return np.float32(codec.scale.reshape(())), int(codec.zero_point.reshape(()))


def emit_encode(b: FragmentBuilder, x: ir.Value, codec: Codec, float_dtype: ir.DataType,
                logical_shape: list[int | str], style: str = ONNX) -> Encoded:
    """Float tensor -> packed uint8 codes (+ dynamic parameters), following Codec.encode."""
    if float_dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], to=ir.DataType.FLOAT)
    if style == FIXED_POINT:
        return Encoded(_encode_fixed_point(b, x, codec, logical_shape))
    if style in (ARITHMETIC, FLOAT_DQ):
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


def _pack_arithmetic(b: FragmentBuilder, codes: ir.Value, codec: Codec, logical_shape: list[int | str],
                     fixed_point: bool = False) -> ir.Value:
    """Float codes -> uint8 bytes holding `per_byte` consecutive codes, first in the lowest bits
    (`fixed_point`: every value marked exact, and the bytes leave through QuantizeLinear)."""
    n, a, qmax = codec.per_byte, codec.pack_axis, code_max(codec.bits)
    mark = _exact if fixed_point else (lambda value, *_: value)
    if n > 1:
        pairs = mark(b.op("Reshape", [codes, b.const(_shape_after_split(logical_shape, a, [logical_shape[a] // n, n]),
                                                     "shape")]), 0, qmax)
        inner = b.ints(a + 1)
        packed, high = None, 0
        for j in range(n):
            part = mark(b.op("Squeeze", [mark(b.op("Slice", [pairs, b.ints(j), b.ints(j + 1), inner]), 0, qmax), inner]),
                        0, qmax)
            weight = 1 << (j * codec.bits)
            if j:
                part = mark(b.op("Mul", [part, b.const(np.float32(weight), "weight")]), 0, qmax * weight, weight)
            high += qmax * weight
            packed = part if packed is None else mark(b.op("Add", [packed, part]), 0, high)
        codes = packed
    if fixed_point:
        return b.op("QuantizeLinear", [codes, b.const(np.float32(1), "byte_scale"), b.const(_uint8(0), "byte_zero")])
    return b.op("Cast", [codes], to=ir.DataType.UINT8)


def _unpack_arithmetic(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str],
                       fixed_point: bool = False, bytes_via_dequantize: bool = False) -> ir.Value:
    """uint8 bytes -> float codes (exact small integers). `fixed_point`: the bytes enter through
    DequantizeLinear, x / 2**bits is a Mul by its inverse (exact), every value is marked exact.
    `bytes_via_dequantize`: only the first (style float-dq)."""
    n, a = codec.per_byte, codec.pack_axis
    mark = _exact if fixed_point else (lambda value, *_: value)
    if fixed_point or bytes_via_dequantize:
        rest = b.op("DequantizeLinear", [packed, b.const(np.float32(1), "byte_scale"), b.const(_uint8(0), "byte_zero")])
    else:
        rest = b.op("Cast", [packed], to=ir.DataType.FLOAT)
    top = 255
    mark(rest, 0, top)
    if n == 1:
        return rest
    base = 1 << codec.bits
    radix = b.const(np.float32(base), "radix")
    parts = []
    for _ in range(n - 1):
        if fixed_point:
            shifted = mark(b.op("Mul", [rest, b.const(np.float32(1.0 / base), "inverse_radix")]), 0, top / base,
                           1.0 / base)
        else:
            shifted = b.op("Div", [rest, radix])
        higher = mark(b.op("Floor", [shifted]), 0, top // base)
        parts.append(mark(b.op("Sub", [rest, mark(b.op("Mul", [higher, radix]), 0, top // base * base, base)]),
                          0, base - 1))
        rest, top = higher, top // base
    parts.append(rest)
    inner = b.ints(a + 1)
    qmax = code_max(codec.bits)
    interleaved = mark(b.op("Concat", [mark(b.op("Unsqueeze", [p, inner]), 0, qmax) for p in parts], axis=a + 1), 0, qmax)
    return mark(b.op("Reshape", [interleaved, b.const(_shape_after_split(logical_shape, a, [logical_shape[a]]), "shape")]),
                0, qmax)


def _encode_fixed_point(b: FragmentBuilder, x: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    """clip(round(x / scale), -zp, qmax - zp) + zp, packed: Codec.encode, with the rounding done by
    Round on the clipped value (the same for integer bounds), and no Div for a scale of 1 (a
    folded per-channel scale)."""
    scale, zero_point = _per_tensor_params(codec)
    qmax = code_max(codec.bits)
    if scale != 1:
        x = b.op("Div", [x, b.const(scale, "scale")])
    # the clipped value spans the whole code range whatever range the calibration saw, so every
    # code can be written
    clipped = _exact(b.op("Clip", [x, b.const(np.float32(-zero_point), "code_min"),
                                   b.const(np.float32(qmax - zero_point), "code_max")]),
                     -zero_point, qmax - zero_point, unit=0.0)
    rounded = _exact(b.op("Round", [clipped]), -zero_point, qmax - zero_point)
    codes = _exact(b.op("Add", [rounded, b.const(np.float32(zero_point), "zero_point")]), 0, qmax)
    return _pack_arithmetic(b, codes, codec, logical_shape, fixed_point=True)


def _decode_fixed_point(b: FragmentBuilder, packed: ir.Value, codec: Codec, logical_shape: list[int | str]) -> ir.Value:
    """(codes - zp) * scale after the fixed-point unpack; a scale of 1 needs no Mul."""
    scale, zero_point = _per_tensor_params(codec)
    qmax = code_max(codec.bits)
    codes = _unpack_arithmetic(b, packed, codec, logical_shape, fixed_point=True)
    centered = _exact(b.op("Sub", [codes, b.const(np.float32(zero_point), "zero_point")]), -zero_point, qmax - zero_point)
    if scale == 1:
        return centered
    return _exact(b.op("Mul", [centered, b.const(scale, "scale")]), -zero_point * scale, (qmax - zero_point) * scale,
                  scale)


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
    if style == FIXED_POINT:
        x = _decode_fixed_point(b, stored.codes, codec, logical_shape)
        return x if float_dtype == ir.DataType.FLOAT else b.op("Cast", [x], to=float_dtype)
    if style in (ARITHMETIC, FLOAT_DQ):
        if codec.dynamic:
            raise ValueError("the arithmetic lowering takes static scales only")
        codes = _unpack_arithmetic(b, stored.codes, codec, logical_shape, bytes_via_dequantize=style == FLOAT_DQ)
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
